"""The packaged example data set: 8x8 handwritten digits."""

from __future__ import annotations

import io
from importlib import resources

import numpy as np

__all__ = ["load_digits"]


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 handwritten digits (UCI ML digits, as in scikit-learn): 1797 samples, 10 classes.

    Returns
    -------
    X : float64 array (1797, 64)
        Pixel intensities scaled to [0, 1] (the stored counts 0..16 divided by 16).
    y : int64 array (1797,)
        Class labels 0..9.
    """
    raw = (resources.files("wsbound_fast") / "data" / "digits.npz").read_bytes()
    with np.load(io.BytesIO(raw)) as data:
        X = data["X"].astype(np.float64) / 16.0
        y = data["y"].astype(np.int64)
    return X, y
