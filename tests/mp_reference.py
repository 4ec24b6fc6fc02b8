"""Extended-precision curvature reference: second-order forward-mode AD over mpmath numbers.

Nothing here imports wsbound_fast, and nothing here uses a curvature formula: no delta, no
softmax Hessian in closed form, no features, no pair identities, no Gauss-Newton split of the
Hessian.  The only derivative rules are those of the elementary primitives (+, *, exp, log,
log1p, tanh, erfc, 1/x, relu) and the chain and product rules of a second-order jet, applied
mechanically to the plain loss expression

    loss_n = w_n * logsumexp(z_n) - sum_k y_nk z_nk,    w_n = sum_k y_nk,
    z_n = W_L s(... s(W_1 x_n + b_1) ...) + b_L,         loss = sum_n loss_n (/ N for "mean"),

with the activations written as compositions of the primitives (sigmoid = 1/(1 + exp(-z)),
softplus = log1p(exp(z)), gelu = z * erfc(-z/sqrt 2)/2, silu = z * sigmoid(z), ...).

A :class:`Jet` carries a value, its gradient and its Hessian with respect to the P parameters
(theta: layer by layer, W_l row-major (d_out, d_in), then b_l), stored on the support of
parameters it depends on (so the hidden layers stay cheap and only the loss is dense).

* Hessian: the Hessian part of the loss jet itself.
* GGN: J^T A J with J the gradient parts of the logit jets (the same AD) and A the Hessian of
  w * logsumexp(zeta) - y . zeta with respect to the C logits zeta, by the same AD over C
  seed variables (not the closed form w (diag p - p p^T)).

Precision.  The curvature of a saturated softmax (q = 1 - p_r tiny) comes out of the AD as a
difference of O(1) terms that cancel to O(q), so each sample is evaluated at
``DIGITS + log10(1/q_n)`` significant decimal digits (q_n from a first plain pass; the extra
capped at ``EXTRA_CAP``: a sample with q_n below 1e-460 contributes below ~1e-460 and its
absolute error is below 10^-(DIGITS + EXTRA_CAP)).  Every entry therefore keeps >= 60
significant digits relative to its own sample's scale; sums over samples and the moments are
taken at the largest precision used.  :func:`self_check` recomputes a model with 30 more digits.

Eigenvalues.  A 60-digit symmetric eigensolver (mpmath.eigsy) costs seconds even at P = 30,
so the extreme eigenvalues are refined instead: v from float64 ``eigh`` of the exact matrix
scaled by a power of two (exact) and rounded, then in mpmath the Rayleigh quotient rho = v^T H v /
v^T v (rho <= lambda_max, >= lambda_min: exact statements about the exact H) and the residual
r = H v - rho v.  By Kato-Temple, lambda_max lies in [rho, rho + |r|^2 / (rho - a)] whenever
lambda_2 <= a < rho, with a = the float64 lambda_2 plus a bound on the float64 eigenvalue error
(1e-12 |H|_F, far above eigh's backward error ~P u |H|_2); otherwise within |r| of rho
(Bauer-Fike).  That gives the extreme eigenvalues with an explicit error, typically ~1e-30
relative (float64 eigvalsh of the rounded matrix alone is only good to ~1e-16 |H|_2 absolute,
which is not enough to test brackets that are themselves tight to rounding).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from typing import Any

import mpmath
import numpy as np
from mpmath import mp, mpf

from reference import flatten, label_rows, per_layer_activations

#: Significant decimal digits kept (after the cancellation of a saturated softmax).
DIGITS = 60
#: Most extra digits spent on one sample's cancellation (see the module docstring).
EXTRA_CAP = 460

_EMPTY_IDX = np.zeros(0, dtype=np.int64)


# --------------------------------------------------------------------------------------
# second-order jets
# --------------------------------------------------------------------------------------


class Jet:
    """value v, gradient g and Hessian H over the sorted parameter indices idx; H is symmetric
    and stored packed: its upper triangle row by row (``np.triu_indices`` order)."""

    __slots__ = ("v", "idx", "g", "H")

    def __init__(self, v, idx: np.ndarray, g: np.ndarray, H: np.ndarray) -> None:
        self.v, self.idx, self.g, self.H = v, idx, g, H

    @staticmethod
    def const(v) -> "Jet":
        return Jet(v, _EMPTY_IDX, np.zeros(0, dtype=object), np.zeros(0, dtype=object))

    @staticmethod
    def var(v, i: int) -> "Jet":
        return Jet(v, np.array([i], dtype=np.int64), np.array([mpf(1)], dtype=object), np.zeros(1, dtype=object))

    def shift(self, c) -> "Jet":
        """self + c for a constant c (shares the derivative arrays)."""
        return Jet(self.v + c, self.idx, self.g, self.H)

    def hessian(self, idx: np.ndarray | None = None) -> np.ndarray:
        """The full symmetric Hessian on idx (default: its own support) as an object array."""
        idx = self.idx if idx is None else idx
        n = idx.size
        out = np.zeros((n, n), dtype=object)
        iu, ju = _triu(n)
        out[iu, ju] = _lift(self, idx)[1]
        out[ju, iu] = out[iu, ju]
        return out


_TRIU: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _triu(n: int) -> tuple[np.ndarray, np.ndarray]:
    if n not in _TRIU:
        _TRIU[n] = np.triu_indices(n)
    return _TRIU[n]


def _packed_positions(pos: np.ndarray, n: int) -> np.ndarray:
    """Where the packed upper triangle of a support embedded at the (increasing) positions pos
    of a support of size n goes in the packed upper triangle of the larger one."""
    iu, ju = _triu(pos.size)
    i, j = pos[iu], pos[ju]
    return i * n - (i * (i - 1)) // 2 + (j - i)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a is b or (a.shape == b.shape and np.array_equal(a, b))


def _lift(a: Jet, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a's gradient and packed Hessian on the larger support idx."""
    if _same(a.idx, idx):
        return a.g, a.H
    n = idx.size
    g = np.zeros(n, dtype=object)
    H = np.zeros(n * (n + 1) // 2, dtype=object)
    if a.idx.size:
        pos = np.searchsorted(idx, a.idx)
        g[pos] = a.g
        H[_packed_positions(pos, n)] = a.H
    return g, H


def combine(jets: list[Jet], coeffs: list | None = None) -> Jet:
    """sum_i c_i jets_i for constants c_i (default 1)."""
    if coeffs is None:
        coeffs = [1] * len(jets)
    idx = jets[0].idx
    for j in jets[1:]:
        if not _same(j.idx, idx):
            idx = np.union1d(idx, j.idx)
    n = idx.size
    v = 0
    g = np.zeros(n, dtype=object)
    H = np.zeros(n * (n + 1) // 2, dtype=object)
    for c, j in zip(coeffs, jets):
        v = v + c * j.v
        if not j.idx.size:
            continue
        if j.idx.size == n:  # the same support (a sorted subset of idx of the same size)
            g = g + (j.g * c if c != 1 else j.g)
            H = H + (j.H * c if c != 1 else j.H)
        else:
            pos = np.searchsorted(idx, j.idx)
            g[pos] += j.g * c
            H[_packed_positions(pos, n)] += j.H * c
    return Jet(v, idx, g, H)


def _outer_sym(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Packed a b^T + b a^T."""
    iu, ju = _triu(a.size)
    return a[iu] * b[ju] + b[iu] * a[ju]


def mul(a: Jet, b: Jet) -> Jet:
    """Product rule to second order."""
    if not b.idx.size:  # times a constant
        return Jet(a.v * b.v, a.idx, a.g * b.v, a.H * b.v)
    if not a.idx.size:
        return Jet(a.v * b.v, b.idx, b.g * a.v, b.H * a.v)
    idx = a.idx if _same(a.idx, b.idx) else np.union1d(a.idx, b.idx)
    ga, Ha = _lift(a, idx)
    gb, Hb = _lift(b, idx)
    return Jet(a.v * b.v, idx, gb * a.v + ga * b.v, Hb * a.v + Ha * b.v + _outer_sym(ga, gb))


def unary(a: Jet, f0, f1, f2) -> Jet:
    """Chain rule to second order: f(a) with f(a.v), f'(a.v), f''(a.v) = f0, f1, f2."""
    iu, ju = _triu(a.idx.size)
    return Jet(f0, a.idx, a.g * f1, a.H * f1 + (a.g[iu] * a.g[ju]) * f2)


def scale(a: Jet, c) -> Jet:
    return Jet(a.v * c, a.idx, a.g * c, a.H * c)


# the primitives: value, first and second derivative, each in a form without cancellation


def j_exp(a: Jet) -> Jet:
    e = mp.exp(a.v)
    return unary(a, e, e, e)


def j_log(a: Jet) -> Jet:
    r = 1 / a.v
    return unary(a, mp.log(a.v), r, -r * r)


def j_log1p(a: Jet) -> Jet:
    r = 1 / (1 + a.v)
    return unary(a, mp.log1p(a.v), r, -r * r)


def j_recip(a: Jet) -> Jet:
    r = 1 / a.v
    return unary(a, r, -r * r, 2 * r * r * r)


def j_tanh(a: Jet) -> Jet:
    t = mp.tanh(a.v)
    s2 = mp.sech(a.v) ** 2  # 1 - tanh^2 without the cancellation
    return unary(a, t, s2, -2 * t * s2)


def j_erfc(a: Jet) -> Jet:
    e = 2 / mp.sqrt(mp.pi) * mp.exp(-a.v * a.v)
    return unary(a, mp.erfc(a.v), -e, 2 * a.v * e)


def j_relu(a: Jet, slope=0) -> Jet:
    if a.v > 0:
        return unary(a, a.v, 1, 0)
    return unary(a, a.v * slope, slope, 0)


def activate(name: str, param: float, a: Jet) -> Jet:
    """The hidden-layer activations, as compositions of the primitives."""
    if name == "identity":
        return a
    if name == "tanh":
        return j_tanh(a)
    if name == "sigmoid":
        return j_recip(j_exp(scale(a, -1)).shift(1))
    if name == "softplus":
        return j_log1p(j_exp(a))
    if name == "gelu":  # z * Phi(z), Phi(z) = erfc(-z / sqrt 2) / 2
        return mul(a, scale(j_erfc(scale(a, -1 / mp.sqrt(2))), mpf(1) / 2))
    if name == "gelu_tanh":  # 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))
        inner = scale(combine([a, mul(mul(a, a), a)], [1, mpf(0.044715)]), mp.sqrt(2 / mp.pi))
        return scale(mul(a, j_tanh(inner).shift(1)), mpf(1) / 2)
    if name == "silu":
        return mul(a, j_recip(j_exp(scale(a, -1)).shift(1)))
    if name == "relu":
        return j_relu(a)
    if name == "leaky_relu":
        return j_relu(a, mpf(param))
    raise ValueError(f"unknown activation {name!r}")


# --------------------------------------------------------------------------------------
# the loss of one sample
# --------------------------------------------------------------------------------------


def _param_jets(layers) -> list[tuple[list[list[Jet]], list[Jet] | None]]:
    out, k = [], 0
    for W, b in layers:
        o, i = W.shape
        Wj = [[Jet.var(mpf(float(W[r, c])), k + r * i + c) for c in range(i)] for r in range(o)]
        k += o * i
        bj = None
        if b is not None:
            bj = [Jet.var(mpf(float(b[r])), k + r) for r in range(o)]
            k += o
        out.append((Wj, bj))
    return out


def _logit_jets(pj, acts, x: np.ndarray) -> list[Jet]:
    a: list[Jet] = [Jet.const(mpf(float(v))) for v in x]
    L = len(pj)
    for l, (Wj, bj) in enumerate(pj):
        z = []
        for r, row in enumerate(Wj):
            if l == 0:  # constant inputs: a linear combination of the parameters
                terms, coeffs = list(row), [aj.v for aj in a]
            else:
                terms, coeffs = [mul(w, aj) for w, aj in zip(row, a)], None
            if bj is not None:
                terms = terms + [bj[r]]
                coeffs = None if coeffs is None else coeffs + [1]
            z.append(combine(terms, coeffs))
        a = z if l == L - 1 else [activate(*acts[l], zi) for zi in z]
    return a


def _lse_loss(z: list[Jet], y_row) -> Jet:
    """w * logsumexp(z) - y . z, written out: m + log(sum_k exp(z_k - m)) with m = max z (a
    constant shift; mpmath does not overflow anyway)."""
    m = max(zk.v for zk in z)
    s = combine([j_exp(zk.shift(-m)) for zk in z])
    lse = j_log(s).shift(m)
    w = sum((mpf(float(t)) for t in y_row), mpf(0))
    terms, coeffs = [lse], [w]
    for zk, t in zip(z, y_row):
        if t != 0:
            terms.append(zk)
            coeffs.append(-mpf(float(t)))
    return combine(terms, coeffs)


def _mse_loss(z: list[Jet], y_row) -> Jet:
    """sum_k (z_k - y_k)^2, written out."""
    terms = []
    for zk, t in zip(z, y_row):
        d = zk.shift(-mpf(float(t)))
        terms.append(mul(d, d))
    return combine(terms)


def _bce_loss(z: list[Jet], y_row) -> Jet:
    """sum_k log1p(exp(z_k)) - y_k z_k (binary cross-entropy of the logits), written out."""
    terms, coeffs = [], []
    for zk, t in zip(z, y_row):
        terms += [j_log1p(j_exp(zk)), zk]
        coeffs += [mpf(1), -mpf(float(t))]
    return combine(terms, coeffs)


#: The per-sample loss expressions by name (the summed loss of one sample).
LOSS_EXPRESSIONS = {"cross_entropy": _lse_loss, "mse": _mse_loss, "bce": _bce_loss}


def _plain_logits(layers, acts, x) -> list:
    """The logits in mpmath without derivatives (for the precision of each sample)."""
    a = [mpf(float(v)) for v in x]
    for l, (W, b) in enumerate(layers):
        z = []
        for r in range(W.shape[0]):
            s = mp.fsum(mpf(float(W[r, c])) * a[c] for c in range(W.shape[1]))
            z.append(s + (mpf(float(b[r])) if b is not None else 0))
        if l < len(layers) - 1:
            z = [activate(*acts[l], Jet.const(zi)).v for zi in z]
        a = z
    return a


def sample_digits(layers, acts, x, loss: str = "cross_entropy") -> tuple[int, Any]:
    """(decimal digits to evaluate this sample at, q = 1 - max_k p_k in mpmath).  For bce, the
    AD's second derivative of log1p(e^z) cancels to e^-z: z / ln 10 extra digits."""
    with mp.workdps(DIGITS + 10):
        z = _plain_logits(layers, acts, x)
        if loss != "cross_entropy":
            top = max(z)
            extra = 0 if loss == "mse" or top <= 0 else int(math.ceil(float(top) / math.log(10))) + 2
            return DIGITS + 10 + min(extra, EXTRA_CAP), mpf(1)
        r = max(range(len(z)), key=lambda k: z[k])
        q = mp.fsum(mp.exp(zk - z[r]) for k, zk in enumerate(z) if k != r)
        qq = q / (1 + q)  # 1 - p_r
        extra = 0 if qq == 0 else max(0, int(math.ceil(-float(mp.log10(qq)))))
    return DIGITS + 10 + min(extra, EXTRA_CAP), +qq


# --------------------------------------------------------------------------------------
# the dense reference
# --------------------------------------------------------------------------------------


@dataclass(repr=False)
class MPReference:
    """Dense curvature matrices as mpmath numbers (object arrays), with the moments and
    extreme eigenvalues, and their float64 roundings."""

    H: np.ndarray  # P x P object array of mpf
    G: np.ndarray
    block_sizes: tuple[int, ...]
    digits: int  # the precision the sums were taken at
    q_min: Any  # smallest 1 - p_r over the samples (mpf)
    loss: Any  # the loss (mpf)
    logits: np.ndarray  # float64 (N, C)
    #: A bound on |M_computed - M_exact|_F per curvature (the AD's own rounding): added to the
    #: eigenvalue errors (Weyl).  See :func:`reference`.
    matrix_err: dict | None = None

    def __repr__(self) -> str:  # short: failing tests print their locals
        return (f"MPReference(P={self.H.shape[0]}, N={self.logits.shape[0]}, digits={self.digits}, "
                f"1 - p_r >= {mp.nstr(self.q_min, 3)}, loss={mp.nstr(self.loss, 3)})")

    def matrix(self, curvature: str) -> np.ndarray:
        return self.H if curvature == "hessian" else self.G

    def dense(self, curvature: str) -> np.ndarray:
        """The exact matrix rounded to float64 (entries below ~1e-308 become 0 or subnormal)."""
        return to_float(self.matrix(curvature))

    def moments(self, curvature: str, block: int | None = None) -> tuple[Any, Any]:
        """(tr, tr of the square) as mpf, of the whole matrix or of diagonal block ``block``."""
        cache = self.__dict__.setdefault("_mom", {})
        if (curvature, block) not in cache:
            M = self.matrix(curvature) if block is None else self.block(curvature, block)
            with mp.workdps(self.digits):
                cache[curvature, block] = (mp.fsum(M[i, i] for i in range(M.shape[0])),
                                           mp.fsum(e * e for e in M.ravel()))
        return cache[curvature, block]

    def trace_abs(self, curvature: str) -> Any:
        """sum_i |M_ii| (the scale of tr(M) when its terms have both signs)."""
        cache = self.__dict__.setdefault("_tabs", {})
        if curvature not in cache:
            M = self.matrix(curvature)
            with mp.workdps(self.digits):
                cache[curvature] = mp.fsum(abs(M[i, i]) for i in range(M.shape[0]))
        return cache[curvature]

    def block(self, curvature: str, l: int) -> np.ndarray:
        off = sum(self.block_sizes[:l])
        n = self.block_sizes[l]
        return self.matrix(curvature)[off:off + n, off:off + n]

    def extremes(self, curvature: str, block: int | None = None) -> "Extremes":
        key = (curvature, block)
        cache = self.__dict__.setdefault("_ext", {})
        if key not in cache:
            M = self.matrix(curvature) if block is None else self.block(curvature, block)
            e = extreme_eigenvalues(M, self.digits)
            own = (self.matrix_err or {}).get(curvature, 0)
            cache[key] = Extremes(e.lam_min, e.err_min + own, e.lam_max, e.err_max + own)
        return cache[key]


@dataclass(frozen=True)
class Extremes:
    """lambda_min in [lo_min, hi_min], lambda_max in [lo_max, hi_max] (mpf), and the Rayleigh
    quotients they come from; ``spread`` = max |lambda| (for tolerances)."""

    lam_min: Any
    err_min: Any
    lam_max: Any
    err_max: Any

    def contains_max(self, lo: float, hi: float, slack=0) -> bool:
        """Whether [lo, hi] (floats) can contain lambda_max: lo <= lam + err + slack and
        hi >= lam - err - slack (compared exactly in mpmath)."""
        return (mpf(lo) <= self.lam_max + self.err_max + slack) and (mpf(hi) >= self.lam_max - self.err_max - slack)

    def contains_min(self, lo: float, hi: float, slack=0) -> bool:
        return (mpf(lo) <= self.lam_min + self.err_min + slack) and (mpf(hi) >= self.lam_min - self.err_min - slack)


@dataclass(repr=False)
class DenseRef:
    """A float64 dense reference (e.g. :func:`hybrid_curvatures`) behind the interface of
    :class:`MPReference` that the tests use: moments, block sizes and extreme eigenvalues by
    ``eigvalsh``, each with the error ``rel_err`` * |M|_F (the reference's own accuracy plus
    eigvalsh's backward error)."""

    H: np.ndarray | None
    G: np.ndarray
    block_sizes: tuple[int, ...]
    rel_err: float = 1e-12
    digits: int = 30

    def __repr__(self) -> str:
        return f"DenseRef(P={self.G.shape[0]}, hessian={self.H is not None}, rel_err={self.rel_err:g})"

    def matrix(self, curvature: str) -> np.ndarray:
        M = self.H if curvature == "hessian" else self.G
        assert M is not None
        return M

    def dense(self, curvature: str) -> np.ndarray:
        return self.matrix(curvature)

    def block(self, curvature: str, l: int) -> np.ndarray:
        off = sum(self.block_sizes[:l])
        n = self.block_sizes[l]
        return self.matrix(curvature)[off:off + n, off:off + n]

    def moments(self, curvature: str, block: int | None = None) -> tuple[Any, Any]:
        M = self.matrix(curvature) if block is None else self.block(curvature, block)
        return mpf(float(np.trace(M))), mpf(float(np.sum(M * M)))

    def trace_abs(self, curvature: str) -> Any:
        return mpf(float(np.abs(np.diag(self.matrix(curvature))).sum()))

    def extremes(self, curvature: str, block: int | None = None) -> Extremes:
        key = (curvature, block)
        cache = self.__dict__.setdefault("_ext", {})
        if key not in cache:
            M = self.matrix(curvature) if block is None else self.block(curvature, block)
            try:  # torch's LAPACK on torch's (test: one) thread; OpenBLAS's threads can spin for
                # seconds on a loaded machine at this size (P ~ 600)
                import torch

                w = torch.linalg.eigvalsh(torch.as_tensor(M)).numpy()
            except ImportError:  # pragma: no cover
                w = np.linalg.eigvalsh(M)
            err = mpf(self.rel_err * float(np.sqrt(np.sum(M * M))))
            cache[key] = Extremes(mpf(float(w[0])), err, mpf(float(w[-1])), err)
        return cache[key]


def block_sizes(layers) -> tuple[int, ...]:
    return tuple(int(np.size(W) + (0 if b is None else np.size(b))) for W, b in layers)


def to_float(M: np.ndarray) -> np.ndarray:
    return np.vectorize(float, otypes=[np.float64])(M) if M.size else np.zeros(M.shape)


def _pow2_scale(M: np.ndarray) -> int:
    """k with 2^k max|M| ~ 1 (0 for a zero matrix)."""
    mx = max((abs(e) for e in M.ravel()), default=mpf(0))
    if mx == 0:
        return 0
    return -int(mp.floor(mp.log(mx, 2)))


def extreme_eigenvalues(M: np.ndarray, digits: int) -> Extremes:
    """The extreme eigenvalues of the symmetric mpf matrix M with certified errors (see the
    module docstring: float64 eigh of M 2^k, then Rayleigh quotient and Kato-Temple in mpmath)."""
    n = M.shape[0]
    with mp.workdps(digits):
        k = _pow2_scale(M)
        Ms = np.vectorize(lambda e: float(mp.ldexp(e, k)), otypes=[np.float64])(M)
        w, V = np.linalg.eigh(0.5 * (Ms + Ms.T))
        fro = math.sqrt(float(np.sum(Ms * Ms)))
        eps = 1e-12 * fro + 1e-300
        out = []
        for j, nb in ((n - 1, n - 2), (0, 1)):
            v = [mpf(float(t)) for t in V[:, j]]
            Mv = [mp.fsum(mp.ldexp(M[i, c], k) * v[c] for c in range(n)) for i in range(n)]
            vv = mp.fsum(t * t for t in v)
            rho = mp.fsum(a * b for a, b in zip(v, Mv)) / vv
            rn = mp.sqrt(mp.fsum((a - rho * b) ** 2 for a, b in zip(Mv, v)) / vv)
            if n == 1:
                err = rn
            else:
                gap = abs(rho - mpf(float(w[nb]))) - eps
                if gap > rn:  # Kato-Temple: rho is within |r|^2 / gap of the extreme eigenvalue
                    err = min(rn, rn * rn / gap)
                else:  # a cluster: Weyl, |lambda - w| <= eps, and rho lies between them
                    err = max(rn, abs(rho - mpf(float(w[j]))) + eps)
            out.append((mp.ldexp(rho, -k), mp.ldexp(err, -k)))
        (lmax, emax), (lmin, emin) = out
    return Extremes(lmin, emin, lmax, emax)


# --------------------------------------------------------------------------------------
# mid-size models: a float64 reference without the softmax cancellation
# --------------------------------------------------------------------------------------


def logit_derivatives(z_row, y_row) -> tuple[np.ndarray, np.ndarray]:
    """(gradient, Hessian) of w logsumexp(z) - y . z w.r.t. the C logits, by the AD above at
    DIGITS + log10(1/q) digits, rounded to float64 (each entry to within half an ulp)."""
    C = len(z_row)
    zf = [float(t) for t in z_row]
    with mp.workdps(DIGITS + 10):
        zm = [mpf(t) for t in zf]
        r = max(range(C), key=lambda k: zm[k])
        q = mp.fsum(mp.exp(t - zm[r]) for k, t in enumerate(zm) if k != r)
        extra = 0 if q == 0 else max(0, int(math.ceil(-float(mp.log10(q)))))
    with mp.workdps(DIGITS + 10 + min(extra, EXTRA_CAP)):
        zeta = [Jet.var(mpf(t), k) for k, t in enumerate(zf)]
        jet = _lse_loss(zeta, y_row)
        return to_float(_lift(jet, np.arange(C))[0]), to_float(jet.hessian(np.arange(C)))


def hybrid_curvatures(layers, activation, X, y, reduction: str = "mean", *,
                      hessian: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """(Hessian, GGN) of a mid-size model (P in the thousands) in float64, free of the softmax
    cancellation: per-sample logit Jacobians J_n = dz_n/dtheta by torch.func.jacrev (float64),
    the logit gradient d_n and Hessian A_n of the loss w.r.t. z_n from :func:`logit_derivatives`
    (mpmath AD, so exact to rounding however saturated), and

        GGN = sum_n J_n^T A_n J_n,    Hessian = GGN + d^2/dtheta^2 [sum_n d_n . z_n(theta)]

    (the second-order chain rule, with d_n held fixed; the second term by torch autograd
    double backward, float64), /N for "mean".  ``hessian=False``: the GGN only (H is None).  Not torch.autograd.functional.hessian of
    F.cross_entropy w.r.t. the logits for A: torch forms its diagonal entry p_r (1 - p_r)
    with 1 - p_r rounded, which is pure noise once 1 - p_r < 1e-16 (checked in the tests).
    Every entry is a float64 sum of terms no larger than the result's scale, so it is accurate
    to ~1e-15 relative, not to 60 digits (tests/test_saturation.py checks it against
    :func:`reference` on saturated tiny models).
    """
    import torch

    from reference import _torch_logits_fn

    fn = _torch_logits_fn(layers, activation, X)
    C = layers[-1][0].shape[0]
    Y = label_rows(y, C)
    theta0 = torch.as_tensor(flatten(layers))
    with torch.no_grad():
        Z = fn(theta0).numpy()
    N = Z.shape[0]
    D = np.zeros((N, C))
    A = np.zeros((N, C, C))
    for n in range(N):
        D[n], A[n] = logit_derivatives(Z[n], Y[n])
    with torch.no_grad():
        J = torch.func.jacrev(fn)(theta0)  # (N, C, P)
        B = torch.einsum("nkl,nlq->nkq", torch.as_tensor(A), J)
        G = torch.einsum("nkp,nkq->pq", J, B)
    G = G.numpy() / (N if reduction == "mean" else 1)
    if not hessian:
        return None, 0.5 * (G + G.T)
    Dt = torch.as_tensor(D)

    def resid(theta):
        return (Dt * fn(theta)).sum()

    with warnings.catch_warnings():  # torch.func's first forward-mode call imports a deprecated torch.jit path
        warnings.simplefilter("ignore", DeprecationWarning)
        R = torch.func.jacfwd(torch.func.grad(resid))(theta0).detach().numpy()  # forward over reverse
    H = G + R / (N if reduction == "mean" else 1)
    return 0.5 * (H + H.T), 0.5 * (G + G.T)


def hybrid_reference(layers, activation, X, y, reduction: str = "mean", curvature: str = "hessian") -> np.ndarray:
    """One of :func:`hybrid_curvatures`."""
    H, G = hybrid_curvatures(layers, activation, X, y, reduction, hessian=curvature == "hessian")
    return H if curvature == "hessian" else G


_CACHE: dict[str, MPReference] = {}


def _key(layers, activation, X, y, reduction, loss="cross_entropy") -> str:
    h = hashlib.sha256()
    for W, b in layers:
        h.update(np.ascontiguousarray(W, dtype=np.float64).tobytes())
        h.update(b"-" if b is None else np.ascontiguousarray(b, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(X, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(y).tobytes() + str(np.asarray(y).dtype).encode())
    h.update(repr((activation, reduction, np.shape(X), np.shape(y), loss)).encode())
    return h.hexdigest()


def reference(layers, activation, X, y, reduction: str = "mean", *, extra_digits: int = 0,
              loss: str = "cross_entropy") -> MPReference:
    """The Hessian and GGN of the loss at ``layers`` (a list of (W, b), b may be None),
    memoised per model (within the process).  ``activation`` as bound()'s argument.  ``loss``:
    "cross_entropy", "mse" or "bce" (y: (N, C) target rows, or class indices as one-hot rows);
    "mean" divides by N for cross-entropy and by N C for mse and bce (torch's conventions)."""
    key = _key(layers, activation, X, y, reduction, loss) + f"/{extra_digits}"
    expr = LOSS_EXPRESSIONS[loss]
    if key in _CACHE:
        return _CACHE[key]
    layers = [(np.asarray(W, dtype=np.float64), None if b is None else np.asarray(b, dtype=np.float64))
              for W, b in layers]
    X = np.asarray(X, dtype=np.float64)
    C = layers[-1][0].shape[0]
    Y = label_rows(y, C)
    acts = per_layer_activations(activation, len(layers) - 1)
    P = int(flatten(layers).size)
    sizes = tuple(int(W.size + (0 if b is None else b.size)) for W, b in layers)
    N = X.shape[0]
    prec = [sample_digits(layers, acts, X[n], loss) for n in range(N)]
    top = max(d for d, _ in prec) + extra_digits
    full = np.arange(P)
    iu, ju = _triu(P)
    Hp = np.zeros(iu.size, dtype=object)  # packed upper triangles, summed over the samples
    Gp = np.zeros(iu.size, dtype=object)
    total = mpf(0)
    loss_name = loss
    logits = np.zeros((N, C))
    own = {"hessian": mpf(0), "ggn": mpf(0)}  # bounds on the AD's rounding error, |.|_F
    for n in range(N):
        with mp.workdps(prec[n][0] + extra_digits):
            pj = _param_jets(layers)
            z = _logit_jets(pj, acts, X[n])
            ln = expr(z, Y[n])
            # GGN: the Hessian of the same loss expression w.r.t. the logits, by the same AD
            zeta = [Jet.var(zk.v, k) for k, zk in enumerate(z)]
            A = expr(zeta, Y[n]).hessian(np.arange(C))
            J = np.zeros((C, P), dtype=object)
            for k, zk in enumerate(z):
                J[k, zk.idx] = zk.g
            B = A.dot(J)  # J^T A J, upper triangle: sum_k J[k, i] B[k, j]
            Gn = J[0][iu] * B[0][ju]
            for k in range(1, C):
                Gn = Gn + J[k][iu] * B[k][ju]
            Hn = _lift(ln, full)[1]
            # sample n was evaluated at prec[n] digits, DIGITS + 10 beyond the cancellation of
            # its softmax (capped): its entries are right to 10^-(DIGITS + 10) of its own size,
            # or to 10^-(DIGITS + 10 + EXTRA_CAP) of |J_n|^2 (a capped, negligible sample);
            # 10^5 of slack for the length of the chains of roundings
            with mp.workdps(20):
                jn = mp.fsum(e * e for e in J.ravel())
                floor = mpf(10) ** (-(DIGITS + 10 + EXTRA_CAP) + 5) * jn
                for curv, Mn in (("hessian", Hn), ("ggn", Gn)):
                    fro = mp.sqrt(2 * mp.fsum(e * e for e in Mn))
                    own[curv] += mpf(10) ** (-(DIGITS + 5)) * fro + floor
        with mp.workdps(top):
            Hp = Hp + Hn
            Gp = Gp + Gn
            total = total + ln.v
        logits[n] = [float(zk.v) for zk in z]
    with mp.workdps(top):
        if reduction == "mean":
            div = N if loss_name == "cross_entropy" else N * C
            Hp = Hp / div
            Gp = Gp / div
            total = total / div
        H = np.zeros((P, P), dtype=object)
        G = np.zeros((P, P), dtype=object)
        H[iu, ju] = Hp
        H[ju, iu] = Hp
        G[iu, ju] = Gp
        G[ju, iu] = Gp
    ref = MPReference(H, G, sizes, top, min(q for _, q in prec), total, logits, own)
    _CACHE[key] = ref
    return ref


def self_check(layers, activation, X, y, reduction="mean", extra: int = 30) -> float:
    """Largest relative difference of the moments between the reference and one computed with
    ``extra`` more digits (should be below 10^-DIGITS)."""
    a = reference(layers, activation, X, y, reduction)
    b = reference(layers, activation, X, y, reduction, extra_digits=extra)
    worst = mpf(0)
    with mp.workdps(b.digits):
        for curv in ("hessian", "ggn"):
            for x, x2 in zip(a.moments(curv), b.moments(curv)):
                if x2 != 0:
                    worst = max(worst, abs(x - x2) / abs(x2))
    return float(worst)


def mp_rel(value: float, ref, scale=None) -> float:
    """|value - ref| / max(|ref|, scale) in mpmath (value a float), as a float."""
    den = abs(ref) if scale is None else max(abs(ref), abs(scale))
    d = abs(mpf(value) - ref)
    if den == 0:
        return 0.0 if d == 0 else math.inf
    return float(d / den)


__all__ = ["DIGITS", "DenseRef", "Extremes", "block_sizes", "Jet", "MPReference", "extreme_eigenvalues", "hybrid_curvatures", "hybrid_reference",
           "logit_derivatives", "mp_rel", "reference", "self_check", "to_float"]
_ = mpmath  # the module is the reference's only numeric dependency besides NumPy
