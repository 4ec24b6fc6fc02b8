"""Independent references for the test suite.

Nothing here imports wsbound_fast, and nothing here uses the formulas of docs/design.md
(no features, no pair contractions).  The references are:

* a pure-NumPy forward pass and backpropagation (my own activations and first
  derivatives) giving the loss gradient w.r.t. the flat parameter vector, and a
  Hessian by high-order central finite differences of that gradient;
* a Gauss-Newton matrix built from per-sample logit Jacobians (one backward pass per
  sample and class through the same backpropagation code) and the softmax Hessian
  A = w (diag(p) - p p^T), w the row sum of the labels;
* torch references (float64): torch.autograd.functional.hessian of the loss written in
  torch, and torch.func.jacrev of the logits for J^T A J.  torch is imported lazily.

Plus the random model builder used by the tests (:class:`ModelSpec`) and the error
measures the tests assert with.

Parameter order everywhere: layer by layer, W row-major then b (the order of
``torch.nn.Sequential.parameters()``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# --------------------------------------------------------------------------------------
# activations: value and first derivative (the only thing backpropagation needs)
# --------------------------------------------------------------------------------------

_GELU_TANH_C = 0.044715
_S2P = math.sqrt(2.0 / math.pi)


def _erf(x: np.ndarray) -> np.ndarray:
    try:
        from scipy.special import erf

        return erf(x)
    except ImportError:  # pragma: no cover
        return np.vectorize(math.erf, otypes=[float])(x)


def _logistic(z: np.ndarray) -> np.ndarray:
    # 1 / (1 + exp(-z)) without overflow: exp of non-positive arguments only
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def split_activation(spec: Any) -> tuple[str, float]:
    """("leaky_relu", 0.2) -> ("leaky_relu", 0.2); "leaky_relu" -> (.., 0.01); "tanh" -> ("tanh", 0)."""
    if isinstance(spec, (tuple, list)):
        name, param = spec
        return str(name), float(param)
    return str(spec), 0.01 if spec == "leaky_relu" else 0.0


def per_layer_activations(activation: Any, n_hidden: int) -> list[tuple[str, float]]:
    """The activation argument of wsbound_fast.bound, resolved to one (name, param) per hidden layer."""
    single = isinstance(activation, str) or (
        isinstance(activation, (tuple, list)) and len(activation) == 2 and isinstance(activation[0], str)
        and not isinstance(activation[1], str)
    )
    if single:
        return [split_activation(activation)] * n_hidden
    acts = [split_activation(a) for a in activation]
    assert len(acts) == n_hidden
    return acts


def act_value_grad(name: str, param: float, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sigma(z), sigma'(z)), written from the textbook definitions."""
    if name == "identity":
        return z.copy(), np.ones_like(z)
    if name == "tanh":
        t = np.tanh(z)
        return t, 1.0 - t**2
    if name == "sigmoid":
        s = _logistic(z)
        return s, s * (1.0 - s)
    if name == "softplus":
        # log(1 + e^z) = max(z, 0) + log(1 + e^-|z|);  derivative: the logistic function
        return np.maximum(z, 0.0) + np.log1p(np.exp(-np.abs(z))), _logistic(z)
    if name == "gelu":
        cdf = 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))
        pdf = np.exp(-0.5 * z**2) / math.sqrt(2.0 * math.pi)
        return z * cdf, cdf + z * pdf
    if name == "gelu_tanh":
        inner = _S2P * (z + _GELU_TANH_C * z**3)
        t = np.tanh(inner)
        dinner = _S2P * (1.0 + 3.0 * _GELU_TANH_C * z**2)
        return 0.5 * z * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t**2) * dinner
    if name == "silu":
        s = _logistic(z)
        return z * s, s * (1.0 + z * (1.0 - s))
    if name == "relu":
        return np.maximum(z, 0.0), (z > 0).astype(float)
    if name == "leaky_relu":
        return np.where(z > 0, z, param * z), np.where(z > 0, 1.0, param)
    raise ValueError(f"unknown activation {name!r}")


# --------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------


def layer_shapes(layers: list[tuple[np.ndarray, np.ndarray | None]]) -> list[tuple[int, int, bool]]:
    return [(W.shape[0], W.shape[1], b is not None) for W, b in layers]


def n_params(layers: list[tuple[np.ndarray, np.ndarray | None]]) -> int:
    return sum(o * i + (o if hb else 0) for o, i, hb in layer_shapes(layers))


def flatten(layers: list[tuple[np.ndarray, np.ndarray | None]]) -> np.ndarray:
    parts = []
    for W, b in layers:
        parts.append(np.asarray(W, dtype=float).ravel())
        if b is not None:
            parts.append(np.asarray(b, dtype=float).ravel())
    return np.concatenate(parts)


def unflatten(theta: np.ndarray, shapes: list[tuple[int, int, bool]]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    out, k = [], 0
    for o, i, hb in shapes:
        W = theta[k:k + o * i].reshape(o, i)
        k += o * i
        b = None
        if hb:
            b = theta[k:k + o]
            k += o
        out.append((W, b))
    assert k == theta.size
    return out


def label_rows(y: np.ndarray, n_classes: int) -> np.ndarray:
    """(N,) class indices -> one-hot rows; (N, C) rows unchanged (as float64)."""
    y = np.asarray(y)
    if y.ndim == 1:
        Y = np.zeros((y.shape[0], n_classes))
        Y[np.arange(y.shape[0]), y.astype(int)] = 1.0
        return Y
    return np.asarray(y, dtype=float)


# --------------------------------------------------------------------------------------
# NumPy forward / backward
# --------------------------------------------------------------------------------------


def forward(layers, acts, X):
    """Logits and the cache for backpropagation: per layer (input a, sigma'(z) or None)."""
    a = np.asarray(X, dtype=float)
    L = len(layers)
    cache = []
    for l, (W, b) in enumerate(layers):
        z = a @ W.T
        if b is not None:
            z = z + b
        if l < L - 1:
            s, ds = act_value_grad(*acts[l], z)
            cache.append((a, ds))
            a = s
        else:
            cache.append((a, None))
            return z, cache
    raise AssertionError  # pragma: no cover


def activation_errors(layers, activation, X):
    """The activations' error bounds of docs/numerics.md section 4, written out per sample:
    (ea, na, c) with ea[:, l] >= |error of a~_{l-1}|_2 (0 for l = 1), na[:, l] = |a~_{l-1}|_2
    (N, L+1) and the fold factor c = 1 / (u sum_l 3 (d_{l-1} + d_l + 1)).  z_l[i] is in error by
    E = gamma_{d_{l-1}+2} (r_i |a_{l-1}| + |b_i|) + r_i ea_l with r_i = |W_l[i, :]|_2, and
    a_l[i] = sigma(z_l[i]) by |sigma'(z_l[i])| E + 8 u |a_l[i]|."""
    u = 2.0 ** -53
    acts = per_layer_activations(activation, len(layers) - 1)
    a = np.asarray(X, dtype=float)
    L, N = len(layers), a.shape[0]
    ea, na = np.zeros((N, L + 1)), np.zeros((N, L + 1))
    for l, (W, b) in enumerate(layers, start=1):
        na[:, l] = np.sqrt(np.sum(a * a, axis=1) + (0.0 if b is None else 1.0))
        if l == L:
            break
        z = a @ W.T + (0.0 if b is None else b)
        s, ds = act_value_grad(*acts[l - 1], z)
        k = (W.shape[1] + 2) * u
        r = np.linalg.norm(W, axis=1)
        E = k / (1 - k) * (np.outer(np.linalg.norm(a, axis=1), r) + (0.0 if b is None else np.abs(b)))
        E = E + np.outer(ea[:, l], r)
        ea[:, l + 1] = np.linalg.norm(np.abs(ds) * E + 8 * u * np.abs(s), axis=1)
        a = s
    c = 1.0 / (u * sum(3 * (W.shape[1] + W.shape[0] + 1) for W, _ in layers))
    return ea, na, c


def hidden_preactivations(layers, acts, X) -> list[np.ndarray]:
    a = np.asarray(X, dtype=float)
    out = []
    for l, (W, b) in enumerate(layers[:-1]):
        z = a @ W.T + (0.0 if b is None else b)
        out.append(z)
        a = act_value_grad(*acts[l], z)[0]
    return out


def per_row_grads(layers, cache, dz: np.ndarray) -> np.ndarray:
    """Row r: gradient w.r.t. theta of sum_k dz[r, k] * logits[r, k] (one row per sample)."""
    L = len(layers)
    R = dz.shape[0]
    pieces: list[list[np.ndarray]] = [[] for _ in range(L)]
    for l in range(L - 1, -1, -1):
        W, b = layers[l]
        a_in, _ = cache[l]
        pieces[l].append((dz[:, :, None] * a_in[:, None, :]).reshape(R, -1))
        if b is not None:
            pieces[l].append(dz.copy())
        if l > 0:
            dz = (dz @ W) * cache[l - 1][1]
    return np.concatenate([p for layer in pieces for p in layer], axis=1)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def loss(layers, acts, X, Y, reduction) -> float:
    z, _ = forward(layers, acts, X)
    zmax = z.max(axis=1, keepdims=True)
    lse = (zmax + np.log(np.exp(z - zmax).sum(axis=1, keepdims=True)))[:, 0]
    per = -(Y * z).sum(axis=1) + Y.sum(axis=1) * lse
    return float(per.mean() if reduction == "mean" else per.sum())


def gradient(layers, acts, X, Y, reduction) -> np.ndarray:
    """d loss / d theta.  Per sample, d/dz(-sum_k y_k log softmax_k(z)) = (sum_k y_k) p - y."""
    z, cache = forward(layers, acts, X)
    dz = Y.sum(axis=1, keepdims=True) * softmax(z) - Y
    if reduction == "mean":
        dz = dz / X.shape[0]
    # sum over rows of the per-row gradients, done as matrix products
    L = len(layers)
    pieces: list[list[np.ndarray]] = [[] for _ in range(L)]
    for l in range(L - 1, -1, -1):
        W, b = layers[l]
        a_in, _ = cache[l]
        pieces[l].append((dz.T @ a_in).ravel())
        if b is not None:
            pieces[l].append(dz.sum(axis=0))
        if l > 0:
            dz = (dz @ W) * cache[l - 1][1]
    return np.concatenate([p for layer in pieces for p in layer])


def logit_jacobians(layers, acts, X) -> np.ndarray:
    """J[n, k, :] = d logits[n, k] / d theta, by one backward pass per (sample, class)."""
    X = np.asarray(X, dtype=float)
    N = X.shape[0]
    C = layers[-1][0].shape[0]
    Xr = np.repeat(X, C, axis=0)  # row n*C + k is sample n
    _, cache = forward(layers, acts, Xr)
    dz = np.tile(np.eye(C), (N, 1))  # seed e_k on row n*C + k
    return per_row_grads(layers, cache, dz).reshape(N, C, -1)


# Central-difference weights for the first derivative, f'(0) ~ sum_k c_k f(k h) / h.
_STENCILS = {
    4: {1: 2 / 3, 2: -1 / 12},
    6: {1: 3 / 4, 2: -3 / 20, 3: 1 / 60},
    8: {1: 4 / 5, 2: -1 / 5, 3: 4 / 105, 4: -1 / 280},
}


def fd_hessian(layers, activation, X, y, reduction="mean", *, h=3e-3, order=8) -> np.ndarray:
    """Hessian of the loss by central differences (order ``order``) of the analytic gradient.

    Column i: sum_k c_k (g(theta + k h e_i) - g(theta - k h e_i)) / h; then symmetrised.
    With smooth activations and O(1) weights, order 8 and h = 3e-3 give ~1e-12 relative
    (truncation ~h^8, rounding ~1e-16/h).
    """
    acts = per_layer_activations(activation, len(layers) - 1)
    shapes = layer_shapes(layers)
    C = shapes[-1][0]
    Y = label_rows(y, C)
    X = np.asarray(X, dtype=float)
    theta = flatten(layers)
    P = theta.size
    H = np.zeros((P, P))
    for i in range(P):
        col = np.zeros(P)
        for k, c in _STENCILS[order].items():
            tp = theta.copy()
            tp[i] += k * h
            tm = theta.copy()
            tm[i] -= k * h
            col += c * (gradient(unflatten(tp, shapes), acts, X, Y, reduction)
                        - gradient(unflatten(tm, shapes), acts, X, Y, reduction))
        H[:, i] = col / h
    return 0.5 * (H + H.T)


def fd_gradient(layers, activation, X, y, reduction="mean", *, h=1e-2, order=8) -> np.ndarray:
    """Gradient of the loss by central differences of the loss (to check :func:`gradient`)."""
    acts = per_layer_activations(activation, len(layers) - 1)
    shapes = layer_shapes(layers)
    Y = label_rows(y, shapes[-1][0])
    theta = flatten(layers)
    g = np.zeros(theta.size)
    for i in range(theta.size):
        for k, c in _STENCILS[order].items():
            tp = theta.copy()
            tp[i] += k * h
            tm = theta.copy()
            tm[i] -= k * h
            g[i] += c * (loss(unflatten(tp, shapes), acts, X, Y, reduction)
                         - loss(unflatten(tm, shapes), acts, X, Y, reduction))
    return g / h


def ggn_reference(layers, activation, X, y, reduction="mean") -> np.ndarray:
    """G = sum_n J_n^T A_n J_n (/N for "mean"), A_n = w_n (diag(p_n) - p_n p_n^T), w_n = sum_k y_nk."""
    acts = per_layer_activations(activation, len(layers) - 1)
    C = layers[-1][0].shape[0]
    Y = label_rows(y, C)
    X = np.asarray(X, dtype=float)
    z, _ = forward(layers, acts, X)
    p = softmax(z)
    w = Y.sum(axis=1)
    A = w[:, None, None] * (np.einsum("nk,kl->nkl", p, np.eye(C)) - p[:, :, None] * p[:, None, :])
    J = logit_jacobians(layers, acts, X)
    G = np.einsum("nkp,nkl,nlq->pq", J, A, J)
    if reduction == "mean":
        G /= X.shape[0]
    return 0.5 * (G + G.T)


def logits(layers, activation, X) -> np.ndarray:
    acts = per_layer_activations(activation, len(layers) - 1)
    return forward(layers, acts, np.asarray(X, dtype=float))[0]


# --------------------------------------------------------------------------------------
# torch references (float64)
# --------------------------------------------------------------------------------------


def _torch_act(name: str, param: float):
    import torch
    import torch.nn.functional as F

    return {
        "identity": lambda z: z,
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        # F.softplus switches to the identity above threshold=20 (second derivative 0 there),
        # and logaddexp's double backward gives NaN far below 0; relu(z) + log1p(e^-|z|) is
        # exact with exact first and second derivatives for every z != 0.
        "softplus": lambda z: torch.relu(z) + torch.log1p(torch.exp(-torch.abs(z))),
        "gelu": lambda z: F.gelu(z, approximate="none"),
        "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
        "silu": F.silu,
        "relu": F.relu,
        "leaky_relu": lambda z: F.leaky_relu(z, negative_slope=param),
    }[name]


def _torch_logits_fn(layers, activation, X):
    import torch

    acts = [_torch_act(*a) for a in per_layer_activations(activation, len(layers) - 1)]
    shapes = layer_shapes(layers)
    Xt = torch.as_tensor(np.asarray(X, dtype=np.float64))

    def fn(theta):
        a, k = Xt, 0
        for l, (o, i, hb) in enumerate(shapes):
            W = theta[k:k + o * i].reshape(o, i)
            k += o * i
            z = a @ W.T
            if hb:
                z = z + theta[k:k + o]
                k += o
            a = acts[l](z) if l < len(shapes) - 1 else z
        return a

    return fn


def torch_hessian(layers, activation, X, y, reduction="mean") -> np.ndarray:
    """torch.autograd.functional.hessian of F.cross_entropy (probability targets) in float64."""
    import torch
    import torch.nn.functional as F
    from torch.autograd.functional import hessian

    fn = _torch_logits_fn(layers, activation, X)
    y = np.asarray(y)
    if y.ndim == 1:
        target = torch.as_tensor(y.astype(np.int64))
    else:
        # F.cross_entropy with probability targets: -sum_k y_k log softmax_k(z), as wanted
        # even when the rows do not sum exactly to 1
        target = torch.as_tensor(np.asarray(y, dtype=np.float64))

    def loss_fn(theta):
        return F.cross_entropy(fn(theta), target, reduction=reduction)

    theta0 = torch.as_tensor(flatten(layers))
    H = hessian(loss_fn, theta0, vectorize=True).detach().numpy()
    return 0.5 * (H + H.T)


def torch_ggn(layers, activation, X, y, reduction="mean") -> np.ndarray:
    """J^T A J with J = torch.func.jacrev of the logits, A = w (diag p - p p^T)."""
    import torch

    fn = _torch_logits_fn(layers, activation, X)
    C = layers[-1][0].shape[0]
    Y = torch.as_tensor(label_rows(y, C))
    theta0 = torch.as_tensor(flatten(layers))
    with torch.no_grad():
        J = torch.func.jacrev(fn)(theta0)  # (N, C, P)
        p = torch.softmax(fn(theta0), dim=1)
        w = Y.sum(dim=1)
        A = w[:, None, None] * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
        G = torch.einsum("nkp,nkl,nlq->pq", J, A, J)
        if reduction == "mean":
            G = G / J.shape[0]
    G = G.numpy()
    return 0.5 * (G + G.T)


# --------------------------------------------------------------------------------------
# random models
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A small random MLP and data set, reproducible from its fields (hashable, for caching).

    dims: (d_0, d_1, ..., d_L); bias: one bool per layer (or "all" / "none" / "alt");
    activation: as bound()'s argument (a name, a (name, param) pair, or a tuple of names);
    labels: "hard" (int indices) or "soft" (probability rows);
    margin: if > 0, re-draw until every hidden pre-activation satisfies |z| >= margin
    (for finite differences across the ReLU kink).
    """

    dims: tuple[int, ...]
    activation: Any = "tanh"
    bias: Any = "all"
    n: int = 8
    labels: str = "hard"
    seed: int = 0
    w_scale: float = 1.0
    last_scale: float = 1.0
    x_scale: float = 1.0
    margin: float = 0.0
    x_dtype: str = "float64"

    @property
    def depth(self) -> int:
        return len(self.dims) - 1

    def bias_mask(self) -> tuple[bool, ...]:
        L = self.depth
        if self.bias == "all":
            return (True,) * L
        if self.bias == "none":
            return (False,) * L
        if self.bias == "alt":  # some layers with, some without
            return tuple(l % 2 == 0 for l in range(L))
        mask = tuple(bool(b) for b in self.bias)
        assert len(mask) == L
        return mask

    def activation_arg(self) -> Any:
        """The activation argument to pass to bound(): a list when per layer."""
        a = self.activation
        if isinstance(a, tuple) and not (len(a) == 2 and isinstance(a[0], str) and not isinstance(a[1], str)):
            return list(a)
        return a

    def build(self):
        """(layers, X, y) as NumPy arrays."""
        for attempt in range(200):
            layers, X, y = self._draw(self.seed + 7919 * attempt)
            if self.margin <= 0 or self.depth == 1:
                return layers, X, y
            acts = per_layer_activations(self.activation_arg(), self.depth - 1)
            zs = hidden_preactivations(layers, acts, X)
            if min(float(np.abs(z).min()) for z in zs) >= self.margin:
                return layers, X, y
        raise RuntimeError(f"could not draw a model with margin {self.margin}: {self}")  # pragma: no cover

    def _draw(self, seed: int):
        rng = np.random.default_rng(seed)
        dims, mask = self.dims, self.bias_mask()
        layers = []
        for l in range(self.depth):
            d_in, d_out = dims[l], dims[l + 1]
            W = rng.standard_normal((d_out, d_in)) * (self.w_scale / math.sqrt(d_in))
            b = rng.standard_normal(d_out) * 0.5 if mask[l] else None
            if l == self.depth - 1:
                W = W * self.last_scale
                b = None if b is None else b * self.last_scale
            layers.append((W, b))
        X = rng.standard_normal((self.n, dims[0])) * self.x_scale
        X = X.astype(self.x_dtype)
        C = dims[-1]
        if self.labels == "hard":
            y = rng.integers(0, C, size=self.n)
        elif self.labels == "soft":
            y = rng.dirichlet(np.ones(C), size=self.n)
        else:
            raise ValueError(self.labels)
        return layers, X, y


# --------------------------------------------------------------------------------------
# error measures
# --------------------------------------------------------------------------------------


def trace_err(value: float, H_ref: np.ndarray) -> float:
    """|value - tr(H_ref)| / max(|tr H_ref|, sum |diag H_ref|) (no blow-up under cancellation)."""
    d = np.diag(H_ref)
    denom = max(abs(float(d.sum())), float(np.abs(d).sum()), np.finfo(float).tiny)
    return abs(value - float(d.sum())) / denom


def trace_sq_err(value: float, H_ref: np.ndarray) -> float:
    ref = float(np.sum(H_ref * H_ref))
    return abs(value - ref) / max(ref, np.finfo(float).tiny)


def rel(a: float, b: float, scale: float | None = None) -> float:
    """|a - b| / max(|a|, |b|, scale)."""
    denom = max(abs(a), abs(b), 0.0 if scale is None else scale, np.finfo(float).tiny)
    return abs(a - b) / denom
