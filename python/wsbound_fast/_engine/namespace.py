"""The array library the engine computes with: the Python array API, plus what it lacks.

The engine (features, pair sums, K route, products, schedule) is written once against an
:class:`Arrays`: ``xp`` is the library's namespace from ``array_api_compat`` (NumPy or torch),
and the methods below are the few operations the array API standard does not have (erfc, a
C-ordered copy, the GPU's synchronisation, the host copy at the end).  Each library adapter
(``_backends/numpy.py``, ``_backends/torch.py``) gives its own :class:`Arrays`.  A CuPy
adapter would be one more subclass (erfc from ``cupyx.scipy.special``, ``sigmoid``,
``copy_c``, ``to_numpy`` through ``.get()``, ``sync``) plus a backend name; none is shipped
yet, as it is untested (docs/design.md, "Porting to another array library").

Beyond the standard, the engine relies on what NumPy, torch and CuPy all provide: ``einsum``,
in-place updates of views (``out[i] += s``, the diagonal of a reshaped view), advanced integer
indexing and the ``@`` operator.  A JAX port would need those replaced by functional updates
(``.at[].add``) and its own einsum; see docs/design.md, "Porting to another array library".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Arrays:
    """Where and in which precision the engine computes.

    ``dtype`` is the compute dtype of the features and of every Gram product (float64, or
    float32 for the torch backend's dtype="float32"); ``acc`` the accumulation dtype
    (float64): each Gram product is widened to it before the elementwise products and sums.
    """

    xp: Any
    device: Any
    dtype: Any
    acc: Any

    # -- what the array API standard lacks (overridden per library) ------------------------

    def erfc(self, x: Any) -> Any:
        raise NotImplementedError

    def sigmoid(self, x: Any) -> Any:
        """The logistic function, from exp of a non-positive argument only (no overflow); a
        library with its own (torch.sigmoid) uses that."""
        e = self.xp.exp(-self.xp.abs(x))
        return self.xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))

    def copy_c(self, x: Any) -> Any:
        """A new C-contiguous array with the values of x (never a view of x)."""
        raise NotImplementedError

    def to_numpy(self, x: Any) -> np.ndarray:
        """x as a NumPy array on the host (one copy, at the end of a pass)."""
        raise NotImplementedError

    def sync(self) -> None:
        """Wait for queued work (accelerators); nothing on the CPU."""

    #: Progress is reported after every block pair (CPU) or after each group of them, once
    #: the device has finished (an accelerator, where each report synchronises).
    report_each_pair: bool = True

    # -- conveniences built on the standard ------------------------------------------------

    def from_host(self, a: np.ndarray, dtype: Any = None) -> Any:
        """A host array on the device, in ``dtype`` (default: the compute dtype)."""
        return self.xp.asarray(a, dtype=self.dtype if dtype is None else dtype, device=self.device)

    def to_acc(self, x: Any) -> Any:
        """x in the accumulation dtype (no copy when it is in it already)."""
        return x if x.dtype == self.acc else self.xp.astype(x, self.acc)

    def gram(self, A: Any, B: Any) -> Any:
        """A B^T in the compute dtype (the GEMM), in the accumulation dtype."""
        return self.to_acc(A @ B.T)

    def zeros(self, shape: Any) -> Any:
        """Zeros on the device in the accumulation dtype (the accumulators of the sums)."""
        return self.xp.zeros(shape, dtype=self.acc, device=self.device)

    def total(self, x: Any) -> Any:
        """The sum of all of x's entries in the accumulation dtype (a 0-d array)."""
        return self.xp.sum(self.to_acc(x))


@dataclass(frozen=True)
class Weights:
    """The weights and biases on the engine's device in its compute dtype (copied once)."""

    W: list[Any]
    b: list[Any]

    @classmethod
    def of(cls, prob: Any, arr: Arrays) -> Weights:
        return cls([arr.from_host(W) for W in prob.weights], [None if b is None else arr.from_host(b) for b in prob.biases])
