"""The explicit P x P curvature matrix, assembled block by block in NumPy.

For small models and validation only: it takes P^2 float64 values of memory.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from .._backends import selected_columns
from .._backends.numpy import ARRAYS
from .._engine.data import HostData
from .._engine.features import block_features
from .._engine.namespace import Weights
from .._problem.inputs import adapt_inputs
from .._problem.validate import validate

#: Largest P for which dense_hessian builds the matrix (P^2 float64 = 3.2 GB at the limit).
MAX_DENSE_PARAMS = 20000


def _param_index(d_out: int, d_in: int, bias: bool) -> np.ndarray:
    """index[r, c] of W[r, c] (c < d_in) or b[r] (c = d_in) within the layer's parameters."""
    idx = np.empty((d_out, d_in + int(bias)), dtype=np.int64)
    idx[:, :d_in] = np.arange(d_out * d_in).reshape(d_out, d_in)
    if bias:
        idx[:, d_in] = d_out * d_in + np.arange(d_out)
    return idx


def dense_hessian(layers: Any, X: Any, y: Any = None, *, activation: Any = None, curvature: str = "hessian",
                  reduction: str | None = None, loss: Any = "cross_entropy", params: Any = None) -> np.ndarray:
    """The P x P Hessian (or GGN) of the loss (``loss`` as for :func:`bound`), as a dense NumPy array.

    Parameters are ordered layer by layer, W row-major then b (as
    ``torch.nn.Sequential.parameters()``).  Refuses P > 20000; use :func:`bound` there.
    Takes the same inputs as :func:`bound` (a torch module and tensors too); with ``params``
    (or a module's frozen layers) it is the principal submatrix of the selected parameters.
    """
    layers, X, y, activation, params = adapt_inputs(layers, X, y, activation, loss=loss, params=params,
                                                    memory_limit=None)
    # The explicit blocks need the generic features (dense G_lm for every l <= m).
    prob = replace(validate(layers, X, y, activation=activation, curvature=curvature, reduction=reduction,
                            loss=loss, params=params), structured=False)
    cols = selected_columns(prob)
    prob = replace(prob, parts=None)  # the whole matrix, then the selected rows and columns
    P = prob.n_params_all
    if P > MAX_DENSE_PARAMS:
        raise ValueError(
            f"dense_hessian: the model has P = {P} parameters and the dense matrix would take "
            f"{P * P * 8 / 2**30:.1f} GiB; it is limited to P <= {MAX_DENSE_PARAMS}. "
            "Use wsbound_fast.bound() for tr(H), tr(H^2) and eigenvalue bounds at any size."
        )
    L = prob.n_layers
    dims = [prob.weights[0].shape[1]] + [w.shape[0] for w in prob.weights]
    index, offset = [], 0
    for l in range(1, L + 1):
        has_b = prob.biases[l - 1] is not None
        index.append(_param_index(dims[l], dims[l - 1], has_b) + offset)
        offset += dims[l] * dims[l - 1] + dims[l] * int(has_b)
    H = np.zeros((P, P))
    N = prob.n_samples
    net, data = Weights.of(prob, ARRAYS), HostData(prob, ARRAYS)
    for lo in range(0, N, prob.batch_size):
        hi = min(lo + prob.batch_size, N)
        f = block_features(prob, ARRAYS, net, data.rows(lo, hi), data.label_rows(lo, hi))
        B = hi - lo
        for l in range(1, L + 1):
            for m in range(l, L + 1):
                Glm = f.G[l, m].reshape(B, dims[l], dims[m])
                blk = np.einsum("nrs,nc,ne->rcse", Glm, f.at[l], f.at[m], optimize=True)
                if prob.hessian and m > l:
                    if m == l + 1:
                        Q = np.einsum("nr,re->ner", f.sp[l], np.eye(dims[l]))
                    else:
                        Q = f.Q[l, m]
                    # delta term: a~_{l-1}[c] delta_m[s] Q_lm[e, r]; zero on the bias column e
                    blk[:, :, :, : dims[m - 1]] += np.einsum("nc,ns,ner->rcse", f.at[l], f.delta[m], Q, optimize=True)
                il, im = index[l - 1].ravel(), index[m - 1].ravel()
                blk = blk.reshape(il.size, im.size)
                H[np.ix_(il, im)] += blk
                if m > l:
                    H[np.ix_(im, il)] += blk.T
    if prob.mean:
        H /= prob.divisor
    if cols is not None:
        H = np.ascontiguousarray(H[np.ix_(cols, cols)])
    return H
