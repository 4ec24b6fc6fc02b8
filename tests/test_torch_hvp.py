"""The curvature-vector product on backend="torch" (CPU here): hvp, eigsh and
bound(exact=..., certify=...) equal the C++ backend's; tensors, devices, plans, errors.

tests/test_hvp.py holds the product against dense references for every backend (the
``hvp_backend`` fixture) and tests/test_errors.py the bad inputs; this file adds what is
specific to torch.  Skipped as a whole without torch.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import reference as R  # noqa: E402
import wsbound_fast as wsb  # noqa: E402
from test_certify import NET_SPECS  # noqa: E402
from test_eigsh import IDS as EIG_IDS, SPECS as EIG_SPECS  # noqa: E402
from test_errors import CASES, P_L  # noqa: E402
from test_torch_backend import _as_tensor, _error, _tensor_layers  # noqa: E402
from wsbound_fast import _backends as backends  # noqa: E402
from wsbound_fast._backends import torch as torch_backend  # noqa: E402
from wsbound_fast._planning import blocks as planning_blocks  # noqa: E402
from wsbound_fast._problem import validate as validation  # noqa: E402
from wsbound_fast._spectral import lanczos as spectral_lanczos  # noqa: E402

#: Relative agreement with the C++ backend (the products differ by rounding, ~1e-15).
TOL = 1e-10


@pytest.fixture(autouse=True)
def _one_thread(torch):  # the conftest fixture: torch with one intra-op thread
    yield


def _model(n: int = 23, seed: int = 4):
    spec = R.ModelSpec((4, 6, 5, 3), ("gelu", "tanh"), "alt", n=n, labels="soft", seed=seed)
    layers, X, y = spec.build()
    return layers, X, y, spec


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# --------------------------------------------------------------------------------------
# eigsh and bound(exact=, certify=) equal the C++ backend's
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", EIG_SPECS, ids=EIG_IDS)
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_eigsh_matches_cpp(spec, curvature, refs):
    layers, X, y = refs.model(spec)
    kw = dict(k=3, which="BE", activation=spec.activation_arg(), curvature=curvature, return_eigenvectors=True)
    vals, vecs = wsb.eigsh(layers, X, y, backend="torch", **{"activation": "tanh", **kw})
    ref_vals, ref_vecs = wsb.eigsh(layers, X, y, backend="cpp", **{"activation": "tanh", **kw})
    scale = float(np.abs(ref_vals).max())
    np.testing.assert_allclose(vals, ref_vals, rtol=0, atol=TOL * scale)
    # the same Lanczos run, so the same Ritz vectors (up to rounding), sign included
    np.testing.assert_allclose(vecs, ref_vecs, rtol=0, atol=1e-7)


EXACT_FIELDS = ("lambda_max", "lambda_min", "lambda_max_upper_deflated", "lambda_min_lower_deflated")


@pytest.mark.parametrize("spec", NET_SPECS, ids=lambda s: f"{s.activation}-d{s.depth}")
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_exact_and_certify_match_cpp(spec, curvature, refs):
    layers, X, y = refs.model(spec)
    kw = dict(activation=spec.activation_arg(), curvature=curvature, certify=4)
    got = wsb.bound(layers, X, y, backend="torch", **{"activation": "tanh", **kw})
    ref = wsb.bound(layers, X, y, backend="cpp", **{"activation": "tanh", **kw})
    assert got.backend == "torch" and got.lanczos_converged == ref.lanczos_converged
    assert got.certify_k == ref.certify_k
    scale = max(abs(ref.lambda_max), abs(ref.lambda_min))
    for name in EXACT_FIELDS:
        assert abs(getattr(got, name) - getattr(ref, name)) <= TOL * scale, name
    for name in ("lambda_max_bracket", "lambda_min_bracket"):
        np.testing.assert_allclose(getattr(got, name), getattr(ref, name), rtol=0, atol=TOL * scale)
    for name in ("lambda_max_residual", "lambda_min_residual", "certify_residual"):
        assert getattr(got, name) <= getattr(ref, name) + TOL * scale, name


@pytest.fixture
def device_basis(monkeypatch):
    """The Lanczos basis kept with the product in the torch backend's DeviceSpace (what a GPU
    gets) here on the CPU; counts the steps taken there."""
    monkeypatch.setattr(torch_backend, "uses_device_basis", lambda device: True)
    steps = []
    real = torch_backend.DeviceSpace.apply

    def apply(self, q):
        assert isinstance(q, torch.Tensor)
        steps.append(q.shape)
        return real(self, q)

    monkeypatch.setattr(torch_backend.DeviceSpace, "apply", apply)
    return steps


@pytest.mark.parametrize("spec", EIG_SPECS[::2], ids=EIG_IDS[::2])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_eigsh_device_basis_matches_cpp(spec, curvature, refs, device_basis):
    layers, X, y = refs.model(spec)
    kw = dict(k=3, which="BE", activation=spec.activation_arg(), curvature=curvature, return_eigenvectors=True)
    vals, vecs = wsb.eigsh(layers, X, y, backend="torch", **{"activation": "tanh", **kw})
    assert len(device_basis) >= 3
    ref_vals, ref_vecs = wsb.eigsh(layers, X, y, backend="cpp", **{"activation": "tanh", **kw})
    scale = float(np.abs(ref_vals).max())
    assert isinstance(vecs, np.ndarray) and vecs.shape == ref_vecs.shape
    np.testing.assert_allclose(vals, ref_vals, rtol=0, atol=TOL * scale)
    np.testing.assert_allclose(vecs, ref_vecs, rtol=0, atol=1e-7)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_exact_and_certify_device_basis_match_cpp(curvature, refs, device_basis):
    spec = NET_SPECS[0]
    layers, X, y = refs.model(spec)
    kw = dict(activation=spec.activation_arg(), curvature=curvature, certify=4)
    got = wsb.bound(layers, X, y, backend="torch", **{"activation": "tanh", **kw})
    assert len(device_basis) == got.lanczos_iterations
    ref = wsb.bound(layers, X, y, backend="cpp", **{"activation": "tanh", **kw})
    assert got.certify_k == ref.certify_k and got.lanczos_converged == ref.lanczos_converged
    scale = max(abs(ref.lambda_max), abs(ref.lambda_min))
    for name in EXACT_FIELDS:
        assert abs(getattr(got, name) - getattr(ref, name)) <= TOL * scale, name


def test_device_basis_only_when_it_fits(monkeypatch):
    """A basis of maxiter vectors over DEVICE_BASIS_SHARE of memory_limit stays on the host;
    an overflowing product raises the same FloatingPointError from the device space."""
    layers, X, y, spec = _model()
    monkeypatch.setattr(torch_backend, "uses_device_basis", lambda device: True)
    prob = torch_backend.validate_torch(layers, X, y, activation=spec.activation_arg(), curvature="hessian",
                                         reduction="mean", memory_limit=1 << 16)
    space = backends.make_matvec(prob, "torch").space
    P = prob.n_params
    rows = int(torch_backend.DEVICE_BASIS_SHARE * (1 << 16)) // (8 * P)
    assert 1 <= rows < P and space.holds(rows, P) and not space.holds(rows + 1, P)
    seen = []
    monkeypatch.setattr(torch_backend.DeviceSpace, "apply", lambda self, q: seen.append(1) or q)
    run = spectral_lanczos.lanczos(backends.make_matvec(prob, "torch"), P, wanted=lambda th: np.arange(1), n_wanted=1,
                           tol=0.0, maxiter=P, rng=np.random.default_rng(0))
    assert not seen and run.space is None and run.iterations > rows  # the basis stayed on the host
    monkeypatch.undo()
    with pytest.raises(FloatingPointError, match="overflowed"):
        torch_backend.DeviceSpace(lambda V: V * np.inf, 1.0, prob).apply(torch.ones(P, dtype=torch.float64))


def test_exact_with_float32_moments():
    """dtype="float32" is the moments' precision; Lanczos still runs on the float64 product."""
    layers, X, y, spec = _model()
    kw = dict(activation=spec.activation_arg(), exact=True)
    got = wsb.bound(layers, X, y, backend="torch", dtype="float32", **{"activation": "tanh", **kw})
    ref = wsb.bound(layers, X, y, backend="cpp", **{"activation": "tanh", **kw})
    assert abs(got.lambda_max - ref.lambda_max) <= TOL * abs(ref.lambda_max)
    assert abs(got.trace_sq - ref.trace_sq) <= 2e-5 * ref.trace_sq


# --------------------------------------------------------------------------------------
# inputs: tensors, modules, devices; the block plan
# --------------------------------------------------------------------------------------


def test_tensor_inputs_and_vectors():
    layers, X, y, spec = _model()
    act = spec.activation_arg()
    V = np.random.default_rng(0).standard_normal((R.n_params(layers), 3))
    ref = wsb.hvp(layers, X, y, V, activation=act, backend="cpp")
    t_layers = [(torch.tensor(W, requires_grad=True), None if b is None else torch.from_numpy(b)) for W, b in layers]
    for lay, XX, yy, VV in [
        (layers, X, y, V),
        (t_layers, torch.from_numpy(X), torch.from_numpy(y), torch.from_numpy(V)),
        (layers, torch.from_numpy(X).T.contiguous().T, y, torch.tensor(V, requires_grad=True)),  # non-contiguous X
    ]:
        got = wsb.hvp(lay, XX, yy, VV, activation=act, backend="torch")
        assert isinstance(got, np.ndarray) and got.shape == V.shape
        assert _rel(got, ref) <= TOL
    # a tensor v is accepted by every backend; float32 v is widened exactly
    v32 = torch.from_numpy(V[:, 0]).to(torch.float32)
    want = wsb.hvp(layers, X, y, v32.double().numpy(), activation=act, backend="cpp")
    for backend in ("cpp", "numpy", "torch"):
        assert _rel(wsb.hvp(layers, X, y, v32, activation=act, backend=backend), want) <= TOL


def test_torch_module():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 5), torch.nn.SiLU(), torch.nn.Linear(5, 3))
    X = torch.randn(13, 2, 3)
    y = torch.randint(0, 3, (13,))
    P = sum(p.numel() for p in model.parameters())
    v = torch.randn(P)
    ref = wsb.hvp(model, X, y, v)
    assert _rel(wsb.hvp(model, X, y, v, backend="torch"), ref) <= TOL
    np.testing.assert_allclose(wsb.eigsh(model, X, y, backend="torch"), wsb.eigsh(model, X, y), rtol=TOL)


@pytest.mark.parametrize("kw", [dict(batch_size=1), dict(batch_size=5), dict(batch_size=23), dict(batch_size=500),
                                dict(memory_limit="tight"), dict(memory_limit="tight", batch_size=4)])
def test_any_block_plan(kw):
    """Any batch size or memory limit (one-sample blocks, X streamed) gives the same product."""
    layers, X, y, spec = _model()
    if kw.get("memory_limit") == "tight":  # the smallest budget validation accepts (that of the moments
        # until hvp's validation asks for the products' plan: _backends.validate_for(moments=False))
        kw = dict(kw, memory_limit=validation.min_memory_limit(layers, "hessian", "torch"))
    V = np.random.default_rng(1).standard_normal((R.n_params(layers), 2))
    ref = wsb.hvp(layers, X, y, V, activation=spec.activation_arg(), backend="cpp")
    assert _rel(wsb.hvp(layers, X, y, V, activation=spec.activation_arg(), backend="torch", **kw), ref) <= TOL


def test_resident_and_streamed_data_agree_bitwise(monkeypatch):
    """X on the device once (the default when it fits) or moved block by block: same numbers,
    and the same on every call."""
    layers, X, y, spec = _model()
    V = np.random.default_rng(2).standard_normal((R.n_params(layers), 2))
    kw = dict(activation=spec.activation_arg(), backend="torch", batch_size=6)
    resident = wsb.hvp(layers, X, y, V, **{"activation": "tanh", **kw})
    assert np.array_equal(resident, wsb.hvp(layers, X, y, V, **{"activation": "tanh", **kw}))
    monkeypatch.setattr(torch_backend, "RESIDENT_DATA_SHARE", 0.0)
    assert np.array_equal(resident, wsb.hvp(layers, X, y, V, **{"activation": "tanh", **kw}))


def test_plan_and_host_budget():
    layers, X, y, spec = _model()
    prob = torch_backend.validate_torch(layers, X, y, activation="tanh", curvature="hessian", reduction="mean")
    # the Lanczos basis lives on the host: its budget is the host's, whatever the device's
    assert prob.host_memory_limit == planning_blocks.default_memory_limit()
    assert spectral_lanczos.basis_memory_limit(prob) == prob.host_memory_limit
    prob = torch_backend.validate_torch(layers, X, y, activation="tanh", curvature="hessian", reduction="mean",
                                         memory_limit=12345)
    assert spectral_lanczos.basis_memory_limit(prob) == prob.memory_limit == 12345
    big = validation.validate(layers, np.tile(X, (200, 1)), np.tile(y, (200, 1)), activation="tanh",
                             curvature="hessian", reduction="mean")
    assert planning_blocks.plan_hvp(big, 1, None).batch_size == 256
    assert planning_blocks.plan_hvp(big, 1, None, target_batch=torch_backend.GPU_PLAN["target_batch"]).batch_size == 2048


# --------------------------------------------------------------------------------------
# errors: the same type and message as the C++ backend, arrays or tensors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("layers", "X", "y", "kwargs"), [pytest.param(*c[1:5], id=c[0]) for c in CASES[::2]])
def test_bad_input_same_error_as_cpp(layers, X, y, kwargs):
    v = np.ones(P_L)
    cpp = _error(lambda: wsb.hvp(layers, X, y, v, backend="cpp", **{"activation": "tanh", **kwargs}))
    assert _error(lambda: wsb.hvp(layers, X, y, v, backend="torch", **{"activation": "tanh", **kwargs})) == cpp
    assert _error(lambda: wsb.hvp(_tensor_layers(layers), _as_tensor(X), _as_tensor(y), torch.from_numpy(v),
                                  backend="torch", **{"activation": "tanh", **kwargs})) == cpp
    assert _error(lambda: wsb.eigsh(layers, X, y, backend="torch", **{"activation": "tanh", **kwargs})) == \
        _error(lambda: wsb.eigsh(layers, X, y, backend="cpp", **{"activation": "tanh", **kwargs}))


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    ({"dtype": "float32"}, ValueError, r"dtype='float32' is not available for the curvature-vector product"),
    ({"dtype": torch.float32}, ValueError, r"dtype='float32' is not available"),
    ({"dtype": "float16"}, ValueError, r"dtype must be 'float64' or 'float32'"),
    ({"dtype": 3}, TypeError, r"dtype"),
    ({"device": "nonsense"}, ValueError, r"device.*nonsense"),
    ({"device": 5}, TypeError, r"device"),
    ({"device": "cuda:99"}, ValueError, r"device.*cuda"),
])
@pytest.mark.parametrize("fn", ["hvp", "eigsh"])
def test_bad_device_dtype(kwargs, exc, match, fn):
    layers, X, y, _ = _model()
    args = (np.ones(R.n_params(layers)),) if fn == "hvp" else ()
    with pytest.raises(exc, match=match):
        getattr(wsb, fn)(layers, X, y, *args, backend="torch", activation="tanh", **kwargs)


def test_float64_dtype_accepted_by_every_backend():
    layers, X, y, _ = _model()
    v = np.ones(R.n_params(layers))
    ref = wsb.hvp(layers, X, y, v, activation="tanh")
    for backend, dtype in [("cpp", "float64"), ("numpy", np.float64), ("torch", torch.float64)]:
        assert _rel(wsb.hvp(layers, X, y, v, activation="tanh", backend=backend, dtype=dtype), ref) <= TOL


def test_raises_before_any_work(monkeypatch):
    def boom(*args):  # pragma: no cover - must not run
        raise AssertionError("the product ran on invalid input")

    monkeypatch.setattr(torch_backend, "hvp_products", boom)
    for c in CASES[::5]:
        with pytest.raises(c[5], match=c[6]):
            wsb.hvp(c[1], c[2], c[3], np.ones(P_L), backend="torch", **{"activation": "tanh", **c[4]})
    layers, X, y, _ = _model()
    with pytest.raises(ValueError, match="v must have shape"):
        wsb.hvp(layers, X, y, np.ones(3), activation="tanh", backend="torch")
    with pytest.raises(ValueError, match="certify must satisfy"):
        wsb.bound(layers, X, y, activation="tanh", backend="torch", certify=0)


def test_not_converged_warning():
    layers, X, y, spec = _model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wsb.eigsh(layers, X, y, activation=spec.activation_arg(), backend="torch", tol=0.0, maxiter=3)
    assert any(issubclass(w.category, RuntimeWarning) and "did not reach tol" in str(w.message) for w in caught)
