"""The validated problem that every backend computes on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .activations import Activation
from .losses import DIAGONAL_LOSSES, LOSS_CODES

CURVATURES = ("hessian", "ggn")


REDUCTIONS = ("mean", "sum")

#: Which of a layer's parameters are in the set (Problem.parts; codes shared with the C++ core).
PART_ALL, PART_WEIGHT, PART_BIAS, PART_NONE = 0, 1, 2, 3


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
    #: Which parameters of each layer the curvature is taken over (PART_ALL, PART_WEIGHT,
    #: PART_BIAS or PART_NONE per layer); None: all of them.  The moments, bounds and products
    #: are those of the principal submatrix of the selected parameters.
    parts: tuple[int, ...] | None = None

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
    def layers_in(self) -> tuple[bool, ...] | None:
        """Whether each layer has a parameter in the set; None: all parameters."""
        return None if self.parts is None else tuple(p != PART_NONE for p in self.parts)

    @property
    def partial(self) -> bool:
        """Whether some layer has only its weights or only its bias in the set (the engines
        then mask the columns of a~ and the delta terms, docs/design.md "Parameter subsets")."""
        return self.parts is not None and any(p in (PART_WEIGHT, PART_BIAS) for p in self.parts)

    def layer_params(self, layer: int) -> int:
        """Parameters of layer ``layer`` (0-based) in the set."""
        return part_size(self.weights[layer], self.biases[layer], PART_ALL if self.parts is None else self.parts[layer])

    @property
    def n_params(self) -> int:
        """Parameters the curvature is taken over."""
        if self.parts is None:
            return self.n_params_all
        return sum(self.layer_params(l) for l in range(self.n_layers))

    @property
    def n_params_all(self) -> int:
        """Parameters of the whole model (the engine's products work on all of them)."""
        return n_params(self.weights, self.biases)

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


def part_size(W: np.ndarray, b: np.ndarray | None, part: int) -> int:
    """Parameters of a layer (W, b) in the part ``part`` (PART_*)."""
    nb = 0 if b is None else int(b.size)
    return {PART_ALL: int(W.size) + nb, PART_WEIGHT: int(W.size), PART_BIAS: nb, PART_NONE: 0}[part]


def n_params(weights: Sequence[np.ndarray], biases: Sequence[np.ndarray | None]) -> int:
    return int(sum(w.size + (0 if b is None else b.size) for w, b in zip(weights, biases)))
