"""Shared fixtures: the backend parameter, torch (optional), and memoised references.

Every test that computes something runs for every backend through the ``backend`` fixture:
cpp (the compiled core) and the one Python engine on NumPy and on torch (skipped without
torch); its test ids end in ``[...-cpp]`` / ``[...-numpy]`` / ``[...-torch]``, so
``pytest -k "not cpp"`` runs the Python engine alone (e.g. while the extension is not built).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import reference as R

BACKENDS = ("cpp", "numpy", "torch")


def pytest_configure(config: pytest.Config) -> None:
    # When a hypothesis test fails, hypothesis imports libcst to write a patch, and libcst
    # imports mypy_extensions.TypedDict, which warns; under filterwarnings = ["error"] that
    # turns the failure report into an INTERNALERROR.  Keep failures readable.
    config.addinivalue_line("filterwarnings",
                            "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """cpp, numpy and torch (on the CPU; skipped without torch): the compiled core and the one
    Python engine on its two array libraries."""
    if request.param == "torch":
        request.getfixturevalue("torch")
    return request.param


@pytest.fixture
def hvp_backend(backend: str) -> str:
    """The backends of the curvature-vector product: all of them (kept as a name for the tests
    of hvp, eigsh and exact=)."""
    return backend


@pytest.fixture(scope="session")
def torch():
    """torch, or skip the test when it is not installed."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)  # tiny problems: threads only add overhead (and noise)
    return torch


class References:
    """Models and reference curvature matrices, built once per session.

    Keys are :class:`reference.ModelSpec` (hashable) plus the curvature / reduction.
    ``model`` returns fresh copies, so a test may modify what it gets.
    """

    def __init__(self) -> None:
        self._models: dict = {}
        self._mats: dict = {}

    def model(self, spec: R.ModelSpec):
        if spec not in self._models:
            self._models[spec] = spec.build()
        layers, X, y = self._models[spec]
        return ([(W.copy(), None if b is None else b.copy()) for W, b in layers], X.copy(), y.copy())

    def _get(self, key, make: Callable[[], np.ndarray]) -> np.ndarray:
        if key not in self._mats:
            self._mats[key] = make()
        return self._mats[key]

    def torch(self, spec: R.ModelSpec, curvature: str, reduction: str) -> np.ndarray:
        """torch autograd Hessian or torch.func GGN (the caller requests the torch fixture)."""
        layers, X, y = self.model(spec)
        fn = R.torch_hessian if curvature == "hessian" else R.torch_ggn
        return self._get(("torch", spec, curvature, reduction),
                         lambda: fn(layers, spec.activation_arg(), X, y, reduction))

    def numpy(self, spec: R.ModelSpec, curvature: str, reduction: str) -> np.ndarray:
        """Finite-difference Hessian of the backprop gradient, or the backprop-Jacobian GGN."""
        layers, X, y = self.model(spec)
        fn = R.fd_hessian if curvature == "hessian" else R.ggn_reference
        return self._get(("numpy", spec, curvature, reduction),
                         lambda: fn(layers, spec.activation_arg(), X, y, reduction))


@pytest.fixture(scope="session")
def refs() -> References:
    return References()
