"""torch input: from_torch(), bound(module, tensors), and torch staying optional.

Each supported module type is checked three ways: bound(module) against bound(arrays) on
the same float64 weights (1e-12), against the dense Hessian torch.autograd computes of the
module itself (so the mapping module -> activation is checked against torch's own
forward), and once against reference.torch_hessian.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import reference as R
import wsbound_fast as wsb

TOL = 1e-12  # module path vs array path: the same arrays reach the engine
TOL_DENSE = 1e-9  # vs a dense autograd Hessian (as tests/test_exact.py)


def module_hessian(torch, module, X, y, reduction="mean"):
    """Dense Hessian of F.cross_entropy(module(X), y) over all parameters, in float64 (eval mode)."""
    from torch.func import functional_call

    m = copy.deepcopy(module).double().eval()
    names = [n for n, _ in m.named_parameters()]
    shapes = [p.shape for _, p in m.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for _, p in m.named_parameters()])
    Xt = torch.as_tensor(np.asarray(X, dtype=np.float64))
    yt = torch.as_tensor(np.asarray(y))

    def loss(theta):
        params, k = {}, 0
        for n, s in zip(names, shapes):
            size = int(np.prod(s))
            params[n] = theta[k:k + size].reshape(s)
            k += size
        return torch.nn.functional.cross_entropy(functional_call(m, params, (Xt,)), yt, reduction=reduction)

    H = torch.autograd.functional.hessian(loss, theta0).numpy()
    return 0.5 * (H + H.T)


def _tr_err(value, H):
    return R.trace_err(value, H)


def _modules(nn):
    """name -> (factory of the hidden-layer activation module, expected from_torch activation)."""
    return {
        "Tanh": (nn.Tanh, "tanh"),
        "Sigmoid": (nn.Sigmoid, "sigmoid"),
        "Softplus": (nn.Softplus, "softplus"),
        "Softplus-beta1-threshold30": (lambda: nn.Softplus(beta=1, threshold=30), "softplus"),
        "GELU": (nn.GELU, "gelu"),
        "GELU-tanh": (lambda: nn.GELU(approximate="tanh"), "gelu_tanh"),
        "SiLU": (nn.SiLU, "silu"),
        "ReLU": (nn.ReLU, "relu"),
        "ReLU-inplace": (lambda: nn.ReLU(inplace=True), "relu"),
        "LeakyReLU": (nn.LeakyReLU, ("leaky_relu", 0.01)),
        "LeakyReLU-0.2": (lambda: nn.LeakyReLU(0.2), ("leaky_relu", 0.2)),
        "Identity": (nn.Identity, "identity"),
    }


MODULE_NAMES = ["Tanh", "Sigmoid", "Softplus", "Softplus-beta1-threshold30", "GELU", "GELU-tanh", "SiLU", "ReLU",
                "ReLU-inplace", "LeakyReLU", "LeakyReLU-0.2", "Identity"]


def _data(torch, n=9, d=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    return X, y


def _seeded(torch, seed):
    torch.manual_seed(seed)


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_every_activation_module(torch, name):
    nn = torch.nn
    make, expected = _modules(nn)[name]
    _seeded(torch, 1)
    model = nn.Sequential(nn.Linear(5, 4), make(), nn.Linear(4, 4), make(), nn.Linear(4, 3)).double()
    X, y = _data(torch)
    layers, acts = wsb.from_torch(model)
    assert acts == [expected, expected]
    assert [W.shape for W, _ in layers] == [(4, 5), (4, 4), (3, 4)]
    assert all(W.dtype == np.float64 and b.dtype == np.float64 for W, b in layers)

    res_mod = wsb.bound(model, X, y)
    res_arr = wsb.bound(layers, X.numpy(), y.numpy(), activation=acts)
    assert R.rel(res_mod.trace, res_arr.trace) <= TOL
    assert R.rel(res_mod.trace_sq, res_arr.trace_sq) <= TOL
    assert res_mod.n_params == sum(p.numel() for p in model.parameters())

    H = module_hessian(torch, model, X.numpy(), y.numpy())
    assert _tr_err(res_mod.trace, H) <= TOL_DENSE
    assert R.trace_sq_err(res_mod.trace_sq, H) <= TOL_DENSE


def test_matches_reference_torch_hessian(torch):
    """The shared reference (tests/reference.py), on the arrays from_torch returns."""
    nn = torch.nn
    _seeded(torch, 2)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(approximate="tanh"), nn.Linear(6, 5), nn.SiLU(),
                          nn.Linear(5, 3))
    X, y = _data(torch, n=8, d=4)
    layers, acts = wsb.from_torch(model)
    for reduction in ("mean", "sum"):
        H = R.torch_hessian(layers, acts, X.numpy(), y.numpy(), reduction)
        res = wsb.bound(model, X, y, reduction=reduction)
        assert _tr_err(res.trace, H) <= TOL_DENSE and R.trace_sq_err(res.trace_sq, H) <= TOL_DENSE


def test_float32_module_and_tensors(torch):
    """A default float32 model: weights are upcast to float64 once; X stays float32."""
    nn = torch.nn
    _seeded(torch, 3)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    X, y = _data(torch)
    X32 = X.float().requires_grad_(True)
    layers = [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy()) for m in (model[0], model[2])]
    res_mod = wsb.bound(model, X32, y, activation="tanh")
    res_arr = wsb.bound(layers, X32.detach().numpy(), y.numpy(), activation="tanh")
    assert res_mod.trace == res_arr.trace and res_mod.trace_sq == res_arr.trace_sq
    res_mixed = wsb.bound(layers, X32, y, activation="tanh")  # arrays for the model, tensors for the data
    assert res_mixed.trace == res_arr.trace and res_mixed.trace_sq == res_arr.trace_sq
    Xb = X.to(torch.bfloat16)  # no NumPy dtype: read as float64
    res_bf = wsb.bound(layers, Xb, y, activation="tanh")
    assert res_bf.trace == wsb.bound(layers, Xb.double().numpy(), y.numpy(), activation="tanh").trace


def test_structure_variants(torch):
    """Leading Flatten (X of shape (N, 2, 3)), nested Sequential, Dropout, bias=False, LogSoftmax."""
    nn = torch.nn
    _seeded(torch, 4)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Sequential(nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Dropout(0.3)),
        nn.Sequential(nn.Sequential(nn.Linear(5, 4), nn.Sigmoid())),
        nn.Linear(4, 3),
        nn.LogSoftmax(dim=1),
    ).double()
    g = torch.Generator().manual_seed(5)
    X = torch.randn(10, 2, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=g)
    layers, acts = wsb.from_torch(model)
    assert acts == ["tanh", "sigmoid"]
    assert layers[0][1] is None and layers[1][1] is not None
    res = wsb.bound(model, X, y)
    res_arr = wsb.bound(layers, X.reshape(10, 6).numpy(), y.numpy(), activation=acts)
    assert R.rel(res.trace, res_arr.trace) <= TOL and R.rel(res.trace_sq, res_arr.trace_sq) <= TOL
    H = module_hessian(torch, model, X.numpy(), y.numpy())  # eval mode: Dropout is the identity
    assert _tr_err(res.trace, H) <= TOL_DENSE and R.trace_sq_err(res.trace_sq, H) <= TOL_DENSE


def test_single_linear_is_logistic_regression(torch):
    _seeded(torch, 6)
    lin = torch.nn.Linear(5, 3).double()
    X, y = _data(torch)
    assert wsb.from_torch(lin)[1] == []
    res = wsb.bound(lin, X, y, activation="tanh", curvature="ggn")
    H = module_hessian(torch, lin, X.numpy(), y.numpy())
    # for logistic regression the GGN is the Hessian
    assert _tr_err(res.trace, H) <= TOL_DENSE and R.trace_sq_err(res.trace_sq, H) <= TOL_DENSE
    assert wsb.bound(torch.nn.Sequential(lin), X, y, activation="tanh").trace == res.trace


def test_soft_label_tensor_ggn_and_dense_hessian(torch):
    nn = torch.nn
    _seeded(torch, 7)
    model = nn.Sequential(nn.Linear(5, 4), nn.Softplus(), nn.Linear(4, 3)).double()
    X, _ = _data(torch)
    Y = torch.softmax(torch.randn(9, 3, dtype=torch.float64), dim=1)
    layers, acts = wsb.from_torch(model)
    for curvature in ("hessian", "ggn"):
        a = wsb.bound(model, X, Y, curvature=curvature, reduction="sum")
        b = wsb.bound(layers, X.numpy(), Y.numpy(), activation=acts, curvature=curvature, reduction="sum")
        assert R.rel(a.trace, b.trace) <= TOL and R.rel(a.trace_sq, b.trace_sq) <= TOL
    D = wsb.dense_hessian(model, X, Y)
    np.testing.assert_allclose(D, wsb.dense_hessian(layers, X.numpy(), Y.numpy(), activation=acts), rtol=0, atol=0)


def test_weights_are_copies(torch):
    _seeded(torch, 8)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2)).double()
    layers, _ = wsb.from_torch(model)
    before = layers[0][0].copy()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    np.testing.assert_array_equal(layers[0][0], before)


def test_noncontiguous_tensor(torch):
    _seeded(torch, 9)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)).double()
    X, y = _data(torch)
    Xt = X.T.contiguous().T  # column-major view
    assert not Xt.is_contiguous()
    assert wsb.bound(model, Xt, y).trace == wsb.bound(model, X, y).trace


@pytest.mark.parametrize("activation", [None, "tanh", ["tanh", "tanh"], ("tanh",) * 2])
def test_activation_argument_consistent(torch, activation):
    nn = torch.nn
    _seeded(torch, 10)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = _data(torch)
    assert wsb.bound(model, X, y, activation=activation).trace == wsb.bound(model, X, y, activation="tanh").trace


@pytest.mark.parametrize("activation", ["relu", ["tanh", "relu"], ("leaky_relu", 0.02)])
def test_activation_argument_conflict_raises(torch, activation):
    nn = torch.nn
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    X, y = _data(torch)
    with pytest.raises(ValueError, match="disagrees with the torch module"):
        wsb.bound(model, X, y, activation=activation)


def test_leaky_slope_must_match(torch):
    nn = torch.nn
    model = nn.Sequential(nn.Linear(5, 4), nn.LeakyReLU(0.2), nn.Linear(4, 3))
    X, y = _data(torch)
    wsb.bound(model, X, y, activation=("leaky_relu", 0.2))
    with pytest.raises(ValueError, match="disagrees"):
        wsb.bound(model, X, y, activation="leaky_relu")  # default slope 0.01


def test_layer_list_needs_the_activation():
    """Plain (W, b) layers with hidden layers do not say which activation follows: no default
    (a ReLU model must not get tanh numbers); a module says it, and one layer needs none."""
    spec = R.ModelSpec((4, 5, 3), "tanh")
    layers, X, y = spec.build()
    for call in (lambda **k: wsb.bound(layers, X, y, **k), lambda **k: wsb.hvp(layers, X, y, np.ones(43), **k),
                 lambda **k: wsb.eigsh(layers, X, y, **k), lambda **k: wsb.dense_hessian(layers, X, y, **k)):
        with pytest.raises(ValueError, match="activation is required: the model has 1 hidden layer"):
            call()
        with pytest.raises(ValueError, match="activation is required"):
            call(activation=None)
    assert wsb.bound(layers[1:], np.ones((3, 5)), [0, 1, 2]).n_params == 18  # no hidden layer: nothing to say


def _bad_models(nn):
    """(id, model, exception, regex): every unsupported structure raises, naming the module and position."""
    L = nn.Linear

    class MyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = L(5, 3)

        def forward(self, x):
            return self.fc(x)

    class MySeq(nn.Sequential):
        pass

    return [
        ("batchnorm", nn.Sequential(L(5, 4), nn.BatchNorm1d(4), nn.Tanh(), L(4, 3)), ValueError,
         r"unsupported module BatchNorm1d at position 1"),
        ("elu", nn.Sequential(L(5, 4), nn.ELU(), L(4, 3)), ValueError, r"ELU at position 1"),
        ("softmax-last", nn.Sequential(L(5, 4), nn.Tanh(), L(4, 3), nn.Softmax(dim=1)), ValueError,
         r"Softmax at position 3"),
        ("act-after-last", nn.Sequential(L(5, 4), nn.Tanh(), L(4, 3), nn.Tanh()), ValueError,
         r"Tanh at position 3.*after the last Linear"),
        ("identity-after-last", nn.Sequential(L(5, 3), nn.Identity()), ValueError,
         r"Identity at position 1.*after the last Linear"),
        ("two-linears", nn.Sequential(L(5, 4), L(4, 3)), ValueError,
         r"Linear at position 1.*follows Linear '0' with no activation"),
        ("two-linears-dropout", nn.Sequential(L(5, 4), nn.Dropout(), L(4, 3)), ValueError,
         r"Linear at position 2.*no activation"),
        ("act-first", nn.Sequential(nn.Tanh(), L(5, 3)), ValueError, r"Tanh at position 0.*before the first Linear"),
        ("two-acts", nn.Sequential(L(5, 4), nn.Tanh(), nn.ReLU(), L(4, 3)), ValueError,
         r"ReLU at position 2.*follows the activation Tanh at position 1"),
        ("flatten-late", nn.Sequential(L(5, 4), nn.Tanh(), nn.Flatten(), L(4, 3)), ValueError,
         r"Flatten at position 2.*first module"),
        ("flatten-dims", nn.Sequential(nn.Flatten(start_dim=2), L(5, 3)), ValueError, r"Flatten.*start_dim=2"),
        ("softplus-beta", nn.Sequential(L(5, 4), nn.Softplus(beta=2), L(4, 3)), ValueError,
         r"Softplus at position 1.*beta=2"),
        ("softplus-threshold", nn.Sequential(L(5, 4), nn.Softplus(threshold=5), L(4, 3)), ValueError,
         r"Softplus at position 1.*threshold"),
        ("logsoftmax-middle", nn.Sequential(L(5, 4), nn.LogSoftmax(dim=1), L(4, 3)), ValueError,
         r"LogSoftmax at position 1.*last module"),
        ("logsoftmax-dim0", nn.Sequential(L(5, 3), nn.LogSoftmax(dim=0)), ValueError, r"LogSoftmax.*dim=0"),
        ("nested-position", nn.Sequential(L(5, 4), nn.Sequential(nn.Tanh(), nn.Conv1d(1, 1, 1)), L(4, 3)), ValueError,
         r"Conv1d at position 2 \(module '1\.1'\)"),
        ("empty", nn.Sequential(), ValueError, r"no Linear"),
        ("only-dropout", nn.Sequential(nn.Dropout()), ValueError, r"no Linear"),
        ("custom-module", MyNet(), TypeError, r"MyNet.*nn\.Sequential"),
        ("sequential-subclass", MySeq(L(5, 3)), TypeError, r"MySeq"),
        ("lazy", nn.Sequential(nn.LazyLinear(3)), ValueError, r"LazyLinear at position 0.*not initialised"),
    ]


BAD_IDS = ["batchnorm", "elu", "softmax-last", "act-after-last", "identity-after-last", "two-linears",
           "two-linears-dropout", "act-first", "two-acts", "flatten-late", "flatten-dims", "softplus-beta",
           "softplus-threshold", "logsoftmax-middle", "logsoftmax-dim0", "nested-position", "empty", "only-dropout",
           "custom-module", "sequential-subclass", "lazy"]


@pytest.mark.parametrize("case", BAD_IDS)
def test_unsupported_modules_raise(torch, case):
    bad = {c[0]: c[1:] for c in _bad_models(torch.nn)}
    assert sorted(bad) == sorted(BAD_IDS)
    model, exc, match = bad[case]
    with pytest.raises(exc, match=match):
        wsb.from_torch(model)
    X, y = _data(torch)
    with pytest.raises(exc, match=match):
        wsb.bound(model, X, y, activation="tanh")


def test_from_torch_rejects_non_modules(torch):
    with pytest.raises(TypeError, match="nn.Sequential"):
        wsb.from_torch([(np.ones((2, 2)), None)])


def test_tensor_shape_errors_name_the_argument(torch):
    model = torch.nn.Sequential(torch.nn.Linear(5, 3))
    X, y = _data(torch)
    with pytest.raises(ValueError, match=r"X has 4 features"):
        wsb.bound(model, X[:, :4], y, activation="tanh")
    with pytest.raises(ValueError, match=r"\by\b"):
        wsb.bound(model, X, y[:5], activation="tanh")


_NO_TORCH = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError
    import numpy as np
    import wsbound_fast as wsb
    rng = np.random.default_rng(0)
    layers = [(rng.normal(size=(4, 5)), np.zeros(4)), (rng.normal(size=(3, 4)), None)]
    X, y = rng.normal(size=(6, 5)), np.array([0, 1, 2, 0, 1, 2])
    res = wsb.bound(layers, X, y, activation="tanh")
    assert res.trace > 0
    wsb.dense_hessian(layers, X, y, activation="tanh")
    try:
        wsb.from_torch(object())
    except ImportError as exc:
        assert "PyTorch is needed" in str(exc), exc
    else:
        raise AssertionError("from_torch without torch did not raise")
    print("ok")
""")


def test_works_without_torch():
    """import wsbound_fast and the array path never need torch; from_torch says how to get it."""
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_import_does_not_import_torch():
    code = ("import sys, numpy as np, wsbound_fast as wsb; "
            "wsb.bound([(np.eye(3), None)], np.eye(3), np.arange(3), activation='tanh'); "
            "import wsbound_fast._cli.main, wsbound_fast._cli.files, wsbound_fast._cli.plot; "
            "print('torch' in sys.modules, 'matplotlib' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
