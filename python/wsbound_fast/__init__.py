"""wsbound_fast: exact tr(H), tr(H^2) and Wolkowicz-Styan eigenvalue bounds for MLP losses.

>>> import wsbound_fast as wsb
>>> res = wsb.bound(layers, X, y, activation="tanh")          # doctest: +SKIP
>>> res.lambda_max_upper                                       # doctest: +SKIP
"""

from __future__ import annotations

from types import ModuleType

from ._api import bound
from ._bounds import Bound, WSBounds, ws_bounds
from ._dense import dense_hessian

__all__ = ["Bound", "WSBounds", "bound", "dense_hessian", "ws_bounds", "__version__"]
__version__ = "0.1.0"


def _load_core() -> ModuleType:
    """The compiled core, with a helpful error when it is missing."""
    try:
        from . import _core
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(
            "wsbound_fast's compiled extension (_core) could not be imported: "
            f"{exc}. Reinstall with `pip install .` from the source tree (a C++17 compiler "
            "is needed), or pass backend='numpy' to use the NumPy implementation."
        ) from exc
    return _core
