"""Rows of X and their label rows, served block by block to the engine."""

from __future__ import annotations

from typing import Any

import numpy as np

from .namespace import Arrays


def label_rows(prob: Any, lo: int, hi: int) -> np.ndarray:
    """The (hi - lo, C) float64 label rows of samples lo..hi-1 (one-hot for class indices), on the host."""
    if prob.soft:
        return prob.labels[lo:hi]
    rows = np.zeros((hi - lo, prob.n_classes))
    rows[np.arange(hi - lo), prob.labels[lo:hi]] = 1.0
    return rows


class HostData:
    """X and the labels of a problem in host memory (NumPy arrays), each block converted when asked
    for: X[lo:hi] as float64 (X may be float32 or strided; the engine sees one layout)."""

    def __init__(self, prob: Any, arr: Arrays) -> None:
        self.prob, self.arr = prob, arr

    def rows(self, lo: int, hi: int) -> Any:
        return self.arr.from_host(np.asarray(self.prob.X[lo:hi], dtype=np.float64))

    def label_rows(self, lo: int, hi: int) -> Any:
        return self.arr.from_host(label_rows(self.prob, lo, hi))
