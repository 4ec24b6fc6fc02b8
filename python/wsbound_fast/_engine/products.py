"""Curvature-vector products of one block of samples (docs/design.md, "Curvature-vector
products"): R-propagation, mirroring cpp/wsbound/hvp.cpp."""

from __future__ import annotations

from typing import Any

from .._problem.problem import Problem
from .activations import evaluate
from .losses import a_apply, output
from .namespace import Arrays, Weights


def offsets(prob: Problem) -> list[int]:
    """Where each layer's parameters (W row-major, then b) start in the flat vector; P last."""
    off = [0]
    for W, b in zip(prob.weights, prob.biases):
        off.append(off[-1] + W.size + (0 if b is None else b.size))
    return off


def block_hvp(prob: Problem, arr: Arrays, net: Weights, Xb: Any, Yb: Any, V: Any, off: list[int]) -> Any:
    """sum over the block of H_n V[j] (mirrors cpp/wsbound/hvp.cpp; layers 1..L).

    ``net`` (the weights), ``Xb`` (B, d_0), ``Yb`` (B, C) label rows and ``V`` (k, P) are arrays on
    ``arr``'s device; the result is a (k, P) array there.  ``off`` is :func:`offsets`.
    """
    xp = arr.xp
    W, bias = net.W, net.b
    L, hess = prob.n_layers, prob.hessian
    nw = [0] + [Wl.shape[0] * Wl.shape[1] for Wl in W]  # entries of W_l (torch's .size is a method)
    A: list[Any] = [Xb]
    S1: list[Any] = [None] * (L + 1)
    S2: list[Any] = [None] * (L + 1)
    z = Xb
    for l in range(1, L + 1):
        z = A[l - 1] @ W[l - 1].T
        if bias[l - 1] is not None:
            z = z + bias[l - 1]
        if l < L:
            a, S1[l], S2[l] = evaluate(prob.activations[l - 1], z, arr)
            A.append(a)
    out = output(prob, z, Yb, xp)  # cross-entropy: shifted to r = argmax z (docs/numerics.md section 1)
    D: list[Any] = [None] * (L + 1)
    G: list[Any] = [None] * (L + 1)
    D[L] = out.delta
    for l in range(L - 1, 0, -1):
        G[l] = D[l + 1] @ W[l]
        D[l] = S1[l] * G[l]
    res = xp.zeros_like(V)
    for j in range(V.shape[0]):
        v = V[j]
        Vl = [v[off[l - 1]: off[l - 1] + nw[l]].reshape(W[l - 1].shape) for l in range(1, L + 1)]
        RZ: list[Any] = [None] * (L + 1)
        RA: list[Any] = [None] * (L + 1)
        for l in range(1, L + 1):
            rz = A[l - 1] @ Vl[l - 1].T
            if l > 1:
                rz += RA[l - 1] @ W[l - 1].T
            if bias[l - 1] is not None:
                rz += v[off[l - 1] + nw[l]: off[l]]
            RZ[l] = rz
            if l < L:
                RA[l] = S1[l] * rz
        RD: list[Any] = [None] * (L + 1)
        RD[L] = a_apply(out, RZ[L], xp)  # A R{z_L} (cross-entropy: shifted to r, no cancellation when p saturates)
        for l in range(L - 1, 0, -1):
            T = RD[l + 1] @ W[l]
            if hess:
                T += D[l + 1] @ Vl[l]
                RD[l] = S1[l] * T + S2[l] * RZ[l] * G[l]
            else:
                RD[l] = S1[l] * T
        for l in range(1, L + 1):
            gW = RD[l].T @ A[l - 1]
            if hess and l > 1:
                gW += D[l].T @ RA[l - 1]
            res[j, off[l - 1]: off[l - 1] + nw[l]] = gW.ravel()
            if bias[l - 1] is not None:
                res[j, off[l - 1] + nw[l]: off[l]] = RD[l].sum(axis=0)
    return res
