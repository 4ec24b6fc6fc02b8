"""The tools users use today, each wrapped as one timed call (benchmark helpers).

Every function takes the trained ``layers`` (float64 NumPy, torch.nn.Linear layout), the
data, the activation and the curvature, runs one peer method from scratch (building its
torch model, operator or graph is part of the timed work, converting the NumPy weights to a
torch module is not) and returns a dict of results.  ``time_s`` is measured inside.  A peer
whose package is missing raises ``PeerUnavailable``; one that stops at its time budget
returns with ``capped=True``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from _workloads import Layers, torch_model


class PeerUnavailable(RuntimeError):
    """The peer package is not installed or cannot be imported."""


class _OverBudget(Exception):
    pass


def _import(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a peer that breaks at import on this torch
        raise PeerUnavailable(f"{name}: {type(exc).__name__}: {exc}") from exc


def _torch_dtype(dtype: str) -> Any:
    import torch

    return {"float32": torch.float32, "float64": torch.float64}[dtype]


@contextlib.contextmanager
def _default_dtype(dtype: str) -> Iterator[None]:
    """PyHessian draws its random vectors in the default dtype: match the model's."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(_torch_dtype(dtype))
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _tensors(X: np.ndarray, y: np.ndarray, dtype: str) -> tuple[Any, Any]:
    import torch

    return torch.from_numpy(np.ascontiguousarray(X)).to(_torch_dtype(dtype)), torch.from_numpy(y).long()


# ----------------------------------------------------------------------------- dense autograd

def dense_autograd(layers: Layers, X: np.ndarray, y: np.ndarray, activation: str, curvature: str,
                   dtype: str = "float64", max_params: int = 12000, chunk_bytes: float = 1.5e9) -> dict[str, Any]:
    """The full P x P Hessian by torch.func (jacrev of grad, in column chunks) + eigvalsh.

    ``torch.func.hessian`` (= jacfwd(jacrev)) over all P tangents at once needs
    P x N x width intermediates (17 GB on W1); jacrev(grad, chunk_size=k) is the same
    reverse-over-reverse Hessian with k columns at a time, sized to ``chunk_bytes``.
    """
    torch = _import("torch")
    if curvature != "hessian":
        raise PeerUnavailable("dense autograd route: only the full Hessian is run")
    P = sum(W.size + b.size for W, b in layers)
    if P > max_params:
        raise PeerUnavailable(f"P = {P} > {max_params}: the dense P x P matrix ({P * P * 8 / 2**30:.1f} GiB "
                              "float64, plus autograd intermediates) is not built")
    tdt = _torch_dtype(dtype)
    Xt, yt = _tensors(X, y, dtype)
    shapes = [(W.shape, b.shape) for W, b in layers]
    theta0 = torch.cat([torch.from_numpy(np.concatenate([W.ravel(), b.ravel()])) for W, b in layers]).to(tdt)
    act = {"tanh": torch.tanh, "gelu": torch.nn.functional.gelu, "sigmoid": torch.sigmoid}[activation]

    def loss(theta: Any) -> Any:
        a, k = Xt, 0
        for i, (ws, bs) in enumerate(shapes):
            nw, nb = int(np.prod(ws)), int(np.prod(bs))
            W = theta[k:k + nw].reshape(ws)
            b = theta[k + nw:k + nw + nb]
            k += nw + nb
            a = torch.nn.functional.linear(a, W, b)
            if i < len(shapes) - 1:
                a = act(a)
        return torch.nn.functional.cross_entropy(a, yt)

    widths = sum(s[0][0] for s in shapes)
    chunk = int(max(1, min(P, chunk_bytes // (8 * 8 * X.shape[0] * widths))))
    t0 = time.perf_counter()
    H = torch.func.jacrev(torch.func.grad(loss), chunk_size=chunk)(theta0)
    t1 = time.perf_counter()
    ev = torch.linalg.eigvalsh(H)
    t2 = time.perf_counter()
    out = {"time_s": t2 - t0, "hessian_s": t1 - t0, "eigvalsh_s": t2 - t1, "chunk_size": chunk,
           "trace": float(torch.trace(H)), "trace_sq": float((H * H).sum()),
           "lambda_max": float(ev[-1]), "lambda_min": float(ev[0]),
           "asymmetry": float((H - H.T).abs().max() / H.abs().max())}
    del H
    return out


# ----------------------------------------------------------------------------- PyHessian

def _pyhessian_run(layers: Layers, X: np.ndarray, y: np.ndarray, activation: str, curvature: str, dtype: str,
                   work: Any) -> tuple[Any, float]:
    """(work(PyHessian's hessian object), seconds), the object's set-up timed too."""
    if curvature != "hessian":
        raise PeerUnavailable("PyHessian has no GGN")
    pyh = _import("pyhessian")
    import torch

    model = torch_model(layers, activation, _torch_dtype(dtype))
    Xt, yt = _tensors(X, y, dtype)
    with _default_dtype(dtype):
        t0 = time.perf_counter()
        hc = pyh.hessian(model, torch.nn.CrossEntropyLoss(), data=(Xt, yt), cuda=False)
        out = work(hc)
        return out, time.perf_counter() - t0


def pyhessian_eig(layers: Layers, X: np.ndarray, y: np.ndarray, activation: str, curvature: str,
                  dtype: str = "float32", max_iter: int = 100, tol: float = 1e-3) -> dict[str, Any]:
    """PyHessian top eigenvalue: power iteration, its default maxIter=100, tol=1e-3 (relative change)."""
    (ev, _), t = _pyhessian_run(layers, X, y, activation, curvature, dtype,
                                lambda hc: hc.eigenvalues(maxIter=max_iter, tol=tol, top_n=1))
    return {"time_s": t, "lambda_max_est": float(ev[0]), "max_iter": max_iter, "tol": tol}


def pyhessian_trace(layers: Layers, X: np.ndarray, y: np.ndarray, activation: str, curvature: str,
                    dtype: str = "float32", max_iter: int = 100, tol: float = 1e-3) -> dict[str, Any]:
    """PyHessian Hutchinson trace: Rademacher v^T H v, stops when the running mean moves < tol relative."""
    samples, t = _pyhessian_run(layers, X, y, activation, curvature, dtype,
                                lambda hc: hc.trace(maxIter=max_iter, tol=tol))
    return {"time_s": t, "trace_est": float(np.mean(samples)), "matvecs": len(samples), "max_iter": max_iter,
            "tol": tol}


# ----------------------------------------------------------------------------- curvlinops

def _curvlinops_operator(layers: Layers, X: np.ndarray, y: np.ndarray, activation: str, curvature: str,
                         dtype: str) -> Any:
    cl = _import("curvlinops")
    import torch

    model = torch_model(layers, activation, _torch_dtype(dtype))
    Xt, yt = _tensors(X, y, dtype)
    cls = cl.HessianLinearOperator if curvature == "hessian" else cl.GGNLinearOperator
    return cls(model, torch.nn.CrossEntropyLoss(), list(model.parameters()), [(Xt, yt)],
               check_deterministic=False, num_data=X.shape[0])


def curvlinops_eigsh(layers: Layers, X: np.ndarray, y: np.ndarray, activation: str, curvature: str,
                     dtype: str = "float32", max_seconds: float = math.inf) -> dict[str, Any]:
    """scipy.sparse.linalg.eigsh(k=1, which='LA') on curvlinops' operator (.to_scipy()), default tol."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    t0 = time.perf_counter()
    op = _curvlinops_operator(layers, X, y, activation, curvature, dtype)
    A = op.to_scipy(dtype=np.dtype(dtype))
    count = [0]
    deadline = t0 + max_seconds

    def mv(v: np.ndarray) -> np.ndarray:
        if time.perf_counter() > deadline:
            raise _OverBudget
        count[0] += 1
        return A.matvec(v)

    wrapped = LinearOperator(A.shape, matvec=mv, rmatvec=mv, dtype=A.dtype)
    try:
        ev = eigsh(wrapped, k=1, which="LA", return_eigenvectors=False)
    except _OverBudget:
        return {"time_s": time.perf_counter() - t0, "lambda_max_est": None, "matvecs": count[0], "capped": True,
                "max_seconds": max_seconds}
    return {"time_s": time.perf_counter() - t0, "lambda_max_est": float(ev[0]), "matvecs": count[0]}


def curvlinops_fro2(layers: Layers, X: np.ndarray, y: np.ndarray, activation: str, curvature: str,
                    dtype: str = "float32", rel_se: float = 0.01, min_vectors: int = 20, chunk: int = 10,
                    max_vectors: int = 100000, max_seconds: float = math.inf) -> dict[str, Any]:
    """Hutchinson ||H||_F^2 = E ||H g||^2 (Rademacher g), the estimator of curvlinops.hutchinson_squared_fro.

    hutchinson_squared_fro(A, num_matvecs) returns one mean for a fixed number of vectors;
    to stop at a target accuracy we draw the same Rademacher vectors (curvlinops.sampling)
    ``chunk`` at a time, multiply them with the same operator and keep every ||H g||^2:
    stop once the standard error of their mean is <= ``rel_se`` of the mean (and at least
    ``min_vectors`` were used) -- the rule a user without the exact value can apply.
    """
    import torch

    _import("curvlinops")
    from curvlinops.sampling import random_vector

    t0 = time.perf_counter()
    op = _curvlinops_operator(layers, X, y, activation, curvature, dtype)
    P = op.shape[1]
    vals: list[float] = []
    capped = False
    while True:
        G = torch.stack([random_vector(P, "rademacher", op.device, op.dtype) for _ in range(chunk)], dim=1)
        HG = op @ G
        vals.extend((HG.double() ** 2).sum(dim=0).tolist())
        n = len(vals)
        mean = float(np.mean(vals))
        se = float(np.std(vals, ddof=1) / math.sqrt(n)) if n > 1 else math.inf
        if n >= min_vectors and se <= rel_se * abs(mean):
            break
        if n >= max_vectors or time.perf_counter() - t0 > max_seconds:
            capped = True
            break
    return {"time_s": time.perf_counter() - t0, "trace_sq_est": mean, "matvecs": n, "rel_se": se / abs(mean),
            "target_rel_se": rel_se, "capped": capped, "max_seconds": max_seconds,
            "vectors_for_1pct_se": math.ceil((np.std(vals, ddof=1) / (0.01 * abs(mean))) ** 2)}


# ----------------------------------------------------------------------------- BackPACK

def backpack_diag(layers: Layers, X: np.ndarray, y: np.ndarray, activation: str, curvature: str,
                  dtype: str = "float64") -> dict[str, Any]:
    """BackPACK DiagHessian (full Hessian) or DiagGGNExact (GGN): the exact diagonal; its sum is tr.

    Run with torch's default dtype set to ``dtype``, so that nothing BackPACK creates in the
    default dtype falls back to float32.
    """
    bp = _import("backpack")
    ext = _import("backpack.extensions")
    import torch

    model = torch_model(layers, activation, _torch_dtype(dtype))
    Xt, yt = _tensors(X, y, dtype)
    with _default_dtype(dtype):
        t0 = time.perf_counter()
        model = bp.extend(model)
        lossf = bp.extend(torch.nn.CrossEntropyLoss())
        loss = lossf(model(Xt), yt)
        extension = ext.DiagHessian() if curvature == "hessian" else ext.DiagGGNExact()
        attr = "diag_h" if curvature == "hessian" else "diag_ggn_exact"
        with bp.backpack(extension):
            loss.backward()
        tr = sum(float(getattr(p, attr).sum()) for p in model.parameters())
        t = time.perf_counter() - t0
    return {"time_s": t, "trace": tr}


def versions() -> dict[str, str | None]:
    """Installed versions of the peers (None where missing)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist in ("torch", "numpy", "scipy", "PyHessian", "backpack-for-pytorch", "curvlinops-for-pytorch",
                 "hessian-eigenthings", "einops", "unfoldNd", "tqdm", "einconv", "opt-einsum", "linear_operator"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
