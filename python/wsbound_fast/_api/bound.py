"""The public entry point: bound()."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any

from .._backends import distributed, moments, validate_for
from .._engine.schedule import ProgressFn, select_layers, total_moments
from .._problem.problem import BACKENDS
from .._problem.validate import _choice, compute_dtype
from .._spectral.bounds import Bound, ws_bounds
from .._spectral.lanczos import basis_memory_limit
from .._spectral.refine import check_exact_options, refine
from .._spectral.rounding import moment_allowance
from .progress import Reporter


def bound(layers: Any, X: Any, y: Any = None, *, activation: Any = None, curvature: str = "hessian",
          reduction: str | None = None, batch_size: int | None = None, threads: int | None = None,
          backend: str = "cpp", memory_limit: int | None = None, progress: bool = False,
          callback: ProgressFn | None = None, device: Any = None, dtype: Any = None, exact: bool = False,
          certify: int | bool | None = None, rtol: float = 1e-2, which: str = "LA", lanczos_tol: float = 1e-10,
          lanczos_maxiter: int | None = None, seed: int = 0, loss: Any = "cross_entropy",
          params: Any = None, client: Any = None) -> Bound:
    """Exact tr(H), tr(H^2) of the loss curvature of an MLP, and WS bounds.

    Parameters
    ----------
    layers : sequence of (W, b), or a torch.nn.Sequential
        W of shape (d_out, d_in) (torch.nn.Linear layout), b of shape (d_out,) or None.
        A torch module is read by :func:`from_torch` (weights copied to float64).
    X : array (N, d_0), or a torch tensor (any device; copied to host)
        Inputs, float32 or float64, any memory layout.  With a module that starts with
        nn.Flatten, X of shape (N, ...) is flattened to (N, -1).  Or a torch DataLoader (not
        shuffling, drop_last=False) or any iterable of (inputs, targets) batches, with y left
        out: collected once, in order (beyond ``memory_limit`` into a temporary file).
    y : the targets, an array or a tensor.  Cross-entropy: (N,) class indices, or (N, C)
        probability rows (soft labels).  mse: (N, C) reals, (N,) reals when C = 1, or (N,)
        class indices (one-hot targets) when C >= 2.  bce: (N, C) in [0, 1], or (N,) when C = 1.
    activation : str or list of str, or None
        One name for every hidden layer or one per hidden layer: tanh, sigmoid, softplus,
        gelu, gelu_tanh, silu, identity, relu, leaky_relu (or ("leaky_relu", slope)).
        None (the default) means the module's own activations for a torch module (an
        explicit value must then agree with them); for a list of layers with hidden layers
        it must be given (ValueError otherwise: the layers do not say which it is).
    curvature : "hessian" (the full Hessian) or "ggn" (generalized Gauss-Newton).
    reduction : "mean" (as torch: cross-entropy averaged over the N samples, mse and bce over
        the N C elements) or "sum".  None (the default): a loss module's own reduction, else "mean".
    loss : "cross_entropy" (softmax cross-entropy of the logits, the default), "mse" (squared
        error, torch.nn.functional.mse_loss) or "bce" (binary cross-entropy of the logits,
        binary_cross_entropy_with_logits); or a torch module: nn.CrossEntropyLoss (its
        reduction, label_smoothing and ignore_index as torch applies them; weight is refused),
        nn.MSELoss, nn.BCEWithLogitsLoss (weight and pos_weight are refused).  An explicit
        ``reduction`` must agree with a module's.
    params : None (the default): every parameter of a list of layers, and the trainable ones
        (``requires_grad``) of a torch module; or which parameters to take the curvature over:
        layer indices (0-based: a layer's weights and bias) and "W<i>" / "b<i>" (its weights
        or its bias alone).  The moments and every bound are then those of
        the principal submatrix of those parameters (``n_params`` counts them).
    batch_size : samples per streamed block; default chosen from ``memory_limit``.
    threads : worker threads of the C++ backend (default: all cores available).  The NumPy
        backend uses its BLAS's own threads.  Results do not depend on it.
    backend : "cpp" (compiled core), "numpy" (the same algorithm in NumPy) or "torch" (the
        same algorithm on torch tensors, CPU or GPU; needs torch installed).
    memory_limit : bytes the engine may use for features and scratch (default: a quarter
        of the machine's memory, at most 4 GiB; for backend="torch" on CUDA, half of the
        device's free memory).
    progress : show a progress bar over block pairs on stderr (tqdm when installed).
    callback : called as ``callback(done, total)`` with the number of block pairs done,
        about ten times a second at most and once at the end; an exception it raises stops
        the computation and propagates.
    device : backend="torch" only: where to compute ("cpu", "cuda", "cuda:1", a
        torch.device).  Default: the device of X (or of the weights) if they are tensors,
        else the CPU.  X is streamed to it block by block.
    dtype : "float64" (default) or "float32", for backend="cpp" or "torch": the Gram products
        in float32 (cpp: features computed in float64 and rounded once; torch: features in
        float32 too), every product widened to float64 before the elementwise products and
        all sums (float64 accumulation); about 1e-6 relative, see the README.  It applies to
        the moments only: the curvature-vector products of ``exact`` / ``certify`` are float64.
    exact : also run Lanczos (:func:`eigsh`) over the exact curvature-vector product
        (:func:`hvp`, on the same backend: for "torch" on ``device``, within ``memory_limit``) and
        report ``lambda_max``, ``lambda_min`` (Rayleigh quotients: lambda_max is a certified
        lower bound on the largest eigenvalue, and converges to it) and the tightness ratio
        ``lambda_max_upper / lambda_max``.  For the GGN (positive semi-definite) Lanczos waits
        for the top end only; ``lambda_min`` is then the smallest Ritz value as it stands.
    certify : k >= 1: the deflated certificate from (up to) the k Ritz pairs of largest
        magnitude (implies ``exact``); reports ``lambda_max_upper_deflated``,
        ``lambda_min_lower_deflated``, the k used (``certify_k``, the leading pairs that give
        the smallest bound) and the residual norm (``certify_residual``).
        ``certify=True``: certified to a requested width instead: block Lanczos (8 vectors per
        pass over the data) runs until the certified bracket of lambda_max (``which``) is at most
        ``rtol`` wide relative to it (hi/lo - 1 <= rtol), choosing k itself; the result reports
        ``certify_width`` and ``certify_met``, and a RuntimeWarning says what stopped it short
        (``lanczos_maxiter``, the memory budget that bounds the Lanczos basis, or a spectrum
        whose unresolved bulk holds so much of tr(H^2) that the moments cannot certify rtol:
        then it stops early, docs/certificates.md section 8).
    rtol : certify=True only: the relative width to reach (default 1e-2).
    which : certify=True only: "LA" (lambda_max, default), "SA" (lambda_min) or "BE" (both).
    lanczos_tol, lanczos_maxiter, seed : Lanczos options (see :func:`eigsh`); the default
        maxiter is min(P, max(300, 10 k)), within half of ``memory_limit`` for the basis (which
        stays in host memory: for "torch" with no memory_limit given, the host's default).
    client : a ``dask.distributed.Client`` (needs the ``dask`` extra): compute on the cluster's
        workers instead of here.  The blocks of samples are the ones this call would use
        locally; the block pairs are cut into tiles that run as tasks (the chosen backend on
        each worker: ``threads`` per task, default 1, so give workers one dask thread per
        core; "torch" on each worker's ``device``), and the client adds the tiles' sums in the
        engine's fixed order: the moments are bitwise the local engine's for the same
        batch_size and CPU variant, for any number of workers.  X may be a ``dask.array``
        (chunked along samples; rechunked to the blocks on the workers, never gathered).
        NumPy X and the labels are sent once, in blocks; the weights are broadcast once.  The
        Lanczos products of ``exact`` / ``certify`` run on the workers too (Lanczos itself
        here).  ``progress`` / ``callback`` count block pairs as their tiles finish.

    Returns
    -------
    Bound
        trace, trace_sq (exact to float64 rounding) and the Wolkowicz-Styan bounds on the
        largest and smallest eigenvalue of the P x P curvature matrix; the rank-aware bounds
        (``rank``, ``lambda_max_upper_rank``, ``lambda_min_lower_rank``), the per-layer bounds
        (``layer_bounds``) and the certified brackets ``lambda_max_bracket``,
        ``lambda_min_bracket`` (the best of all the bounds above; docs/certificates.md).
    """
    chosen = _choice(backend, "backend", BACKENDS)
    reporter = Reporter(progress, callback)
    # a torch module becomes (layers, activations); tensors become arrays except for the torch backend
    prob = validate_for(chosen, layers, X, y, activation=activation, curvature=curvature, reduction=reduction,
                        batch_size=batch_size, threads=threads, memory_limit=memory_limit, device=device, dtype=dtype,
                        loss=loss, params=params, client=client)
    if chosen != "torch" and compute_dtype(dtype) == "float32":
        if chosen != "cpp":
            raise ValueError(f"dtype='float32' needs backend='cpp' or 'torch'; got backend={chosen!r}")
        prob = dataclasses.replace(prob, f32=True)
    opts = check_exact_options(exact, certify, lanczos_tol, lanczos_maxiter, seed, prob.n_params,
                               basis_memory_limit(prob), rtol, which)
    with contextlib.ExitStack() as stack:
        cluster = None
        if client is not None:
            cluster = stack.enter_context(distributed.Cluster(client, prob, chosen, device=device, dtype=dtype,
                                                              threads=threads, memory_limit=memory_limit))
        return _bound(prob, chosen, reporter, opts, cluster)


def _bound(prob: Any, chosen: str, reporter: Reporter, opts: Any, cluster: Any) -> Bound:
    t0 = time.perf_counter()
    try:
        mom = moments(prob, chosen, reporter if reporter.active else None, cluster=cluster)
    finally:
        reporter.close()
    sel = select_layers(mom, prob.layers_in)  # the selected parameters' principal submatrix
    layer_trace, blocks = sel.trace, sel.blocks
    tr, tr2 = total_moments(layer_trace, blocks)
    elapsed = time.perf_counter() - t0
    if prob.mean:
        N = prob.divisor  # N, or N C for mse and bce (torch's mean over every element)
        tr, tr2 = tr / N, tr2 / (N * N)
    if not (math.isfinite(tr) and math.isfinite(tr2)):
        raise FloatingPointError(
            f"the curvature moments overflowed float64 (trace={tr!r}, trace_sq={tr2!r}); "
            "the weights or inputs are too large in magnitude"
        )
    allowance = moment_allowance(prob, sel.trace_abs, sel.norms)
    if sel is not mom:  # a product still runs over the whole model: its allowance is the model's
        allowance = dataclasses.replace(allowance, product=moment_allowance(prob, mom.trace_abs, mom.norms).product)
    # a trace_sq below 0 can only be rounding (it is a squared norm): 0 is closer to the truth
    tr2 = max(tr2, 0.0)
    ws = ws_bounds(tr, tr2, prob.n_params, trace_err=allowance.trace, trace_sq_err=allowance.trace_sq)
    res = Bound(
        n_params=prob.n_params, n_samples=prob.n_samples, trace=tr, trace_sq=tr2, mean=ws.mean, std=ws.std,
        lambda_max_lower=ws.lambda_max_lower, lambda_max_upper=ws.lambda_max_upper,
        lambda_min_lower=ws.lambda_min_lower, lambda_min_upper=ws.lambda_min_upper,
        curvature=prob.curvature, reduction=prob.reduction, backend=chosen, elapsed_s=elapsed, loss=prob.loss,
    )
    return refine(res, prob, chosen, layer_trace, blocks, opts, allowance, cluster)
