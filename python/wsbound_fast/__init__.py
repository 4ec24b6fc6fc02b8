"""wsbound_fast: exact tr(H), tr(H^2) and Wolkowicz-Styan eigenvalue bounds for MLP losses.

>>> import wsbound_fast as wsb
>>> res = wsb.bound(layers, X, y, activation="tanh")          # doctest: +SKIP
>>> res.lambda_max_upper                                       # doctest: +SKIP
"""

from __future__ import annotations

from ._api import bound
from ._bounds import Bound, LayerBound, WSBounds, ws_bounds
from ._data import load_digits
from ._dense import dense_hessian
from ._hvp import hvp
from ._lanczos import eigsh
from ._loader import load_core as _load_core
from ._plan import Plan, plan
from ._torch import from_torch

__all__ = [
    "Bound", "LayerBound", "Plan", "WSBounds", "bound", "dense_hessian", "eigsh", "from_torch", "hvp", "load_digits",
    "plan", "ws_bounds", "__version__",
]
__version__ = "0.1.0"
