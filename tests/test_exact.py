"""tr(H) and tr(H^2) against independent dense references.

* a broad sweep (every activation x depth 1-4 x curvature, with reductions, label kinds
  and bias patterns rotated through the sweep) against torch autograd (float64);
* a representative subset against the pure-NumPy references (finite differences of a
  backprop gradient for the Hessian, backprop Jacobians for the GGN), which run without
  torch;
* self-checks of the references against each other;
* dense_hessian elementwise against torch.
"""

from __future__ import annotations

import numpy as np
import pytest

import reference as R
import wsbound_fast as wsb
from wsbound_fast._problem import validate as validation

TOL = 1e-9

ACTIVATIONS = ["tanh", "sigmoid", "softplus", "gelu", "gelu_tanh", "silu", "identity", "relu", "leaky_relu",
               ("leaky_relu", 0.2)]
# mixed widths, C = 2..4
DIMS = {
    1: (5, 3),
    2: (4, 7, 3),
    3: (3, 6, 4, 2),
    4: (4, 5, 6, 3, 4),
}
REDUCTIONS = ("mean", "sum")
LABELS = ("hard", "soft")
BIASES = ("all", "none", "alt", (False, True, True, False))


def _bias_for(depth: int, k: int):
    choice = BIASES[k % len(BIASES)]
    if isinstance(choice, tuple):
        return choice[:depth] if depth == 4 else "alt"
    return choice


def _act_id(a) -> str:
    if isinstance(a, tuple) and not isinstance(a[1], str):
        return f"{a[0]}{a[1]}"
    return "+".join(a) if isinstance(a, tuple) else a


def _sweep():
    """(spec, curvature, reduction) covering every activation, depth, curvature, reduction,
    label kind and bias pattern, without the full Cartesian product."""
    cases = []
    k = 0
    for ai, act in enumerate(ACTIVATIONS):
        for depth in (2, 3, 4):
            for ci, curv in enumerate(("hessian", "ggn")):
                red = REDUCTIONS[(depth + ci) % 2]
                lab = LABELS[(depth + ci + ai) % 2]
                spec = R.ModelSpec(DIMS[depth], act, _bias_for(depth, k), n=7 + k % 5, labels=lab, seed=100 + k)
                cases.append(pytest.param(spec, curv, red, id=f"{_act_id(act)}-d{depth}-{curv}-{red}-{lab}-{k}"))
                k += 1
    # depth 1 (no hidden activation): every curvature x reduction x labels, bias on / off
    for curv in ("hessian", "ggn"):
        for red in REDUCTIONS:
            for lab in LABELS:
                bias = "all" if (k % 2) else "none"
                spec = R.ModelSpec(DIMS[1], "tanh", bias, n=9, labels=lab, seed=100 + k)
                cases.append(pytest.param(spec, curv, red, id=f"d1-{curv}-{red}-{lab}-{bias}-{k}"))
                k += 1
    # one activation per hidden layer
    for acts in (("tanh", "relu"), ("gelu", "sigmoid", "silu"), ("softplus", "identity", "gelu_tanh"),
                 ("leaky_relu", "tanh", "softplus")):
        depth = len(acts) + 1
        for curv in ("hessian", "ggn"):
            spec = R.ModelSpec(DIMS[depth], acts, "alt", n=8, labels=LABELS[k % 2], seed=100 + k)
            red = REDUCTIONS[k % 2]
            cases.append(pytest.param(spec, curv, red, id=f"{_act_id(acts)}-{curv}-{red}-{k}"))
            k += 1
    # wider models, P ~ 300
    for dims, act, curv in (((8, 12, 10, 5), "tanh", "hessian"), ((9, 20, 6), "gelu", "ggn"),
                            ((8, 10, 9, 7, 4), "silu", "hessian"), ((8, 12, 10, 5), "sigmoid", "ggn"),
                            ((8, 10, 9, 7, 4), ("relu", "softplus", "gelu_tanh"), "hessian")):
        spec = R.ModelSpec(dims, act, "alt" if k % 2 else "all", n=12, labels=LABELS[k % 2], seed=100 + k)
        red = REDUCTIONS[k % 2]
        cases.append(pytest.param(spec, curv, red, id=f"wide-{_act_id(act)}-d{spec.depth}-{curv}-{red}-{k}"))
        k += 1
    return cases


SWEEP = _sweep()


def _check(res: wsb.Bound, ref: np.ndarray, spec: R.ModelSpec, curvature: str, reduction: str, backend: str,
           tol: float = TOL) -> None:
    assert res.n_params == ref.shape[0]
    assert res.n_samples == spec.n
    assert res.curvature == curvature and res.reduction == reduction and res.backend == backend
    e1, e2 = R.trace_err(res.trace, ref), R.trace_sq_err(res.trace_sq, ref)
    assert e1 <= tol, f"trace {res.trace!r} vs reference {np.trace(ref)!r}: rel err {e1:.2e}"
    assert e2 <= tol, f"trace_sq {res.trace_sq!r} vs reference {np.sum(ref * ref)!r}: rel err {e2:.2e}"


@pytest.mark.parametrize(("spec", "curvature", "reduction"), SWEEP)
def test_vs_torch(spec, curvature, reduction, backend, torch, refs):
    layers, X, y = refs.model(spec)
    res = wsb.bound(layers, X, y, activation=spec.activation_arg(), curvature=curvature, reduction=reduction,
                    backend=backend)
    _check(res, refs.torch(spec, curvature, reduction), spec, curvature, reduction, backend)


def _fd_subset():
    cases = []
    k = 0
    # every activation once with finite differences (relu kinks: data drawn away from z = 0)
    for ai, act in enumerate(ACTIVATIONS):
        depth = 2 + ai % 3
        margin = 0.05 if "relu" in _act_id(act) else 0.0
        spec = R.ModelSpec(DIMS[depth], act, _bias_for(depth, ai), n=6, labels=LABELS[ai % 2], seed=300 + k,
                           margin=margin)
        cases.append(pytest.param(spec, "hessian", REDUCTIONS[ai % 2], id=f"fd-{_act_id(act)}-d{depth}"))
        k += 1
    # every depth with the GGN reference (every activation family once)
    for depth, act in zip((1, 2, 3, 4, 2, 3, 4, 2, 3), ("tanh", "sigmoid", "gelu", "silu", "softplus", "gelu_tanh",
                                                        "relu", "identity", ("leaky_relu", 0.3))):
        spec = R.ModelSpec(DIMS[depth], act, _bias_for(depth, k), n=7, labels=LABELS[k % 2], seed=300 + k)
        cases.append(pytest.param(spec, "ggn", REDUCTIONS[k % 2], id=f"ggn-{_act_id(act)}-d{depth}"))
        k += 1
    # depth 1 and 4 Hessians by finite differences, sum reduction, soft labels, mixed activations
    for spec in (R.ModelSpec(DIMS[1], "tanh", "all", n=6, labels="soft", seed=350),
                 R.ModelSpec(DIMS[1], "tanh", "none", n=6, labels="hard", seed=351),
                 R.ModelSpec(DIMS[4], ("gelu", "tanh", "silu"), "alt", n=6, labels="soft", seed=352),
                 R.ModelSpec(DIMS[4], "softplus", (True, False, False, True), n=5, labels="hard", seed=353),
                 R.ModelSpec(DIMS[3], ("relu", "sigmoid"), "none", n=6, labels="soft", seed=354, margin=0.05),
                 R.ModelSpec((8, 12, 10, 5), "gelu_tanh", "alt", n=10, labels="soft", seed=355)):
        for red in REDUCTIONS:
            cases.append(pytest.param(spec, "hessian", red, id=f"fd-d{spec.depth}-{spec.bias}-{red}-{spec.seed}"))
    return cases


@pytest.mark.parametrize(("spec", "curvature", "reduction"), _fd_subset())
def test_vs_numpy_reference(spec, curvature, reduction, backend, refs):
    layers, X, y = refs.model(spec)
    res = wsb.bound(layers, X, y, activation=spec.activation_arg(), curvature=curvature, reduction=reduction,
                    backend=backend)
    _check(res, refs.numpy(spec, curvature, reduction), spec, curvature, reduction, backend)


def test_several_default_blocks(backend, torch, refs):
    """N > the default block size: the default plan streams several blocks."""
    spec = R.ModelSpec((3, 5, 4, 3), "tanh", "alt", n=600, labels="soft", seed=11)
    layers, X, y = refs.model(spec)
    plan = validation.validate(layers, X, y, activation="tanh", curvature="hessian", reduction="mean")
    assert plan.batch_size < 600
    for curvature in ("hessian", "ggn"):
        res = wsb.bound(layers, X, y, activation="tanh", curvature=curvature, backend=backend)
        _check(res, refs.torch(spec, curvature, "mean"), spec, curvature, "mean", backend)


def test_soft_rows_within_tolerance_of_one(backend, torch, refs):
    """Rows summing to 1 +- 1e-7 are accepted; the loss is -sum_k y_k log p_k for the given rows."""
    spec = R.ModelSpec((4, 5, 3), "gelu", "all", n=8, labels="soft", seed=12)
    layers, X, y = refs.model(spec)
    y = y * (1.0 + 1e-7 * np.linspace(-1.0, 1.0, y.shape[0]))[:, None]
    for curvature in ("hessian", "ggn"):
        ref = (R.torch_hessian if curvature == "hessian" else R.torch_ggn)(layers, "gelu", X, y, "sum")
        res = wsb.bound(layers, X, y, activation="gelu", curvature=curvature, reduction="sum", backend=backend)
        _check(res, ref, spec, curvature, "sum", backend)


@pytest.mark.parametrize("dims", [(1, 2), (1, 1, 2), (1, 3, 1, 2), (2, 1, 1, 1, 2), (3, 4, 10), (2, 3, 12, 2, 5)],
                         ids=lambda d: "x".join(map(str, d)))
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_degenerate_widths(dims, curvature, backend, torch, refs):
    """Width-1 inputs / hidden layers, two classes, many classes."""
    spec = R.ModelSpec(dims, "softplus", "alt" if len(dims) % 2 else "all", n=6, labels="soft" if dims[-1] > 2 else "hard",
                       seed=15 + len(dims))
    layers, X, y = refs.model(spec)
    res = wsb.bound(layers, X, y, activation="softplus", curvature=curvature, backend=backend)
    _check(res, refs.torch(spec, curvature, "mean"), spec, curvature, "mean", backend)


def test_sum_is_n_times_mean(backend, refs):
    spec = R.ModelSpec(DIMS[3], "silu", "alt", n=9, labels="soft", seed=13)
    layers, X, y = refs.model(spec)
    for curvature in ("hessian", "ggn"):
        m = wsb.bound(layers, X, y, activation="silu", curvature=curvature, reduction="mean", backend=backend)
        s = wsb.bound(layers, X, y, activation="silu", curvature=curvature, reduction="sum", backend=backend)
        assert R.rel(s.trace, 9 * m.trace) <= 1e-12
        assert R.rel(s.trace_sq, 81 * m.trace_sq) <= 1e-12


def test_single_sample(backend, refs):
    spec = R.ModelSpec(DIMS[2], "tanh", "all", n=1, labels="hard", seed=14)
    layers, X, y = refs.model(spec)
    for curvature in ("hessian", "ggn"):
        res = wsb.bound(layers, X, y, activation="tanh", curvature=curvature, backend=backend)
        _check(res, refs.numpy(spec, curvature, "mean"), spec, curvature, "mean", backend)


# ------------------------------------------------------------------------------------
# the references checked against each other (so a failure above points at the package)
# ------------------------------------------------------------------------------------

SELF_CHECK = [
    R.ModelSpec(DIMS[2], "gelu", "alt", n=5, labels="soft", seed=400),
    R.ModelSpec(DIMS[3], ("tanh", "softplus"), "none", n=5, labels="hard", seed=401),
    R.ModelSpec(DIMS[4], "silu", "all", n=4, labels="soft", seed=402),
    R.ModelSpec(DIMS[3], "leaky_relu", "all", n=5, labels="hard", seed=403, margin=0.05),
]


@pytest.mark.parametrize("spec", SELF_CHECK, ids=lambda s: f"{_act_id(s.activation)}-d{s.depth}")
def test_reference_gradient_vs_fd_loss(spec, refs):
    layers, X, y = refs.model(spec)
    acts = R.per_layer_activations(spec.activation_arg(), spec.depth - 1)
    Y = R.label_rows(y, spec.dims[-1])
    g = R.gradient(layers, acts, X, Y, "mean")
    g_fd = R.fd_gradient(layers, spec.activation_arg(), X, y, "mean")
    assert np.max(np.abs(g - g_fd)) <= 1e-10 * np.max(np.abs(g))


@pytest.mark.parametrize("spec", SELF_CHECK, ids=lambda s: f"{_act_id(s.activation)}-d{s.depth}")
def test_reference_fd_hessian_vs_torch(spec, torch, refs):
    for red in REDUCTIONS:
        H_fd, H_t = refs.numpy(spec, "hessian", red), refs.torch(spec, "hessian", red)
        assert np.max(np.abs(H_fd - H_t)) <= 1e-9 * np.max(np.abs(H_t))


@pytest.mark.parametrize("spec", SELF_CHECK, ids=lambda s: f"{_act_id(s.activation)}-d{s.depth}")
def test_reference_ggn_vs_torch(spec, torch, refs):
    for red in REDUCTIONS:
        G_np, G_t = refs.numpy(spec, "ggn", red), refs.torch(spec, "ggn", red)
        assert np.max(np.abs(G_np - G_t)) <= 1e-12 * np.max(np.abs(G_t))
        assert np.linalg.eigvalsh(G_t).min() >= -1e-12 * np.max(np.abs(G_t))  # J^T A J is PSD


def test_reference_linear_model_hessian_is_ggn(refs):
    """One affine layer: the logits are linear in theta, so H = J^T A J exactly."""
    spec = R.ModelSpec(DIMS[1], "tanh", "all", n=6, labels="soft", seed=404)
    H, G = refs.numpy(spec, "hessian", "mean"), refs.numpy(spec, "ggn", "mean")
    assert np.max(np.abs(H - G)) <= 1e-10 * np.max(np.abs(G))


def test_reference_jacobian_vs_fd_logits(refs):
    spec = R.ModelSpec(DIMS[3], ("gelu", "sigmoid"), "alt", n=3, labels="hard", seed=405)
    layers, X, _ = refs.model(spec)
    acts = R.per_layer_activations(spec.activation_arg(), 2)
    J = R.logit_jacobians(layers, acts, X)
    shapes, theta = R.layer_shapes(layers), R.flatten(layers)
    h = 1e-3
    for i in range(theta.size):
        col = 0.0
        for k, c in {1: 4 / 5, 2: -1 / 5, 3: 4 / 105, 4: -1 / 280}.items():
            tp, tm = theta.copy(), theta.copy()
            tp[i] += k * h
            tm[i] -= k * h
            col = col + c * (R.forward(R.unflatten(tp, shapes), acts, X)[0] - R.forward(R.unflatten(tm, shapes), acts, X)[0])
        np.testing.assert_allclose(J[:, :, i], col / h, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------
# dense_hessian, elementwise
# ------------------------------------------------------------------------------------

DENSE = [p for i, p in enumerate(SWEEP) if i % 3 == 0]


@pytest.mark.parametrize(("spec", "curvature", "reduction"), DENSE)
def test_dense_hessian_vs_torch(spec, curvature, reduction, torch, refs):
    layers, X, y = refs.model(spec)
    ref = refs.torch(spec, curvature, reduction)
    H = wsb.dense_hessian(layers, X, y, activation=spec.activation_arg(), curvature=curvature, reduction=reduction)
    assert H.shape == ref.shape
    assert np.array_equal(H, H.T) or np.max(np.abs(H - H.T)) <= 1e-14 * np.max(np.abs(H))
    scale = max(np.max(np.abs(ref)), np.finfo(float).tiny)
    assert np.max(np.abs(H - ref)) <= 1e-12 * scale


@pytest.mark.parametrize("spec", [R.ModelSpec(DIMS[4], ("gelu", "tanh", "silu"), "alt", n=6, labels="soft", seed=352),
                                  R.ModelSpec(DIMS[1], "tanh", "none", n=6, labels="hard", seed=351)],
                         ids=["d4", "d1"])
def test_dense_hessian_vs_numpy_reference(spec, refs):
    layers, X, y = refs.model(spec)
    for curvature in ("hessian", "ggn"):
        ref = refs.numpy(spec, curvature, "sum")
        H = wsb.dense_hessian(layers, X, y, activation=spec.activation_arg(), curvature=curvature, reduction="sum")
        assert np.max(np.abs(H - ref)) <= 1e-9 * np.max(np.abs(ref))


def test_dense_hessian_parameter_order_matches_torch_module(torch):
    """The flat order is torch.nn.Sequential.parameters(): W row-major then b, layer by layer."""
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(6, 3, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    params = list(model.parameters())
    shapes = [p.shape for p in params]

    def loss(flat):
        ps, k = [], 0
        for s in shapes:
            n = int(np.prod(s))
            ps.append(flat[k:k + n].reshape(s))
            k += n
        a = torch.tanh(X @ ps[0].T + ps[1])
        a = torch.tanh(a @ ps[2].T)
        return torch.nn.functional.cross_entropy(a @ ps[3].T + ps[4], y)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    ref = torch.autograd.functional.hessian(loss, flat).numpy()
    lin = [m for m in model if isinstance(m, nn.Linear)]
    layers = [(m.weight.detach().numpy(), None if m.bias is None else m.bias.detach().numpy()) for m in lin]
    H = wsb.dense_hessian(layers, X.numpy(), y.numpy(), activation="tanh")
    assert np.max(np.abs(H - ref)) <= 1e-12 * np.max(np.abs(ref))


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_per_block_moments_match_dense_blocks(curvature, backend, torch, refs):
    """Per-layer traces and <H^{lm}, H^{lm}> from the engine equal the dense Hessian's blocks."""
    from wsbound_fast import _backends as backends

    spec = R.ModelSpec(dims=(4, 5, 3, 3), bias=(True, False, True), seed=11, n=9)
    layers, X, y = refs.model(spec)
    ref = R.torch_hessian if curvature == "hessian" else R.torch_ggn
    H = ref(layers, "tanh", X, y, reduction="sum")
    prob = backends.validate_for(backend, layers, X, y, activation="tanh", curvature=curvature, reduction="sum",
                                 batch_size=4)
    trace, blocks = backends.moments(prob, backend)[:2]
    edges = np.cumsum([0] + [W.size + (0 if b is None else b.size) for W, b in layers])
    for l in range(len(layers)):
        sl = slice(edges[l], edges[l + 1])
        assert trace[l] == pytest.approx(np.trace(H[sl, sl]), rel=1e-10, abs=1e-12)
        for m in range(len(layers)):
            sm = slice(edges[m], edges[m + 1])
            want = np.sum(H[sl, sm] ** 2) if m >= l else 0.0
            assert blocks[l, m] == pytest.approx(want, rel=1e-10, abs=1e-12)
