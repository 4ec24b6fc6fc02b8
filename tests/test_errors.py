"""Every bad input raises ValueError or TypeError naming the argument, before any work."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import wsbound_fast as wsb
from wsbound_fast import _backends as backends
from wsbound_fast._api import bound as api_bound
from wsbound_fast._planning import blocks as planning_blocks
from wsbound_fast._problem import validate as validation


def _model():
    rng = np.random.default_rng(800)
    layers = [(rng.standard_normal((5, 4)), rng.standard_normal(5)),
              (rng.standard_normal((6, 5)), None),
              (rng.standard_normal((3, 6)), rng.standard_normal(3))]
    X = rng.standard_normal((7, 4))
    y = rng.integers(0, 3, 7)
    return layers, X, y


def _with(layers, i, W=None, b="keep"):
    out = list(layers)
    W0, b0 = out[i]
    out[i] = (W0 if W is None else W, b0 if isinstance(b, str) and b == "keep" else b)
    return out


def _nan_at(a: np.ndarray, value=math.nan) -> np.ndarray:
    a = np.array(a, dtype=float)
    a.flat[a.size // 2] = value
    return a


L, X0, Y0 = _model()
SOFT = np.full((7, 3), 1.0 / 3.0)

# (id, layers, X, y, extra kwargs, exception, regex naming the argument)
CASES = [
    # X
    ("X-1d", L, X0[0], Y0, {}, ValueError, r"\bX\b.*2-D"),
    ("X-3d", L, X0[None], Y0, {}, ValueError, r"\bX\b.*2-D"),
    ("X-scalar", L, 1.0, Y0, {}, ValueError, r"\bX\b"),
    ("X-wrong-width", L, X0[:, :3], Y0, {}, ValueError, r"\bX\b.*3 features.*layers\[0\].*4"),
    ("X-empty", L, np.zeros((0, 4)), np.zeros(0, dtype=int), {}, ValueError, r"\bX\b.*empty"),
    ("X-nan", L, _nan_at(X0), Y0, {}, ValueError, r"\bX\b.*NaN"),
    ("X-inf", L, _nan_at(X0, math.inf), Y0, {}, ValueError, r"\bX\b.*Inf"),
    ("X-float32-inf", L, _nan_at(X0, -math.inf).astype(np.float32), Y0, {}, ValueError, r"\bX\b.*Inf"),
    ("X-complex", L, X0.astype(complex), Y0, {}, TypeError, r"\bX\b.*real"),
    ("X-object", L, X0.astype(object), Y0, {}, TypeError, r"\bX\b"),
    ("X-strings", L, X0.astype(str), Y0, {}, TypeError, r"\bX\b"),
    ("X-bool", L, X0 > 0, Y0, {}, TypeError, r"\bX\b"),
    ("X-ragged", L, [[1.0, 2.0, 3.0, 4.0], [1.0]], Y0[:2], {}, TypeError, r"\bX\b"),
    ("X-None", L, None, Y0, {}, TypeError, r"\bX\b"),
    # weights and biases
    ("W-nan", _with(L, 1, W=_nan_at(L[1][0])), X0, Y0, {}, ValueError, r"layers\[1\] weight W.*NaN"),
    ("W-inf", _with(L, 0, W=_nan_at(L[0][0], -math.inf)), X0, Y0, {}, ValueError, r"layers\[0\] weight W.*Inf"),
    ("b-nan", _with(L, 2, b=_nan_at(L[2][1])), X0, Y0, {}, ValueError, r"layers\[2\] bias b.*NaN"),
    ("b-inf", _with(L, 0, b=_nan_at(L[0][1], math.inf)), X0, Y0, {}, ValueError, r"layers\[0\] bias b.*Inf"),
    ("W-complex", _with(L, 1, W=L[1][0].astype(complex)), X0, Y0, {}, TypeError, r"layers\[1\] weight W"),
    ("W-object", _with(L, 1, W=L[1][0].astype(object)), X0, Y0, {}, TypeError, r"layers\[1\] weight W"),
    ("W-strings", _with(L, 0, W=L[0][0].astype(str)), X0, Y0, {}, TypeError, r"layers\[0\] weight W"),
    ("b-complex", _with(L, 0, b=L[0][1].astype(complex)), X0, Y0, {}, TypeError, r"layers\[0\] bias b"),
    ("b-strings", _with(L, 2, b=L[2][1].astype(str)), X0, Y0, {}, TypeError, r"layers\[2\] bias b"),
    ("W-1d", _with(L, 1, W=L[1][0].ravel()), X0, Y0, {}, ValueError, r"layers\[1\] weight W.*2-D"),
    ("W-3d", _with(L, 1, W=L[1][0][None]), X0, Y0, {}, ValueError, r"layers\[1\] weight W.*2-D"),
    ("W-no-rows", _with(L, 0, W=np.zeros((0, 4)), b=None), X0, Y0, {}, ValueError, r"layers\[0\] weight W"),
    ("shapes-do-not-chain", _with(L, 1, W=np.ones((6, 4))), X0, Y0, {}, ValueError, r"layers\[1\].*do not chain|do not chain.*layers\[1\]"),
    ("shapes-do-not-chain-last", _with(L, 2, W=np.ones((3, 5))), X0, Y0, {}, ValueError, r"layers\[2\]"),
    ("bias-too-long", _with(L, 0, b=np.ones(6)), X0, Y0, {}, ValueError, r"layers\[0\] bias b.*shape"),
    ("bias-2d", _with(L, 2, b=np.ones((3, 1))), X0, Y0, {}, ValueError, r"layers\[2\] bias b.*shape"),
    ("bias-scalar", _with(L, 2, b=1.0), X0, Y0, {}, ValueError, r"layers\[2\] bias b.*shape"),
    ("one-class", _with(L, 2, W=np.ones((1, 6)), b=np.ones(1)), X0, np.zeros(7, dtype=int), {}, ValueError,
     r"last layer.*at least 2 outputs"),
    # layers container
    ("layers-empty", [], X0, Y0, {}, ValueError, r"layers"),
    ("layers-array", np.ones((3, 2)), X0, Y0, {}, TypeError, r"layers"),
    ("layers-string", "layers", X0, Y0, {}, TypeError, r"layers"),
    ("layers-dict", {0: L[0]}, X0, Y0, {}, TypeError, r"layers"),
    ("layers-generator", (layer for layer in L), X0, Y0, {}, TypeError, r"layers"),
    ("layers-None", None, X0, Y0, {}, TypeError, r"layers"),
    ("layer-not-a-pair-1", [L[0], (L[1][0],), L[2]], X0, Y0, {}, TypeError, r"layers\[1\].*pair"),
    ("layer-not-a-pair-3", [L[0], L[1] + (None,), L[2]], X0, Y0, {}, TypeError, r"layers\[1\].*pair"),
    ("layer-bare-array", [L[0], L[1][0], L[2]], X0, Y0, {}, TypeError, r"layers\[1\].*pair"),
    ("layer-None", [L[0], None, L[2]], X0, Y0, {}, TypeError, r"layers\[1\].*pair"),
    # integer labels
    ("y-negative", L, X0, np.where(np.arange(7) == 3, -1, Y0), {}, ValueError, r"\by\b.*out of range"),
    ("y-equal-C", L, X0, np.where(np.arange(7) == 3, 3, Y0), {}, ValueError, r"\by\b.*out of range"),
    ("y-too-large", L, X0, np.full(7, 100), {}, ValueError, r"\by\b.*out of range"),
    ("y-non-integer", L, X0, np.where(np.arange(7) == 3, 1.5, Y0.astype(float)), {}, ValueError, r"\by\b.*integer"),
    ("y-nan", L, X0, _nan_at(Y0.astype(float)), {}, ValueError, r"\by\b"),
    ("y-too-short", L, X0, Y0[:-1], {}, ValueError, r"\by\b.*one label per sample"),
    ("y-too-long", L, X0, np.append(Y0, 0), {}, ValueError, r"\by\b.*one label per sample"),
    ("y-3d", L, X0, SOFT[None], {}, ValueError, r"\by\b"),
    ("y-scalar", L, X0, 1, {}, ValueError, r"\by\b"),
    ("y-complex", L, X0, Y0.astype(complex), {}, TypeError, r"\by\b"),
    ("y-strings", L, X0, Y0.astype(str), {}, TypeError, r"\by\b"),
    ("y-bool", L, X0, Y0 > 0, {}, TypeError, r"\by\b"),
    # soft labels
    ("soft-nan", L, X0, _nan_at(SOFT), {}, ValueError, r"\by\b.*NaN"),
    ("soft-inf", L, X0, _nan_at(SOFT, math.inf), {}, ValueError, r"\by\b.*Inf"),
    ("soft-negative", L, X0, np.tile([1.2, -0.2, 0.0], (7, 1)), {}, ValueError, r"\by\b.*non-negative"),
    ("soft-sum-not-1", L, X0, np.full((7, 3), 0.3), {}, ValueError, r"\by\b.*sum to 1"),
    ("soft-sum-1e-5-off", L, X0, SOFT * (1 + 1e-5), {}, ValueError, r"\by\b.*sum to 1"),
    ("soft-too-many-classes", L, X0, np.full((7, 4), 0.25), {}, ValueError, r"\by\b.*shape"),
    ("soft-too-few-classes", L, X0, np.full((7, 2), 0.5), {}, ValueError, r"\by\b.*shape"),
    ("soft-wrong-rows", L, X0, np.full((6, 3), 1 / 3), {}, ValueError, r"\by\b.*shape"),
    ("soft-complex", L, X0, SOFT.astype(complex), {}, TypeError, r"\by\b"),
    # names
    ("activation-unknown", L, X0, Y0, {"activation": "swish2"}, ValueError, r"activation.*swish2"),
    ("activation-unknown-in-list", L, X0, Y0, {"activation": ["tanh", "nope"]}, ValueError, r"activation\[1\].*nope"),
    ("activation-too-few", L, X0, Y0, {"activation": ["tanh"]}, ValueError, r"activation.*2.*got 1"),
    ("activation-too-many", L, X0, Y0, {"activation": ["tanh", "relu", "gelu"]}, ValueError, r"activation.*got 3"),
    ("activation-int", L, X0, Y0, {"activation": 3}, TypeError, r"activation"),
    ("activation-param-on-tanh", L, X0, Y0, {"activation": ("tanh", 0.5)}, ValueError, r"activation.*parameter"),
    ("activation-slope-nan", L, X0, Y0, {"activation": ("leaky_relu", math.nan)}, ValueError, r"activation.*slope"),
    ("activation-slope-string", L, X0, Y0, {"activation": ["tanh", ("leaky_relu", "x")]}, ValueError,
     r"activation\[1\].*slope"),
    ("curvature-unknown", L, X0, Y0, {"curvature": "fisher"}, ValueError, r"curvature.*fisher"),
    ("curvature-None", L, X0, Y0, {"curvature": None}, TypeError, r"curvature"),
    ("reduction-unknown", L, X0, Y0, {"reduction": "avg"}, ValueError, r"reduction.*avg"),
    ("reduction-int", L, X0, Y0, {"reduction": 1}, TypeError, r"reduction"),
    # numbers
    ("batch_size-0", L, X0, Y0, {"batch_size": 0}, ValueError, r"batch_size"),
    ("batch_size-negative", L, X0, Y0, {"batch_size": -1}, ValueError, r"batch_size"),
    ("batch_size-float", L, X0, Y0, {"batch_size": 2.5}, TypeError, r"batch_size"),
    ("batch_size-float-integral", L, X0, Y0, {"batch_size": 2.0}, TypeError, r"batch_size"),
    ("batch_size-bool", L, X0, Y0, {"batch_size": True}, TypeError, r"batch_size"),
    ("batch_size-string", L, X0, Y0, {"batch_size": "4"}, TypeError, r"batch_size"),
    ("threads-0", L, X0, Y0, {"threads": 0}, ValueError, r"threads"),
    ("threads-negative", L, X0, Y0, {"threads": -2}, ValueError, r"threads"),
    ("threads-float", L, X0, Y0, {"threads": 1.5}, TypeError, r"threads"),
    ("threads-absurd", L, X0, Y0, {"threads": 5_000_000}, ValueError, r"threads must be at most 4096"),
    ("threads-2**31", L, X0, Y0, {"threads": 2**31}, ValueError, r"threads must be at most 4096"),
    ("memory_limit-0", L, X0, Y0, {"memory_limit": 0}, ValueError, r"memory_limit"),
    ("memory_limit-float", L, X0, Y0, {"memory_limit": 1e9}, TypeError, r"memory_limit"),
]


@pytest.mark.parametrize(("layers", "X", "y", "kwargs", "exc", "match"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input(layers, X, y, kwargs, exc, match, backend):
    with pytest.raises(exc, match=match):
        wsb.bound(layers, X, y, backend=backend, **{"activation": "tanh", **kwargs})


@pytest.mark.parametrize(("layers", "X", "y", "kwargs", "exc", "match"),
                         [pytest.param(*c[1:], id=c[0]) for c in CASES
                          if not set(c[4]) & {"batch_size", "threads", "memory_limit"}])
def test_bad_input_dense_hessian(layers, X, y, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        wsb.dense_hessian(layers, X, y, **{"activation": "tanh", **kwargs})


@pytest.mark.parametrize("bad", ["fortran", "", "c++", None, 1])
def test_bad_backend(bad):
    exc = TypeError if not isinstance(bad, str) else ValueError
    with pytest.raises(exc, match="backend"):
        wsb.bound(L, X0, Y0, activation="tanh", backend=bad)


def test_backend_name_normalised():
    assert wsb.bound(L, X0, Y0, activation="tanh", backend=" NumPy ").backend == "numpy"


@pytest.mark.parametrize(("layers", "X", "y", "kwargs", "exc", "match"),
                         [pytest.param(*c[1:], id=c[0]) for c in CASES[::4]])
def test_raises_before_any_work(layers, X, y, kwargs, exc, match, backend, monkeypatch):
    """Validation happens before the backend is called (for either backend)."""

    def boom(*args):  # pragma: no cover - must not run
        raise AssertionError("the backend ran on invalid input")

    monkeypatch.setattr(api_bound, "moments", boom)
    with pytest.raises(exc, match=match):
        wsb.bound(layers, X, y, backend=backend, **{"activation": "tanh", **kwargs})


def test_inputs_not_modified(backend):
    layers, X, y = _model()
    X32 = X.astype(np.float32)
    copies = [(W.copy(), None if b is None else b.copy()) for W, b in layers]
    Xc, yc = X32.copy(), y.copy()
    wsb.bound(layers, X32, y, activation="tanh", backend=backend, batch_size=3)
    assert np.array_equal(X32, Xc) and np.array_equal(y, yc)
    for (W, b), (Wc, bc) in zip(layers, copies):
        assert np.array_equal(W, Wc) and (b is None or np.array_equal(b, bc))


def test_dense_hessian_refuses_large_models():
    rng = np.random.default_rng(801)
    layers = [(rng.standard_normal((200, 100)) * 0.1, rng.standard_normal(200)), (rng.standard_normal((2, 200)), None)]
    X = rng.standard_normal((2, 100))
    with pytest.raises(ValueError, match=r"bound\(\)"):
        wsb.dense_hessian(layers, X, np.array([0, 1]), activation="tanh")


def test_overflow_raises_floating_point_error(backend):
    """Finite inputs whose curvature overflows float64: a FloatingPointError, not inf / NaN results."""
    layers, X, y = _model()
    with warnings.catch_warnings():
        # NumPy may warn about the overflow on its way to the error; the error is the contract
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(FloatingPointError, match="overflow"):
            wsb.bound(layers, X * 1e200, y, activation="tanh", backend=backend)


P_L = sum(W.size + (0 if b is None else b.size) for W, b in L)


@pytest.mark.parametrize(("layers", "X", "y", "kwargs", "exc", "match"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input_hvp_and_eigsh(layers, X, y, kwargs, exc, match, hvp_backend):
    """hvp() and eigsh() validate as bound() does, on every backend of the product."""
    with pytest.raises(exc, match=match):
        wsb.hvp(layers, X, y, np.ones(P_L), backend=hvp_backend, **{"activation": "tanh", **kwargs})
    with pytest.raises(exc, match=match):
        wsb.eigsh(layers, X, y, backend=hvp_backend, **{"activation": "tanh", **kwargs})


def test_hvp_overflow_raises_floating_point_error(hvp_backend):
    """A finite v whose product overflows float64: a FloatingPointError, not inf / NaN results."""
    layers, X, y = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(FloatingPointError, match="overflow"):
            wsb.hvp(layers, X, y, np.full(P_L, 1e308), activation="tanh", reduction="sum", backend=hvp_backend)


# ------------------------------------------------------------------------------------
# limits: memory_limit below one sample's needs, threads clamped to the work
# ------------------------------------------------------------------------------------


def test_memory_limit_below_one_sample_names_the_minimum(backend):

    tight = validation.min_memory_limit(L, "hessian", backend)
    for small in (1, tight - 1):
        with pytest.raises(ValueError, match=rf"memory_limit = {small:,} bytes.* is below what one sample needs: "
                                             rf"at least {tight:,} bytes.*give memory_limit >= {tight} or None"):
            wsb.bound(L, X0, Y0, activation="tanh", backend=backend, memory_limit=small)
    ref = wsb.bound(L, X0, Y0, activation="tanh", backend=backend)
    res = wsb.bound(L, X0, Y0, activation="tanh", backend=backend, memory_limit=tight)  # the minimum itself is accepted
    assert res.trace == pytest.approx(ref.trace, rel=1e-12) and res.trace_sq == pytest.approx(ref.trace_sq, rel=1e-12)
    with pytest.raises(ValueError, match="below what one sample needs"):
        wsb.plan(L, 7, memory_limit=1)
    assert wsb.plan(L, 7).min_memory_limit == validation.min_memory_limit(L, "hessian", "cpp")


def test_threads_clamped_to_the_work():
    """threads beyond the block pairs one step runs at once, or the workers the budget holds,
    are not planned (nor allocated): the problem and wsb.plan report the clamped count."""

    kw = dict(activation="tanh", curvature="hessian", reduction="mean")
    small = backends.validate_for("cpp", L, X0, Y0, threads=4096, **kw)  # 7 samples: one block
    assert small.threads == 1 and wsb.plan(L, 7, threads=4096).threads == 1
    rng = np.random.default_rng(7)
    X, y = rng.standard_normal((2000, 4)), rng.integers(0, 3, 2000)
    prob = backends.validate_for("cpp", L, X, y, threads=4096, **kw)
    nb = -(-2000 // prob.batch_size)
    assert 1 < prob.threads <= planning_blocks._parallelism(2000, prob.batch_size, prob.group_blocks) <= nb * (nb + 1) // 2
    p = wsb.plan(L, 2000, threads=4096)
    assert (p.threads, p.batch_size, p.group_blocks) == (prob.threads, prob.batch_size, prob.group_blocks)
    # a budget that holds one worker: one thread
    tight = validation.min_memory_limit(L, "hessian", "cpp")
    assert backends.validate_for("cpp", L, X, y, threads=8, memory_limit=tight, **kw).threads == 1
    # results do not depend on it
    ref = wsb.bound(L, X, y, activation="tanh", threads=1, batch_size=100)
    res = wsb.bound(L, X, y, activation="tanh", threads=4096, batch_size=100)
    assert res.trace == pytest.approx(ref.trace, rel=1e-12) and res.trace_sq == pytest.approx(ref.trace_sq, rel=1e-12)


def test_threads_absurd_is_one_line_on_the_cli(tmp_path):
    """Not pybind11's 'incompatible function arguments' with the arrays dumped."""
    import subprocess
    import sys

    model, data = tmp_path / "m.npz", tmp_path / "d.npz"
    np.savez(model, W0=L[0][0], b0=L[0][1], W1=L[1][0], W2=L[2][0], b2=L[2][1])
    np.savez(data, X=X0, y=Y0)
    proc = subprocess.run([sys.executable, "-m", "wsbound_fast", "bound", str(model), str(data), "--activation",
                           "tanh", "--threads", str(2**31)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "threads must be at most 4096" in proc.stderr and "incompatible" not in proc.stderr


@pytest.mark.parametrize("layout", ["bias", "chain"])
def test_transposed_layer_says_so(layout, backend):
    """A (d_in, d_out) kernel (Flax, Keras) gets a message that names the fix, not only the shapes."""
    rng = np.random.default_rng(0)
    W0, W1 = rng.normal(size=(5, 3)), rng.normal(size=(2, 5))
    if layout == "bias":  # the first layer transposed, with its bias: the bias has W's first length
        layers = [(W0.T, rng.normal(size=5)), (W1, None)]
    else:  # the second layer transposed, no biases: the shapes do not chain, but W.T would
        layers = [(W0, None), (W1.T, None)]
    with pytest.raises(ValueError, match=r"looks like \(d_in, d_out\).*pass W\.T"):
        wsb.bound(layers, rng.normal(size=(4, 3)), np.array([0, 1, 1, 0]), activation="tanh", backend=backend)
    # a correct layout is not told so
    with pytest.raises(ValueError) as info:
        wsb.bound([(W0, rng.normal(size=4)), (W1, None)], rng.normal(size=(4, 3)), np.array([0, 1, 1, 0]),
                  activation="tanh", backend=backend)
    assert "W.T" not in str(info.value)
