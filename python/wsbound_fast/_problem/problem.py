"""The validated problem that every backend computes on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .activations import Activation
from .losses import DIAGONAL_LOSSES, LOSS_CODES

CURVATURES = ("hessian", "ggn")


REDUCTIONS = ("mean", "sum")


#: Backends of the curvature-vector product (hvp, eigsh, bound(exact=...)).
HVP_BACKENDS = ("cpp", "numpy", "torch")


BACKENDS = ("cpp", "numpy", "torch")


@dataclass(frozen=True)
class Problem:
    """A validated problem, ready for a backend."""

    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray | None, ...]
    activations: tuple[Activation, ...]
    X: np.ndarray
    labels: np.ndarray
    soft: bool
    hessian: bool
    structured: bool
    mean: bool
    batch_size: int
    threads: int
    group_blocks: int
    memory_limit: int
    f32: bool = False  # cpp backend: Gram products in float32, float64 accumulation (dtype="float32"; Options::f32)
    #: NumPy and torch backends, K route: float64 values that the GEMM outputs of a chunk of
    #: sample pairs, and the elementwise work of a sub-chunk, may hold; set by
    #: :func:`~wsbound_fast._planning.blocks.plan_python` from the budget.  None: the
    #: cache-sized CPU defaults (``_planning.blocks.CPU_CHUNK_VALUES``).
    chunks: tuple[float, float] | None = None
    #: The loss (a name of ``_problem.losses.LOSSES``); labels hold its targets.
    loss: str = "cross_entropy"
    #: The layers whose parameters (weights and bias) the curvature is taken over, one flag per
    #: layer; None: all of them.  The engine computes every layer; the moments, bounds and
    #: products are those of the principal submatrix of the selected parameters.
    layers_in: tuple[bool, ...] | None = None

    @property
    def n_layers(self) -> int:
        return len(self.weights)

    @property
    def n_samples(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.weights[-1].shape[0])

    @property
    def n_params(self) -> int:
        """Parameters the curvature is taken over (those of the selected layers)."""
        if self.layers_in is None:
            return self.n_params_all
        return n_params([W for W, k in zip(self.weights, self.layers_in) if k],
                        [b for b, k in zip(self.biases, self.layers_in) if k])

    @property
    def n_params_all(self) -> int:
        """Parameters of the whole model (the engine's products work on all of them)."""
        return n_params(self.weights, self.biases)

    def selected(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based) is in the parameter set."""
        return self.layers_in is None or self.layers_in[layer]

    @property
    def diagonal(self) -> bool:
        """Whether the loss's output curvature A is diagonal (mse, bce)."""
        return self.loss in DIAGONAL_LOSSES

    @property
    def loss_code(self) -> int:
        return LOSS_CODES[self.loss]

    @property
    def divisor(self) -> int:
        """What the reduction divides the sum over samples by: 1 for "sum"; for "mean" N
        (cross-entropy) or N C (mse, bce: torch's mean over every element).  tr(H) is divided
        by it, tr(H^2) by its square."""
        if not self.mean:
            return 1
        return self.n_samples * self.n_classes if self.diagonal else self.n_samples

    @property
    def curvature(self) -> str:
        return "hessian" if self.hessian else "ggn"

    @property
    def reduction(self) -> str:
        return "mean" if self.mean else "sum"


def n_params(weights: Sequence[np.ndarray], biases: Sequence[np.ndarray | None]) -> int:
    return int(sum(w.size + (0 if b is None else b.size) for w, b in zip(weights, biases)))
