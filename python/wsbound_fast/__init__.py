"""wsbound_fast: exact tr(H), tr(H^2) and Wolkowicz-Styan eigenvalue bounds for MLP losses.

>>> import wsbound_fast as wsb
>>> res = wsb.bound(layers, X, y, activation="tanh")          # doctest: +SKIP
>>> res.lambda_max_upper                                       # doctest: +SKIP

The public names are those below; everything else lives in private subpackages, one per
concern (docs/design.md, "Architecture"): ``_problem`` (validation), ``_planning`` (cost model
and block plans), ``_engine`` (the algorithm in Python), ``_backends`` (where it runs: the
compiled core, NumPy, torch), ``_spectral`` (bounds, rounding allowances, Lanczos,
certificates), ``_api`` (the functions below, and tracking during training: ``Tracker``,
``History``, ``plot_history``) and ``_cli`` (the command line and the demo).
"""

from __future__ import annotations

from ._api.bound import bound
from ._api.data import load_digits
from ._api.dense import dense_hessian
from ._api.plan import Plan, plan
from ._api.plotting import plot_history
from ._api.products import eigsh, hvp
from ._api.tracking import History, Record, Tracker
from ._problem.torch_input import from_torch
from ._spectral.bounds import Bound, LayerBound, WSBounds, ws_bounds
from ._version import __version__

__all__ = [
    "Bound", "History", "LayerBound", "Plan", "Record", "Tracker", "WSBounds", "bound", "dense_hessian", "eigsh",
    "from_torch", "hvp", "load_digits", "plan", "plot_history", "ws_bounds", "__version__",
]
