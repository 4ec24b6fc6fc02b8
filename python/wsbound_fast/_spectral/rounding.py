"""Rounding allowances: how far a computed moment or product may be from the exact one.

The error model is docs/numerics.md section 4.  The moment pass returns, beside the
moments, the magnitudes ``trace_abs[l]`` = sum_n |a~_{l-1}|^2 sum_k |(M_l)_kk| and
``norms[l, m]`` = sum_n nu_n^{lm} with nu_n^{lm} >= ||H_n^{lm}||_F.  Each pair term
kappa_lm(n, n') is computed with an absolute error of at most gamma nu_n^{lm} nu_n'^{lm}, and
|kappa_lm(n, n')| <= nu_n^{lm} nu_n'^{lm} (Cauchy-Schwarz), so

    |fl(blocks[l, m]) - blocks[l, m]| <= gamma_pair * norms[l, m]^2
    |fl(trace[l]) - trace[l]|         <= gamma_trace * trace_abs[l]

with gamma = k u / (1 - k u) (Higham's gamma_k, u the unit roundoff) and k the longest chain
of roundings a term goes through:

* k_chain: building the per-sample features (forward pass, softmax, backward recursion):
  3 (d_{l-1} + d_l + 1) per layer, 8 per activation, 2 C for the softmax; plus the
  conditioning of the functions of the pre-activations: z_l is computed with an absolute
  error of about u |z_l|, which sigma'(z) and exp(z - z_r) turn into a relative error of
  |z sigma''(z) / sigma'(z)| u (2|z| for tanh, |z| for the logistic family, z^2 for GELU) and
  |z_k - z_r| u; 4 times the sum over the layers of their bounds (from the weights and
  max |x|, :func:`preactivation_bounds`);
* k_inner: the longest inner dimension of a Gram product of the path (flattened G_lm on the
  generic path, d_l on the K route);
* on the K route, an error of relative size e in the features and GEMM outputs (in the
  p-weighted norm of S) changes the result R = sum p_i p'_j Shat_ij^2 by at most
  2 e sqrt(R t_1) <= 2 C e R (centering is a contraction in that norm, and t_1 <= C^2 R,
  docs/numerics.md section 3): a factor 2 C + 1; the identity's own four-term evaluation
  rounds by at most 4 u t_1 <= 4 C^2 u R;
* k_sum: the reductions over a block pair (row sums, then over rows: <= 2 B), over block
  pairs (<= 2 n_blocks) and over the L^2 parameter blocks.

The product H v (R-propagation per sample, then the sums over samples) is modelled the same
way: ||fl(H v) - H v|| <= gamma_product * sum_n ||H_n||_F ||v||.

These are worst-case bounds (every rounding in the same direction); the real errors are
typically several orders of magnitude smaller (the tests compare both with a 60-digit
reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Unit roundoff of float64 and float32.
U_DOUBLE = 2.0 ** -53
U_SINGLE = 2.0 ** -24


def gamma(k: float, u: float = U_DOUBLE) -> float:
    """Higham's gamma_k = k u / (1 - k u): the relative error bound of a chain of k roundings."""
    ku = k * u
    if ku >= 0.5:
        return math.inf
    return ku / (1.0 - ku)


def up(x: float, ulps: int = 4) -> float:
    """x rounded outward (towards +inf) by a few units in the last place, for a number that
    was computed with a handful of roundings (sqrt, a sum of three terms)."""
    for _ in range(ulps):
        x = math.nextafter(x, math.inf)
    return x


def down(x: float, ulps: int = 4) -> float:
    """x rounded towards -inf by a few units in the last place."""
    for _ in range(ulps):
        x = math.nextafter(x, -math.inf)
    return x


@dataclass(frozen=True)
class Allowance:
    """Absolute rounding allowances, in the reduction of the result ("mean" or "sum").

    The exact tr(H) lies in [trace - allowance.trace, trace + allowance.trace], and so on;
    ``product`` bounds ||fl(H v) - H v|| / ||v|| for the curvature-vector product.
    """

    trace: float
    trace_sq: float
    layer_trace: tuple[float, ...]
    layer_trace_sq: tuple[float, ...]
    product: float

    @staticmethod
    def zero(n_layers: int) -> Allowance:
        z = (0.0,) * n_layers
        return Allowance(0.0, 0.0, z, z, 0.0)


def _dims(prob: Any) -> list[int]:
    return [int(prob.weights[0].shape[1])] + [int(w.shape[0]) for w in prob.weights]


def _chain(dims: list[int], conditioning: float = 0.0) -> float:
    L = len(dims) - 1
    return sum(3 * (dims[l - 1] + dims[l] + 1) for l in range(1, L + 1)) + 8 * (L - 1) + 2 * dims[-1] + 16 \
        + 4.0 * conditioning


def _max_abs_input(X: Any) -> float:
    """max |x| over the data set, in chunks (a NumPy array, or a tensor on its device; an X kept
    on a cluster says it itself, ``max_abs``)."""
    if hasattr(X, "max_abs"):
        return float(X.max_abs)
    step = max(1, (1 << 22) // max(1, int(X.shape[1])))
    top = 0.0
    for lo in range(0, int(X.shape[0]), step):
        chunk = X[lo:lo + step]
        if isinstance(chunk, np.ndarray):
            top = max(top, float(np.max(np.abs(chunk), initial=0.0)))
        else:  # a torch tensor
            top = max(top, float(chunk.abs().max()))
    return top


#: |z sigma''(z) / sigma'(z)|-type condition of each activation's derivatives at |z| <= b.
def _activation_condition(name: str, b: float) -> float:
    if name in ("identity", "relu", "leaky_relu"):
        return 0.0
    if name == "tanh":
        return 2.0 * b + 1.0
    if name in ("gelu", "gelu_tanh"):
        return b * b + 2.0 * b + 1.0
    return b + 1.0  # sigmoid, softplus, silu


def _activation_range(act: Any, b: float) -> float:
    """A bound on |sigma(z)| for |z| <= b."""
    if act.name in ("tanh", "sigmoid"):
        return 1.0
    if act.name == "softplus":
        return b + math.log(2.0)
    if act.name == "leaky_relu":
        return b * max(1.0, abs(float(act.param)))
    return b + 1.0  # identity, relu, gelu, silu


def preactivation_bounds(prob: Any) -> tuple[list[float], float]:
    """(b_l for the hidden layers, the logits' bound): |z_l| <= b_l for every sample, from
    |z_l| <= ||W_l||_inf max|a_{l-1}| + max|b_l|; the softmax margins are <= 2 b_L."""
    a = _max_abs_input(prob.X)
    bounds = []
    L = prob.n_layers
    for l, (W, bias) in enumerate(zip(prob.weights, prob.biases)):
        row = float(np.max(np.sum(np.abs(W), axis=1)))
        z = row * a + (0.0 if bias is None else float(np.max(np.abs(bias), initial=0.0)))
        if not math.isfinite(z):
            z = 1e300
        if l < L - 1:
            bounds.append(z)
            a = _activation_range(prob.activations[l], z)
        else:
            return bounds, z
    return bounds, 0.0  # pragma: no cover


def conditioning(prob: Any) -> float:
    """The sum over the layers of the derivatives' condition bounds, plus the softmax margin."""
    hidden, logits = preactivation_bounds(prob)
    return sum(_activation_condition(prob.activations[l].name, b) for l, b in enumerate(hidden)) + 2.0 * logits


def _inner(dims: list[int], hessian: bool, structured: bool) -> int:
    """The longest inner dimension of the path's Gram products."""
    L, C = len(dims) - 1, dims[-1]
    k = max(d + 1 for d in dims[:-1])  # alpha, beta: Grams of the augmented inputs
    if structured:
        k = max(k, C * C, max(dims[1:]))
        if hessian and L >= 3:  # the generic blocks above the K route: l < L - 1
            k = max(k, max(dims[l] * dims[m] for l in range(1, L - 1) for m in range(l, L + 1)))
        return k
    return max(k, max(dims[l] * dims[m] for l in range(1, L + 1) for m in range(l, L + 1)))


def _single(prob: Any) -> bool:
    if getattr(prob, "f32", False):
        return True
    dtype = getattr(prob, "dtype", None)  # a TorchProblem
    return dtype is not None and str(dtype) == "torch.float32"


def moment_gammas(prob: Any, cond: float | None = None) -> tuple[float, float]:
    """(gamma_trace, gamma_pair) of the error model for this problem and plan (``cond``: the
    :func:`conditioning` of the problem, computed when not given)."""
    dims = _dims(prob)
    L, C = len(dims) - 1, dims[-1]
    N, B = prob.n_samples, prob.batch_size
    nb = -(-N // B)
    u_pair = U_SINGLE if _single(prob) else U_DOUBLE
    u_feat = U_SINGLE if getattr(prob, "dtype", None) is not None and _single(prob) else U_DOUBLE
    chain = _chain(dims, conditioning(prob) if cond is None else cond)
    k_sum = 2 * B + 2 * nb + L * L + 8
    g_trace = gamma(chain, u_feat) + gamma(max(dims) + 2 * B + 2 * nb + L + 8)
    # the four terms of kappa (generic path), or the K route's factors (see the module docstring)
    route, identity = (2 * C + 1, 4 * C * C + 4) if prob.structured else (4, 8)
    g_pair = route * (gamma(_inner(dims, prob.hessian, prob.structured), u_pair) + 2 * gamma(chain, u_feat)) \
        + identity * U_DOUBLE + gamma(k_sum)
    return g_trace, g_pair


def moment_allowance(prob: Any, trace_abs: np.ndarray, norms: np.ndarray) -> Allowance:
    """The allowances of the moments (and of one product) from the pass's magnitudes.

    ``trace_abs`` (L,) and ``norms`` (L, L) are unnormalised sums over the samples, as the
    backends return them; the result is in the problem's reduction.
    """
    L = prob.n_layers
    cond = conditioning(prob)
    g_trace, g_pair = moment_gammas(prob, cond)
    N = prob.n_samples
    f1, f2 = (1.0 / prob.divisor, 1.0 / (prob.divisor * prob.divisor)) if prob.mean else (1.0, 1.0)
    ta = np.abs(np.asarray(trace_abs, dtype=np.float64))
    nu = np.abs(np.triu(np.asarray(norms, dtype=np.float64)))
    layer_tr = tuple(up(g_trace * float(ta[l]) * f1) for l in range(L))
    layer_sq = tuple(up(g_pair * float(nu[l, l]) ** 2 * f2) for l in range(L))
    sq = 0.0
    for l in range(L):
        for m in range(l, L):
            sq += (1.0 if l == m else 2.0) * float(nu[l, m]) ** 2
    # the total adds L(L+1)/2 terms: their own rounding, on the magnitude sum
    sq_total = g_pair * sq + gamma(L * L + 2) * sq
    # sum_n ||H_n||_F <= sum_l norms[l, l] + sqrt(2) sum_{l<m} norms[l, m]
    h_sum = float(np.trace(nu)) + math.sqrt(2.0) * float(np.sum(np.triu(nu, 1)))
    dims = _dims(prob)
    k_prod = _chain(dims, cond) + 2 * sum(dims) + prob.batch_size + -(-N // prob.batch_size) + 16
    product = up(gamma(k_prod) * h_sum * f1)
    return Allowance(up(sum(layer_tr) + gamma(L + 2) * float(ta.sum()) * f1), up(sq_total * f2),
                     layer_tr, layer_sq, product)
