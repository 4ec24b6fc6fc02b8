"""The losses a problem may name: names, core codes, torch loss modules, and their targets.

Per sample the engine works with the *summed* loss of one sample (docs/design.md, "Losses"):

    cross_entropy  l = -sum_k y_k log softmax(z)_k         A = w (diag p - p p^T)
    mse            l = sum_k (z_k - y_k)^2                 A = 2 I
    bce            l = sum_k softplus(z_k) - y_k z_k       A = diag(sigma(z) sigma(-z))

and "mean" divides the sum over samples by N (cross-entropy, as torch.nn.CrossEntropyLoss)
or by N * C (mse and bce, as torch.nn.MSELoss and torch.nn.BCEWithLogitsLoss, whose mean is
over every element).  mse and bce are the *diagonal* losses: their A is diagonal.
"""

from __future__ import annotations

import numbers
import sys
from typing import Any, NamedTuple

import numpy as np

#: Name -> code in the C++ core (cpp/wsbound/model.hpp, enum class Loss).
LOSS_CODES: dict[str, int] = {"cross_entropy": 0, "mse": 1, "bce": 2}

LOSSES = tuple(LOSS_CODES)

#: The losses whose output curvature A is diagonal (the K route's identity simplifies).
DIAGONAL_LOSSES = ("mse", "bce")

#: Accepted spellings of the loss names (lower-cased, stripped).
_ALIASES = {"cross_entropy": "cross_entropy", "crossentropy": "cross_entropy", "ce": "cross_entropy",
            "mse": "mse", "mse_loss": "mse", "squared_error": "mse",
            "bce": "bce", "bce_with_logits": "bce", "binary_cross_entropy_with_logits": "bce"}


class Loss(NamedTuple):
    """A resolved loss: its name, the reduction a torch module carries (None for a name), and
    what torch's CrossEntropyLoss applies to the targets."""

    name: str
    reduction: str | None = None
    label_smoothing: float = 0.0
    ignore_index: int | None = None

    @property
    def diagonal(self) -> bool:
        return self.name in DIAGONAL_LOSSES


def _torch_nn() -> Any:
    torch = sys.modules.get("torch")  # a torch module can exist only once torch is imported
    return None if torch is None else torch.nn


def _module_loss(loss: Any, nn: Any) -> Loss:
    """A Loss from a torch loss module, refusing the options that are not implemented."""
    red = loss.reduction
    if red not in ("mean", "sum"):
        raise ValueError(f"loss: {type(loss).__name__}(reduction={red!r}) is not supported; use 'mean' or 'sum' "
                         "(the curvature of a per-sample loss vector is not one matrix)")
    if type(loss) is nn.CrossEntropyLoss:
        if loss.weight is not None:
            raise ValueError("loss: CrossEntropyLoss(weight=...) (class weights) is not supported; "
                             "pass a CrossEntropyLoss without weight")
        return Loss("cross_entropy", red, check_label_smoothing(loss.label_smoothing), int(loss.ignore_index))
    if type(loss) is nn.MSELoss:
        return Loss("mse", red)
    if type(loss) is nn.BCEWithLogitsLoss:
        if loss.pos_weight is not None:
            raise ValueError("loss: BCEWithLogitsLoss(pos_weight=...) is not supported; pass one without pos_weight")
        if loss.weight is not None:
            raise ValueError("loss: BCEWithLogitsLoss(weight=...) is not supported; pass one without weight")
        return Loss("bce", red)
    if type(loss) is nn.BCELoss:
        raise ValueError("loss: nn.BCELoss takes probabilities; use nn.BCEWithLogitsLoss (or loss='bce') on a model "
                         "whose last Linear gives the logits, without a final Sigmoid")
    raise TypeError(f"loss: unsupported torch loss module {type(loss).__name__}; supported: CrossEntropyLoss, "
                    "MSELoss, BCEWithLogitsLoss (or the names 'cross_entropy', 'mse', 'bce')")


def resolve_loss(loss: Any, reduction: Any) -> tuple[Loss, Any]:
    """(Loss, reduction) from ``loss`` (a name or a torch loss module) and ``reduction`` (None:
    the module's, else "mean").  An explicit reduction must agree with a module's."""
    if isinstance(loss, str):
        key = _ALIASES.get(loss.strip().lower())
        if key is None:
            raise ValueError(f"loss must be one of {', '.join(map(repr, LOSSES))} or a torch loss module; got {loss!r}")
        return Loss(key), "mean" if reduction is None else reduction
    nn = _torch_nn()
    if nn is not None and isinstance(loss, nn.Module):
        res = _module_loss(loss, nn)
        if reduction is not None and isinstance(reduction, str) and reduction.strip().lower() != res.reduction:
            raise ValueError(f"reduction={reduction!r} disagrees with the loss module's reduction={res.reduction!r}; "
                             "leave reduction=None to use the module's")
        return res, res.reduction if reduction is None else reduction
    raise TypeError(f"loss must be a string ({', '.join(map(repr, LOSSES))}) or a torch loss module; "
                    f"got {type(loss).__name__}")


def _targets_array(y: Any, loss: str) -> np.ndarray:
    try:
        arr = np.asarray(y)
    except Exception as exc:  # noqa: BLE001 - ragged lists and the like
        raise TypeError(f"y must be an array of real numbers (targets of loss={loss!r}); could not convert: {exc}") from None
    if arr.dtype == np.bool_:
        arr = arr.astype(np.float64)  # boolean targets of a binary problem
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"y must hold real numbers (targets of loss={loss!r}); got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"y (targets of loss={loss!r}) contains NaN or Inf")
    return arr


def validate_targets(y: Any, n_samples: int, n_classes: int, loss: str) -> tuple[np.ndarray, bool]:
    """The targets of a diagonal loss as (labels, rows): int64 class indices (one-hot targets,
    rows False) or float64 target rows (N, C) (rows True).

    mse: (N, C) reals; (N,) reals when C = 1; (N,) integer class indices when C >= 2.
    bce: (N, C) in [0, 1]; (N,) in [0, 1] when C = 1.
    """
    arr = _targets_array(y, loss)
    C = n_classes
    if arr.ndim == 1:
        if arr.shape[0] != n_samples:
            raise ValueError(f"y must have one target per sample ({n_samples}) for loss={loss!r}; got {arr.shape[0]}")
        if C == 1:
            arr = arr.reshape(-1, 1)
        elif loss == "mse":
            if arr.dtype.kind == "f" and not np.all(arr == np.round(arr)):
                raise ValueError(f"y of shape ({n_samples},) for loss='mse' with C = {C} outputs must hold integer "
                                 f"class indices (one-hot targets); pass real targets as an ({n_samples}, {C}) array")
            if arr.size and (arr.min() < 0 or arr.max() >= C):
                raise ValueError(f"y holds class indices out of range for loss='mse': expected 0 <= y < {C} "
                                 f"(the last layer's outputs); got min {arr.min()}, max {arr.max()}")
            return np.ascontiguousarray(arr, dtype=np.int64), False
        else:
            raise ValueError(f"y for loss='bce' with C = {C} outputs must be an ({n_samples}, {C}) array of targets "
                             f"in [0, 1]; got shape {arr.shape}")
    if arr.ndim != 2 or arr.shape != (n_samples, C):
        raise ValueError(f"y for loss={loss!r} must have shape ({n_samples}, {C}) (samples, outputs)"
                         + (f" or ({n_samples},)" if C == 1 or loss == "mse" else "") + f"; got {arr.shape}")
    rows = np.ascontiguousarray(arr, dtype=np.float64)
    if loss == "bce" and rows.size and (rows.min() < 0.0 or rows.max() > 1.0):
        raise ValueError(f"y for loss='bce' must lie in [0, 1]; got min {rows.min()!r}, max {rows.max()!r}")
    return rows, True


def smoothed_rows(labels: np.ndarray, rows: bool, n_classes: int, eps: float) -> np.ndarray:
    """Label rows with torch's label smoothing: y (1 - eps) + eps / C (for class indices, y one-hot)."""
    if rows:
        return np.ascontiguousarray(labels * (1.0 - eps) + eps / n_classes)
    out = np.full((labels.shape[0], n_classes), eps / n_classes)
    out[np.arange(labels.shape[0]), labels] += 1.0 - eps
    return out


def check_label_smoothing(value: Any) -> float:
    if not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"loss: label_smoothing must be in [0, 1]; got {value!r}")
    return float(value)
