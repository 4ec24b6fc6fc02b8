"""Shared fixtures: the backend parameter, torch (optional), and memoised references.

Every test that computes something runs for both backends through the ``backend``
fixture; its test ids end in ``[...-cpp]`` / ``[...-numpy]``, so
``pytest -k "not cpp"`` runs the NumPy backend alone (e.g. while the extension is not
built).  Tests of the curvature-vector product (hvp, eigsh, errors) use ``hvp_backend``,
which adds ``[...-torch]`` where torch is installed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import reference as R

BACKENDS = ("cpp", "numpy")


def pytest_configure(config: pytest.Config) -> None:
    # When a hypothesis test fails, hypothesis imports libcst to write a patch, and libcst
    # imports mypy_extensions.TypedDict, which warns; under filterwarnings = ["error"] that
    # turns the failure report into an INTERNALERROR.  Keep failures readable.
    config.addinivalue_line("filterwarnings",
                            "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=BACKENDS + ("torch",))
def hvp_backend(request: pytest.FixtureRequest) -> str:
    """cpp, numpy and torch (on the CPU; skipped without torch)."""
    if request.param == "torch":
        request.getfixturevalue("torch")
    return request.param


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
