"""Lanczos with full reorthogonalisation over the exact curvature-vector product.

:func:`lanczos` is a plain symmetric Lanczos process on any matvec: every new vector is
orthogonalised twice against all previous ones (classical Gram-Schmidt, twice), so the
basis stays orthonormal to rounding and the Ritz values are those of the exact
Rayleigh-Ritz projection onto the Krylov space.  When the Krylov space becomes invariant
(beta ~ 0), the process continues from a fresh random vector orthogonal to the basis.
Convergence of a Ritz pair (theta, y) is judged by the Lanczos residual estimate
|H y - theta y| = beta_m |s_m| against ``tol`` times the largest |Ritz value|.

:func:`wsbound_fast.eigsh` (``_api/products.py``) is the public entry point
(scipy.sparse.linalg.eigsh-like).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._backends import Matvec
from .._problem.problem import Problem

WHICH = ("LA", "SA", "BE", "LM")

Select = Callable[[np.ndarray], np.ndarray]


def select_indices(theta: np.ndarray, which: str, k: int) -> np.ndarray:
    """Indices of the wanted Ritz values among theta (ascending), at most len(theta)."""
    m = theta.shape[0]
    k = min(k, m)
    if which == "LA":
        return np.arange(m - k, m)
    if which == "SA":
        return np.arange(k)
    if which == "BE":  # as scipy: half from each end, the extra one from the high end
        lo = k // 2
        return np.concatenate([np.arange(lo), np.arange(m - (k - lo), m)])
    if which == "LM":
        order = np.argsort(-np.abs(theta), kind="stable")
        return np.sort(order[:k])
    raise ValueError(which)  # pragma: no cover - validated before


class HostSpace:
    """Where the Lanczos vectors live and how the product is applied: host memory (NumPy),
    the matvec's own float64 arrays.  ``_backends.torch.DeviceSpace`` keeps them on a GPU."""

    def __init__(self, matvec: Matvec) -> None:
        self.matvec = matvec

    def vector(self, a: np.ndarray) -> Any:
        return a

    def basis(self, rows: int, n: int, old: Any = None) -> Any:
        """An empty (rows, n) basis holding ``old``'s rows first."""
        Q = np.empty((rows, n))
        if old is not None:
            Q[: old.shape[0]] = old
        return Q

    def norm(self, w: Any) -> float:
        return float(np.linalg.norm(w))

    def apply(self, q: Any) -> Any:
        return self.matvec(q[None, :])[0]

    def combine(self, Q: Any, coeffs: np.ndarray) -> np.ndarray:
        """Q^T coeffs as a host (n, k) array."""
        return Q.T @ coeffs


@dataclass
class LanczosResult:
    """State of a finished Lanczos run (basis rows Q[:m], tridiagonal T's eigenpairs)."""

    theta: np.ndarray  # (m,) Ritz values, ascending
    S: np.ndarray  # (m, m) eigenvectors of T
    Q: Any  # (m, P) orthonormal Lanczos basis (a NumPy array, or a tensor on the device: see space)
    residuals: np.ndarray  # (m,) estimated |H y_i - theta_i y_i|
    iterations: int  # matvecs done
    converged: bool
    space: Any = None  # where Q lives (HostSpace when None)

    def vectors(self, idx: np.ndarray) -> np.ndarray:
        """Ritz vectors for the given indices, as the columns of a (P, len(idx)) host array."""
        if self.space is None:
            return self.Q.T @ self.S[:, idx]
        return self.space.combine(self.Q, self.S[:, idx])


def _orthogonalise(w: Any, Q: Any) -> Any:
    for _ in range(2):  # "twice is enough"
        w -= Q.T @ (Q @ w)
    return w


def lanczos(matvec: Matvec, n: int, *, wanted: Callable[[np.ndarray], np.ndarray], n_wanted: int, tol: float,
            maxiter: int, rng: np.random.Generator) -> LanczosResult:
    """Run Lanczos until the wanted Ritz pairs' residuals are <= tol * max|theta|.

    ``wanted(theta)`` returns the indices of the wanted Ritz values; at least ``n_wanted``
    iterations are done (fewer only when n is smaller).  Stops after ``maxiter`` matvecs,
    or when the basis spans R^n (then the Ritz values are the eigenvalues).

    The basis and the reorthogonalisation stay in host memory, unless the matvec offers a
    device space (``matvec.space``, backend="torch" on a GPU) that holds maxiter vectors:
    then they stay on the device with the product, and only scalars cross per step.
    """
    maxiter = min(maxiter, n)
    space = getattr(matvec, "space", None)
    if space is None or not space.holds(maxiter, n):
        space = HostSpace(matvec)
    cap = min(maxiter, 64)
    Q = space.basis(cap, n)
    alpha: list[float] = []
    beta: list[float] = []  # beta[j]: coupling between q_j and q_{j+1}
    q = rng.standard_normal(n)
    q = space.vector(q / np.linalg.norm(q))
    scale = 0.0
    theta = np.zeros(0)
    S = np.zeros((0, 0))
    res = np.zeros(0)
    converged = False
    last_check = 0
    m = 0
    while m < maxiter:
        if m == cap:
            cap = min(maxiter, 2 * cap)
            Q = space.basis(cap, n, Q[:m])
        Q[m] = q
        w = space.apply(q)
        a = float(q @ w)
        w -= a * q
        if m > 0:
            w -= beta[-1] * Q[m - 1]
        w = _orthogonalise(w, Q[: m + 1])
        b = space.norm(w)
        alpha.append(a)
        m += 1
        scale = max(scale, abs(a), b)
        full = m == n
        due = m >= min(n_wanted, n) and (m - last_check >= max(1, m // 12) or full or m == maxiter)
        if due:
            last_check = m
            T = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
            theta, S = np.linalg.eigh(T)
            res = np.zeros(m) if full else b * np.abs(S[-1, :])
            top = max(float(np.abs(theta).max()), np.finfo(float).tiny)
            idx = wanted(theta)
            if full or bool(np.all(res[idx] <= tol * top)):
                converged = True
                break
        if m == maxiter:
            break
        if b <= 1e-12 * scale:  # invariant subspace: continue from a fresh random direction
            q = _orthogonalise(space.vector(rng.standard_normal(n)), Q[:m])
            nq = space.norm(q)
            if nq <= 1e-8:  # pragma: no cover - the basis already spans R^n
                break
            q /= nq
            beta.append(0.0)
        else:
            q = w / b
            beta.append(b)
    if last_check != m:  # ended without a check at the last step: final Ritz pairs
        T = np.diag(alpha) + np.diag(beta[: m - 1], 1) + np.diag(beta[: m - 1], -1)
        theta, S = np.linalg.eigh(T)
        res = b * np.abs(S[-1, :])
    return LanczosResult(theta, S, Q[:m], res, m, converged, None if isinstance(space, HostSpace) else space)


def _seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or int(seed) < 0:
        raise TypeError(f"seed must be a non-negative integer; got {seed!r}")
    return int(seed)


def _tol(tol: Any, name: str = "tol") -> float:
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise TypeError(f"{name} must be a non-negative real number; got {tol!r}")
    t = float(tol)
    if not (math.isfinite(t) and t >= 0):
        raise ValueError(f"{name} must be a finite number >= 0; got {tol!r}")
    return t


def default_maxiter(n: int, k: int, memory_limit: int | None = None) -> int:
    """min(n, max(300, 10 k)), and at most what half of memory_limit holds of the (m, n) basis
    (but never fewer than k + 10 steps)."""
    m = min(n, max(300, 10 * k))
    if memory_limit is not None:
        m = min(m, max(k + 10, memory_limit // (16 * n)))
    return max(1, min(m, n))


def basis_memory_limit(prob: Problem) -> int:
    """Bytes the Lanczos basis may take in host memory (half of it is used; see
    :func:`default_maxiter`): ``memory_limit``, except for the torch backend, whose
    ``memory_limit`` is the compute device's budget; there it is the host default unless
    memory_limit was given."""
    return int(getattr(prob, "host_memory_limit", prob.memory_limit))




class BlockLanczos:
    """Block Lanczos with full reorthogonalisation: ``block`` vectors per product pass.

    The curvature-vector product of the engines applies to several vectors in one pass over
    the data (the features are computed once per block of samples), so a block of b vectors
    costs far less than b single products.  Rows of Q are the orthonormal basis; T is the
    block-tridiagonal projection Q H Q^T with blocks A_j = Q_j H Q_j^T and B_j from the QR
    factorisation of the next residual block.  Each new block is orthogonalised twice against
    every previous row (classical Gram-Schmidt, twice).  A direction that the residual no
    longer has (an invariant subspace) is replaced by a fresh random one.
    """

    def __init__(self, matvec: Matvec, n: int, block: int, rng: np.random.Generator, maxiter: int) -> None:
        self.matvec, self.n, self.rng = matvec, n, rng
        self.b = max(1, min(block, n))
        self.maxiter = max(self.b, min(maxiter, n))
        self.Q = np.empty((min(self.maxiter, 8 * self.b), n))
        self.m = 0  # rows of Q in use
        self.blocks_A: list[np.ndarray] = []
        self.blocks_B: list[np.ndarray] = []
        self.scale = 0.0
        V = self._fresh(self.b)
        self.next_block = V
        self.last_B = np.zeros((self.b, self.b))

    @property
    def products(self) -> int:
        return self.m

    def exhausted(self) -> bool:
        return self.m >= self.maxiter or self.next_block is None

    def _orth(self, W: np.ndarray) -> np.ndarray:
        Qm = self.Q[: self.m]
        for _ in range(2):
            if self.m:
                W -= (W @ Qm.T) @ Qm
        return W

    def _fresh(self, k: int) -> np.ndarray:
        V = self._orth(self.rng.standard_normal((k, self.n)))
        q, _ = np.linalg.qr(V.T)
        return self._orth(q.T.copy())

    def step(self) -> None:
        """One block step: H applied to the next block, its projection, the next block."""
        V = self.next_block
        if V is None:
            return
        k = min(V.shape[0], self.maxiter - self.m)
        if k < V.shape[0] and self.blocks_B:  # the last block, cut to maxiter: its coupling to the kept rows only
            V = V[:k]
            self.blocks_B[-1] = self.blocks_B[-1][:k]
            self.last_B = self.blocks_B[-1]
        if self.m + k > self.Q.shape[0]:
            Q = np.empty((min(self.maxiter, max(2 * self.Q.shape[0], self.m + k)), self.n))
            Q[: self.m] = self.Q[: self.m]
            self.Q = Q
        W = self.matvec(V)
        A = V @ W.T
        A = 0.5 * (A + A.T)
        self.Q[self.m: self.m + k] = V
        self.m += k
        self.blocks_A.append(A)
        W = self._orth(W)
        self.scale = max(self.scale, float(np.abs(A).max(initial=0.0)))
        if self.m >= self.maxiter or self.m >= self.n:
            self.last_B = np.linalg.qr(W.T, mode="r").T[:, :k] if W.size else np.zeros((0, k))
            self.blocks_B.append(self.last_B)
            self.next_block = None
            return
        q, r = np.linalg.qr(W.T)  # W^T = q r: the next block's rows q^T, coupling B = r
        keep = min(k, self.n - self.m)
        q, r = q[:, :keep], r[:keep, :]
        small = np.abs(np.diag(r)) <= 1e-10 * max(self.scale, np.finfo(float).tiny)
        Vn = q.T.copy()
        if small.any():  # an invariant direction: continue from fresh random ones
            r[small, :] = 0.0
            Vn[small] = 0.0
            extra = self._orth(self.rng.standard_normal((int(small.sum()), self.n)))
            extra -= (extra @ Vn.T) @ Vn
            qe, _ = np.linalg.qr(extra.T)
            Vn[small] = qe.T
        self.last_B = r
        self.blocks_B.append(r)
        self.next_block = Vn

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(theta ascending, S, residual estimates |H y_i - theta_i y_i| = |B_last S_last,i|)."""
        m = self.m
        T = np.zeros((m, m))
        o = 0
        for j, A in enumerate(self.blocks_A):
            k = A.shape[0]
            T[o: o + k, o: o + k] = A
            if j + 1 < len(self.blocks_A):
                Bj = self.blocks_B[j]  # (k_next, k)
                kn = Bj.shape[0]
                T[o + k: o + k + kn, o: o + k] = Bj
                T[o: o + k, o + k: o + k + kn] = Bj.T
            o += k
        theta, S = np.linalg.eigh(T)
        kl = self.blocks_A[-1].shape[0]
        B = self.last_B if self.next_block is not None or self.last_B.size else np.zeros((0, kl))
        res = np.linalg.norm(B @ S[m - kl:, :], axis=0) if B.size else np.zeros(m)
        return theta, S, res

    def vectors(self, S_cols: np.ndarray) -> np.ndarray:
        """Ritz vectors Q^T S_cols, (n, j)."""
        return self.Q[: self.m].T @ S_cols
