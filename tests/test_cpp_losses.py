"""The diagonal losses of the compiled core (loss=1 mse, loss=2 bce with logits; docs/numerics.md
section 5) against references that use none of the core's formulas:

* torch.autograd (float64): the dense Hessian of the summed loss over the flattened parameters,
  and the GGN J^T A J from the Jacobian of the logits (A = 2 I, or diag(sigma(z) sigma(-z)));
* where torch's float64 loses the answer (saturated bce: sigmoid(40) rounds to 1, so autograd
  gives delta = h = 0; a near-perfect mse fit), the 80-digit second-order jets of
  tests/mp_reference.py applied to the plain loss expression.

Also: the rounding allowances cover the observed errors, the rounding addition of section 5 is in
trace_abs and norms, and loss=0 is the default (cross-entropy's bits were compared with a
snapshot of the core before the losses were added, on this compiler, when they were added).
"""

from __future__ import annotations

import functools
import math

import ce_snapshot
import mp_reference as MPR
import numpy as np
import pytest
import reference as R
from wsbound_fast._backends.compiled import load_core

torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # tiny problems
F = torch.nn.functional
mp = MPR.mp

CE, MSE, BCE = 0, 1, 2
LOSSES = {"mse": MSE, "bce": BCE}
U = 2.0 ** -53
BATCH, GROUP = 3, 2

def _silu_derivatives(z):
    s = 1 / (1 + np.exp(-z))
    return s * (1 + z * (1 - s)), s * (1 - s) * (2 + z * (1 - 2 * s))


# activation name -> (core code, torch function, numpy (sigma', sigma''))
ACTS = {
    "tanh": (1, torch.tanh, lambda z: (1 - np.tanh(z) ** 2, -2 * np.tanh(z) * (1 - np.tanh(z) ** 2))),
    "softplus": (3, F.softplus, lambda z: (1 / (1 + np.exp(-z)), np.exp(-z) / (1 + np.exp(-z)) ** 2)),
    "silu": (6, F.silu, _silu_derivatives),
}


# --------------------------------------------------------------------------------------
# problems
# --------------------------------------------------------------------------------------


def make_problem(dims, acts, bias, loss, seed, n=7, targets="soft"):
    """A random MLP (layers as (W, b) with W (d_out, d_in)), inputs, targets for loss."""
    rng = np.random.default_rng(seed)
    layers = []
    for l, (i, o) in enumerate(zip(dims[:-1], dims[1:])):
        hb = bias if isinstance(bias, bool) else bias[l]
        layers.append((rng.normal(size=(o, i)) / np.sqrt(i), 0.3 * rng.normal(size=o) if hb else None))
    X = rng.normal(size=(n, dims[0]))
    C = dims[-1]
    if targets == "index":
        y = rng.integers(0, C, size=n).astype(np.int64)
    elif loss == MSE:
        y = rng.normal(size=(n, C))
    elif targets == "hard":
        y = (rng.random(size=(n, C)) < 0.5).astype(float)
    else:
        y = rng.random(size=(n, C))
    return layers, list(acts), X, y


def target_rows(y, C):
    if y.ndim == 1:
        Y = np.zeros((y.shape[0], C))
        Y[np.arange(y.shape[0]), y] = 1.0
        return Y
    return y


def core_args(layers, acts):
    return ([W for W, _ in layers], [b for _, b in layers], [ACTS[a][0] for a in acts], [0.0] * len(acts))


def param_slices(layers):
    out, k = [], 0
    for W, b in layers:
        n = W.size + (0 if b is None else b.size)
        out.append(slice(k, k + n))
        k += n
    return out


def flatten(layers):
    return np.concatenate([np.concatenate([W.ravel()] + ([] if b is None else [b])) for W, b in layers])


def numpy_forward(layers, acts, X):
    """Per layer l = 1..L: the augmented input a~_{l-1}, z_l; and sigma', sigma'' for l < L."""
    a, at, zs, sp, spp = X, [None], [None], [None], [None]
    for l, (W, b) in enumerate(layers):
        at.append(a if b is None else np.hstack([a, np.ones((a.shape[0], 1))]))
        z = a @ W.T + (0 if b is None else b)
        zs.append(z)
        if l < len(layers) - 1:
            d1, d2 = ACTS[acts[l]][2](z)
            sp.append(d1)
            spp.append(d2)
            a = {"tanh": np.tanh, "softplus": lambda v: np.logaddexp(0, v),
                 "silu": lambda v: v / (1 + np.exp(-v))}[acts[l]](z)
    return at, zs, sp, spp


# --------------------------------------------------------------------------------------
# torch references
# --------------------------------------------------------------------------------------


def _torch_loss(z, T, loss):
    if loss == MSE:
        return F.mse_loss(z, T, reduction="sum")
    return F.binary_cross_entropy_with_logits(z, T, reduction="sum")


@functools.cache
def _torch_refs_cached(key):
    layers, acts, X, y, loss = key.unpack()
    C = layers[-1][0].shape[0]
    logits = R._torch_logits_fn(layers, list(acts), X)
    T = torch.tensor(target_rows(y, C), dtype=torch.float64)
    theta = torch.tensor(flatten(layers), dtype=torch.float64)
    H = torch.autograd.functional.hessian(lambda t: _torch_loss(logits(t), T, loss), theta).numpy()
    J = torch.autograd.functional.jacobian(logits, theta).reshape(-1, theta.numel())
    z = logits(theta).reshape(-1)
    h = torch.full_like(z, 2.0) if loss == MSE else torch.sigmoid(z) * torch.sigmoid(-z)
    G = (J.T @ (h[:, None] * J)).numpy()
    return H, G


class Key:
    """A hashable handle on a problem (for the caches)."""

    def __init__(self, name, layers, acts, X, y, loss):
        self.name, self._v = name, (layers, acts, X, y, loss)

    def unpack(self):
        return self._v

    def __hash__(self):
        return hash(self.name)

    def __eq__(self, other):
        return self.name == other.name


def torch_per_sample(layers, acts, X, y, loss):
    """Per sample n: its Hessian H_n (P, P), and per layer l the diagonal of M_l = d^2 l_n / dz_l^2."""
    C = layers[-1][0].shape[0]
    T = torch.tensor(target_rows(y, C), dtype=torch.float64)
    theta = torch.tensor(flatten(layers), dtype=torch.float64)
    Hn, Md = [], []
    _, zs, _, _ = numpy_forward(layers, acts, X)
    L = len(layers)
    fns = [ACTS[a][1] for a in acts]
    for n in range(X.shape[0]):
        logits = R._torch_logits_fn(layers, list(acts), X[n:n + 1])
        Hn.append(torch.autograd.functional.hessian(
            lambda t, logits=logits, n=n: _torch_loss(logits(t), T[n:n + 1], loss), theta).numpy())
        diag = [None]
        for l in range(1, L + 1):
            def from_z(z, l=l, n=n):
                a = z
                for m in range(l, L + 1):
                    if m > l:
                        W, b = layers[m - 1]
                        a = a @ torch.tensor(W).T + (0 if b is None else torch.tensor(b))
                    if m < L:
                        a = fns[m - 1](a)
                return _torch_loss(a, T[n], loss)
            z0 = torch.tensor(zs[l][n], dtype=torch.float64)
            diag.append(np.diag(torch.autograd.functional.hessian(from_z, z0).numpy()))
        Md.append(diag)
    return Hn, Md


# --------------------------------------------------------------------------------------
# the extended-precision reference (jets of tests/mp_reference.py on the plain loss)
# --------------------------------------------------------------------------------------

MP_DIGITS = 80


@functools.cache
def _mp_refs_cached(key):
    """(H, GGN) as mpmath object arrays, from the jets of l = sum_k (z_k - y_k)^2 or
    sum_k log1p(exp(z_k)) - y_k z_k, at MP_DIGITS digits."""
    layers, acts, X, y, loss = key.unpack()
    C = layers[-1][0].shape[0]
    Y = target_rows(y, C)
    P = flatten(layers).size
    with mp.workdps(MP_DIGITS):
        H = np.full((P, P), mp.mpf(0), dtype=object)
        G = np.full((P, P), mp.mpf(0), dtype=object)
        allidx = np.arange(P)
        for n in range(X.shape[0]):
            pj = MPR._param_jets(layers)
            z = MPR._logit_jets(pj, [(a, 0.0) for a in acts], X[n])
            terms, coeffs, hs = [], [], []
            for k in range(C):
                t = mp.mpf(float(Y[n, k]))
                if loss == MSE:
                    d = z[k].shift(-t)
                    terms.append(MPR.mul(d, d))
                    coeffs.append(1)
                    hs.append(mp.mpf(2))
                else:
                    terms += [MPR.j_log1p(MPR.j_exp(z[k])), z[k]]
                    coeffs += [1, -t]
                    e = mp.exp(z[k].v)
                    hs.append(e / (1 + e) ** 2)
            ln = MPR.combine(terms, coeffs)
            H += ln.hessian(allidx)
            for k in range(C):
                g = np.full(P, mp.mpf(0), dtype=object)
                g[z[k].idx] = z[k].g
                G += hs[k] * np.outer(g, g)
    return H, G


def mp_moments(M, layers):
    """Per layer trace and per block pair |M_lm|_F^2, as mpmath numbers."""
    sl = param_slices(layers)
    L = len(layers)
    tr = [mp.fsum(np.diag(M[sl[l], sl[l]])) for l in range(L)]
    bl = [[mp.fsum((M[sl[l], sl[m]] ** 2).ravel()) if m >= l else mp.mpf(0) for m in range(L)] for l in range(L)]
    return tr, bl


# --------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------


def moments(core, layers, acts, X, y, loss, hessian, structured, f32=False):
    return core.moments(*core_args(layers, acts), X, y, hessian, structured, BATCH, GROUP, 1, None, f32, loss=loss)


def errors_vs(ref_tr, ref_bl, ref_scale_tr, ref_scale_bl, out):
    """(worst relative error of the per-layer traces, of the blocks, of tr, of |.|_F^2)."""
    tr, bl, _, _ = out
    L = tr.size
    e_tr = max(abs(tr[l] - ref_tr[l]) for l in range(L)) / ref_scale_tr
    e_bl = max(abs(bl[l, m] - ref_bl[l][m]) for l in range(L) for m in range(l, L)) / ref_scale_bl
    tot_tr = sum(ref_tr)
    tot_sq = sum(ref_bl[l][l] + 2 * sum(ref_bl[l][m] for m in range(l + 1, L)) for l in range(L))
    got_sq = bl.trace() + 2 * np.triu(bl, 1).sum()
    return (float(e_tr), float(e_bl), float(abs(tr.sum() - tot_tr) / ref_scale_tr),
            float(abs(got_sq - tot_sq) / ref_scale_bl))


def check_against_dense(core, layers, acts, X, y, loss, M, hessian, structured, tol, f32=False):
    sl = param_slices(layers)
    L = len(layers)
    ref_tr = [np.trace(M[sl[l], sl[l]]) for l in range(L)]
    ref_bl = [[np.sum(M[sl[l], sl[m]] ** 2) for m in range(L)] for l in range(L)]
    out = moments(core, layers, acts, X, y, loss, hessian, structured, f32)
    assert all(np.all(np.isfinite(a)) for a in out)
    errs = errors_vs(ref_tr, ref_bl, np.abs(np.diag(M)).sum(), np.sum(M ** 2), out)
    assert max(errs) < tol, errs
    return errs


# --------------------------------------------------------------------------------------
# against torch.autograd
# --------------------------------------------------------------------------------------

SPECS = [  # dims, activations, bias
    ((4, 3), (), True),
    ((4, 1), (), False),
    ((4, 6, 3), ("tanh",), True),
    ((4, 6, 1), ("softplus",), (False, True)),
    ((3, 5, 4, 3), ("tanh", "silu"), (True, False, True)),
    ((3, 5, 4, 1), ("softplus", "tanh"), True),
]
SPEC_IDS = [f"d{len(d) - 1}-C{d[-1]}-{'-'.join(a) or 'linear'}" for d, a, _ in SPECS]


def _problem(spec_i, loss, targets="soft"):
    dims, acts, bias = SPECS[spec_i]
    layers, acts, X, y = make_problem(dims, acts, bias, loss, seed=1000 + 10 * spec_i + loss, targets=targets)
    return Key(f"{spec_i}-{loss}-{targets}", layers, acts, X, y, loss)


@pytest.mark.parametrize("variant", list(ce_snapshot.cores()))
@pytest.mark.parametrize("spec_i", range(len(SPECS)), ids=SPEC_IDS)
@pytest.mark.parametrize("loss", [MSE, BCE], ids=["mse", "bce"])
@pytest.mark.parametrize("targets", ["soft", "hard"])
def test_moments_and_hvp_against_autograd(spec_i, loss, targets, variant):
    """Both CPU variants of the core (baseline, AVX2 + FMA where built), every depth, C = 1 and 3."""
    if loss == MSE and targets == "hard":
        targets = "index" if SPECS[spec_i][0][-1] > 1 else "soft"  # class indices: one-hot targets
    key = _problem(spec_i, loss, targets)
    layers, acts, X, y, _ = key.unpack()
    H, G = _torch_refs_cached(key)
    core = ce_snapshot.cores()[variant]
    L = len(layers)
    for hessian, M in ((True, H), (False, G)):
        for structured in (False, True):
            if hessian and L == 1 and structured:
                continue  # the Hessian of L = 1 never takes the K route
            check_against_dense(core, layers, acts, X, y, loss, M, hessian, structured, tol=1e-12)
        V = np.random.default_rng(7).normal(size=(2, M.shape[0]))
        got = core.hvp(*core_args(layers, acts), X, y, V, hessian, BATCH, 1, loss=loss)
        err = np.abs(got - V @ M).max() / (np.linalg.norm(M, 2) * np.linalg.norm(V[0]))
        assert err < 1e-13, err


@pytest.mark.parametrize("spec_i", [2, 4], ids=[SPEC_IDS[2], SPEC_IDS[4]])
@pytest.mark.parametrize("loss", [MSE, BCE], ids=["mse", "bce"])
def test_float32_gram_products(spec_i, loss):
    """f32=True: the Gram products in float32 (widened before every sum), to float32 accuracy."""
    key = _problem(spec_i, loss)
    layers, acts, X, y, _ = key.unpack()
    H, G = _torch_refs_cached(key)
    for hessian, M in ((True, H), (False, G)):
        for structured in (False, True):
            check_against_dense(load_core(), layers, acts, X, y, loss, M, hessian, structured, tol=1e-5, f32=True)


def test_class_indices_are_one_hot_targets():
    """mse with int64 class indices equals mse with the one-hot rows, bitwise."""
    key = _problem(4, MSE, "index")
    layers, acts, X, y, _ = key.unpack()
    core = load_core()
    Y = target_rows(y, 3)
    for hessian in (True, False):
        for structured in (True, False):
            a = moments(core, layers, acts, X, y, MSE, hessian, structured)
            b = moments(core, layers, acts, X, Y, MSE, hessian, structured)
            assert all(np.array_equal(p, q) for p, q in zip(a, b))


# --------------------------------------------------------------------------------------
# against the extended-precision jets: saturated bce, a near-perfect mse fit
# --------------------------------------------------------------------------------------


def saturated_bce(C):
    """Logits ~ +-40 (the last bias) with matching hard targets: delta and h of size e^-40."""
    dims = (3, 4, C) if C > 1 else (3, 4, 3, 1)
    acts = ("tanh",) if C > 1 else ("tanh", "softplus")
    layers, acts, X, _ = make_problem(dims, acts, True, BCE, seed=77 + C, n=5)
    W, b = layers[-1]
    b = np.array([40.0, -40.0, 38.0][:C])
    layers[-1] = (0.5 * W, b)
    y = np.tile((b > 0).astype(float), (X.shape[0], 1))
    return Key(f"satbce-{C}", layers, acts, X, y, BCE)


def near_fit_mse():
    """Targets = the model's own float64 outputs + 1e-9: delta_L of size 2e-9 (z - y cancels)."""
    layers, acts, X, _ = make_problem((3, 5, 2), ("softplus",), True, MSE, seed=78, n=5)
    _, zs, _, _ = numpy_forward(layers, acts, X)
    return Key("nearfit", layers, acts, X, zs[-1] + 1e-9, MSE)


EXTREME = {"bce-saturated-C3": lambda: saturated_bce(3), "bce-saturated-C1": lambda: saturated_bce(1),
           "mse-near-fit": near_fit_mse}


def _allowance_gamma(layers, acts, X, structured, C):
    """A worst-case gamma in the shape of docs/numerics.md section 4 (f (gam_inner + 2 gam_chain)
    + c u + gam_sum), with the activation and loss conditioning from the actual pre-activations."""
    gam = lambda k: k * U / (1 - k * U)
    dims = [layers[0][0].shape[1]] + [W.shape[0] for W, _ in layers]
    L = len(layers)
    _, zs, _, _ = numpy_forward(layers, acts, X)
    cond = sum(2 * np.abs(zs[l]).max() for l in range(1, L)) + np.abs(zs[L]).max()
    k_chain = sum(3 * (dims[l - 1] + dims[l] + 1) for l in range(1, L + 1)) + 8 * (L - 1) + 2 * C + 4 * cond
    k_inner = max(d * e for d in dims for e in dims) + max(dims) + 1
    nb = math.ceil(X.shape[0] / BATCH)
    k_sum = 2 * BATCH + 2 * nb + L * L
    f, c = (2 * C + 1, 4 * C * C + 4) if structured else (4, 8)
    g = f * (gam(k_inner) + 2 * gam(k_chain)) + c * U + gam(k_sum)
    g1 = gam(k_chain) + gam(max(dims) + 2 * BATCH + 2 * nb + L + 8)
    return g, g1


@pytest.mark.parametrize("name", list(EXTREME))
def test_extreme_cases_against_jets(name):
    key = EXTREME[name]()
    layers, acts, X, y, loss = key.unpack()
    core = load_core()
    H, G = _mp_refs_cached(key)
    L, C = len(layers), layers[-1][0].shape[0]
    Ht, Gt = _torch_refs_cached(key)
    for hessian, M, Mt in ((True, H, Ht), (False, G, Gt)):
        with mp.workdps(MP_DIGITS):
            tr, bl = mp_moments(M, layers)
            scale_tr = mp.fsum(abs(v) for v in np.diag(M))
            scale_bl = mp.fsum((M ** 2).ravel())
        assert scale_bl > 0
        for structured in (False, True):
            if hessian and L == 1 and structured:
                continue
            out = moments(core, layers, acts, X, y, loss, hessian, structured)
            assert all(np.all(np.isfinite(a)) for a in out)
            errs = errors_vs(tr, bl, scale_tr, scale_bl, out)
            assert max(errs) < 1e-12, errs
            # the rounding allowances cover the observed errors, block by block
            g, g1 = _allowance_gamma(layers, acts, X, structured, C)
            trace, blocks, trace_abs, norms = out
            for l in range(L):
                assert abs(trace[l] - tr[l]) <= g1 * trace_abs[l]
                for m in range(l, L):
                    assert abs(blocks[l, m] - bl[l][m]) <= g * norms[l, m] ** 2
        with mp.workdps(MP_DIGITS):
            Mf = MPR.to_float(M)
        V = np.random.default_rng(3).normal(size=(2, Mf.shape[0]))
        got = core.hvp(*core_args(layers, acts), X, y, V, hessian, BATCH, 1, loss=loss)
        err = np.abs(got - V @ Mf).max() / (np.linalg.norm(Mf, 2) * np.linalg.norm(V[0]))
        assert err < 1e-13, err
        if hessian and name.startswith("bce"):  # autograd loses it: sigmoid(40) = 1, so delta = h = 0 at z = 40
            assert np.linalg.norm(Mt - Mf) > 1e-3 * np.linalg.norm(Mf)


# --------------------------------------------------------------------------------------
# the rounding addition (docs/numerics.md section 5)
# --------------------------------------------------------------------------------------


def spec_addition(layers, acts, X, y, loss):
    """The addition of the spec, written out in NumPy per sample: dtr (N, L+1) = sqrt(d_l) dM_l / u
    and dnu (N, L+1, L+1) = dnu^{lm} / u."""
    gam = lambda k: k * U / (1 - k * U)
    at, zs, sp, spp = numpy_forward(layers, acts, X)
    L, N = len(layers), X.shape[0]
    C = layers[-1][0].shape[0]
    Y = target_rows(y, C)
    E = None
    for l in range(1, L + 1):
        W, b = layers[l - 1]
        d_in = W.shape[1]
        m = np.abs(at[l][:, :d_in]) @ np.abs(W).T + (0 if b is None else np.abs(b))
        E = gam(d_in + 2) * m if l == 1 else (
            gam(d_in + 2) * m + (np.abs(sp[l - 1]) * E + 8 * U * np.abs(at[l][:, :d_in])) @ np.abs(W).T)
    z = zs[L]
    if loss == MSE:
        d = 2 * E + 4 * U * (np.abs(z) + np.abs(Y))
    else:
        t = np.exp(-np.abs(z))
        s, h = t / (1 + t), t / (1 + t) ** 2
        d = h * E + 4 * U * np.where(z >= 0, np.abs(1 - Y) + s, s + np.abs(Y))
    wn = [0.0] + [np.linalg.norm(W) for W, _ in layers]
    dims = [layers[0][0].shape[1]] + [W.shape[0] for W, _ in layers]
    dtr, dnu = np.zeros((N, L + 1)), np.zeros((N, L + 1, L + 1))
    for n in range(N):
        e, dM, s1, s2 = [0.0] * (L + 1), [0.0] * (L + 1), [0.0] * (L + 1), [0.0] * (L + 1)
        e[L] = np.linalg.norm(d[n])
        for l in range(L - 1, 0, -1):
            s1[l], s2[l] = np.abs(sp[l][n]).max(), np.abs(spp[l][n]).max()
            dg = wn[l + 1] * e[l + 1]
            e[l] = s1[l] * dg
            dM[l] = (s1[l] * wn[l + 1]) ** 2 * dM[l + 1] + s2[l] * dg
        for l in range(1, L + 1):
            dtr[n, l] = math.sqrt(dims[l]) * dM[l] / U
            tau = {l: 1.0}
            for m in range(l + 1, L + 1):
                tau[m] = wn[m] * s1[m - 1] * tau[m - 1]
            for m in range(l, L + 1):
                qn = 0.0
                if m == l + 1:
                    qn = np.linalg.norm(sp[l][n])
                elif m > l + 1:
                    qn = math.sqrt(dims[l]) * s1[m - 1] * tau[m - 1]
                dnu[n, l, m] = np.linalg.norm(at[l][n]) * (tau[m] * dM[m] * np.linalg.norm(at[m][n]) + e[m] * qn) / U
    return dtr, dnu


ADDITION_CASES = {"mse-d3": (4, MSE), "bce-d3": (4, BCE), "mse-d2-C1": (3, MSE), "bce-d2-C1": (3, BCE),
                  "bce-d1": (0, BCE)}


@pytest.mark.parametrize("case", list(ADDITION_CASES))
def test_rounding_addition_in_trace_abs_and_norms(case):
    """Hessian: trace_abs[l] = sum_n (|a~_{l-1}|^2 (sum_k |(M_l)_kk| + sqrt(d_l) dM_l / u)
    + c (2 |a~_{l-1}| ea + ea^2) sum_k |(M_l)_kk|) with M_l from autograd (the second term: the
    activations' errors, docs/numerics.md section 4), and norms[l, m] >= sum_n (|H_n^{lm}|_F (1 + c ea_l
    / |a~_{l-1}|) + dnu^{lm} / u) with H_n from autograd.  The GGN takes the activations' term only
    (trace_abs > trace, equal for one layer)."""
    spec_i, loss = ADDITION_CASES[case]
    key = _problem(spec_i, loss)
    layers, acts, X, y, _ = key.unpack()
    L = len(layers)
    Hn, Md = torch_per_sample(layers, acts, X, y, loss)
    dtr, dnu = spec_addition(layers, acts, X, y, loss)
    ea, _, c = R.activation_errors(layers, list(acts) if acts else "tanh", X)
    at, _, _, _ = numpy_forward(layers, acts, X)
    sl = param_slices(layers)
    core = load_core()
    for structured in (False, True) if L > 1 else (False,):
        _, _, trace_abs, norms = moments(core, layers, acts, X, y, loss, True, structured)
        for l in range(1, L + 1):
            a2 = np.sum(at[l] ** 2, axis=1)
            na = np.sqrt(a2)
            want = sum(a2[n] * (np.abs(Md[n][l]).sum() + dtr[n, l])
                       + c * (2 * na[n] + ea[n, l]) * ea[n, l] * np.abs(Md[n][l]).sum() for n in range(X.shape[0]))
            assert trace_abs[l - 1] == pytest.approx(want, rel=1e-10)
            for m in range(l, L + 1):
                low = sum(np.linalg.norm(Hn[n][sl[l - 1], sl[m - 1]]) * (1 + c * ea[n, l] / na[n]) + dnu[n, l, m]
                          for n in range(X.shape[0]))
                assert norms[l - 1, m - 1] >= low * (1 - 1e-12)
        if L > 1:
            assert dnu[:, 1:, L].sum() > 0 and ea[:, 2:].min() > 0  # both additions are there to be checked
        tr, _, ta, _ = moments(core, layers, acts, X, y, loss, False, structured)
        assert np.all(ta >= tr * (1 - 1e-14))
        assert np.allclose(ta, tr, rtol=1e-14) if L == 1 else np.all(ta[1:] > tr[1:])


# --------------------------------------------------------------------------------------
# the K route is the generic path's result; tiles; arguments
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", [MSE, BCE], ids=["mse", "bce"])
def test_tiles_reduce_to_moments_bitwise(loss):
    key = _problem(4, loss)
    layers, acts, X, y, _ = key.unpack()
    core = load_core()
    cuts = range(0, X.shape[0], BATCH)
    Xb, yb = [X[lo:lo + BATCH] for lo in cuts], [np.ascontiguousarray(y[lo:lo + BATCH]) for lo in cuts]
    nb = len(Xb)
    pairs = np.array([(i, j) for i in range(nb) for j in range(i, nb)], dtype=np.int64)
    for hessian in (True, False):
        for structured in (True, False):
            ref = moments(core, layers, acts, X, y, loss, hessian, structured)
            _, tr, ta, nu, po = core.pair_sums(*core_args(layers, acts), Xb, yb, pairs, hessian, structured, 1,
                                                  loss=loss)
            blocks = np.zeros_like(ref[1])
            t = 0
            for i in range(nb):
                acc = np.zeros_like(blocks)
                for j in range(i, nb):
                    acc += (1.0 if i == j else 2.0) * po[t]
                    t += 1
                blocks += acc
            sums = [np.zeros_like(ref[0]), np.zeros_like(ref[2]), np.zeros_like(ref[3])]
            for k in range(nb):
                sums[0] += tr[k]
                sums[1] += ta[k]
                sums[2] += nu[k]
            for a, b in zip((sums[0], blocks, sums[1], sums[2]), ref):
                assert np.array_equal(a, b)


def test_loss_code_is_validated():
    key = _problem(2, MSE)
    layers, acts, X, y, _ = key.unpack()
    core = load_core()
    args = core_args(layers, acts)
    V = np.zeros((1, flatten(layers).size))
    for bad in (-1, 3):
        with pytest.raises(ValueError, match="loss"):
            core.moments(*args, X, y, True, False, BATCH, GROUP, 1, None, False, loss=bad)
        with pytest.raises(ValueError, match="loss"):
            core.pair_sums(*args, [X], [y], np.array([[0, 0]]), True, False, 1, loss=bad)
        with pytest.raises(ValueError, match="loss"):
            core.hvp(*args, X, y, V, True, BATCH, 1, loss=bad)
    # one output: fine for the diagonal losses, still an error for cross-entropy
    key1 = _problem(3, BCE)
    layers1, acts1, X1, y1, _ = key1.unpack()
    assert np.isfinite(moments(core, layers1, acts1, X1, y1, BCE, True, True)[1]).all()
    with pytest.raises(ValueError, match="at least 2 outputs"):
        moments(core, layers1, acts1, X1, np.zeros(X1.shape[0], dtype=np.int64), CE, True, True)


# --------------------------------------------------------------------------------------
# cross-entropy: bitwise unchanged
# --------------------------------------------------------------------------------------


def test_loss_zero_is_the_default():
    """loss=0 (cross-entropy) given explicitly gives the bits of leaving it out."""
    W, b, a, p, X, y, V = ce_snapshot.problem(2, True)
    core = load_core()
    for h in (True, False):
        for s in (True, False):
            d = core.moments(W, b, a, p, X, y, h, s, 4, 2, 1)
            e = core.moments(W, b, a, p, X, y, h, s, 4, 2, 1, loss=0)
            assert all(np.array_equal(u, v) for u, v in zip(d, e))
        assert np.array_equal(core.hvp(W, b, a, p, X, y, V, h, 4, 1), core.hvp(W, b, a, p, X, y, V, h, 4, 1, loss=0))

