"""Type stubs for the AVX2 + FMA build of the compiled core: the same interface as _core."""

from ._core import *  # noqa: F403
from ._core import Cancelled as Cancelled, hvp as hvp, moments as moments, pair_sums as pair_sums
