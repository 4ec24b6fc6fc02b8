"""Data given as batches: a torch DataLoader, or any iterable of (X, y) batches.

The curvature is that of the whole data set, so the batches are collected once, in order, into
one X and one y (NumPy, on the host) that the engine then streams in its own blocks.  When the
inputs would take more than the memory budget they go to a temporary file and are read back as
a memory map, block by block.  A loader that would not give the same data set twice is
refused: a shuffling DataLoader (its order changes nothing in exact arithmetic, but it is the
mark of a training loader, with random augmentation) and drop_last=True (samples left out).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterable
from typing import Any

import numpy as np

from .._planning.blocks import default_memory_limit
from . import torch_input


def is_batches(X: Any) -> bool:
    """Whether X is given as batches (an iterable that is not itself an array or a tensor)."""
    if isinstance(X, (np.ndarray, str, bytes, dict)) or X is None:
        return False
    if hasattr(X, "shape") and hasattr(X, "dtype"):  # an array of another library (dask, CuPy, JAX)
        return False
    if torch_input.is_tensor(X):
        return False
    if isinstance(X, (list, tuple)):  # a list of (X, y) pairs, not a nested list of numbers
        return len(X) > 0 and all(isinstance(b, (tuple, list)) and len(b) > 0 and not np.isscalar(b[0])
                                  and not isinstance(b[0], (list, tuple)) for b in X)
    return isinstance(X, Iterable) or _is_dataloader(X)


def _is_dataloader(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.utils.data.DataLoader)


def _check_loader(loader: Any) -> None:
    data = sys.modules["torch"].utils.data
    samplers = (loader.sampler, getattr(getattr(loader, "batch_sampler", None), "sampler", None))
    if any(isinstance(s, data.RandomSampler) for s in samplers):
        raise ValueError("X: the DataLoader shuffles (shuffle=True / a RandomSampler): the curvature is that of the "
                         "whole data set, and a shuffling loader is the training one, often with random "
                         "augmentation; pass a DataLoader with shuffle=False over the same dataset")
    if getattr(loader, "drop_last", False):
        raise ValueError("X: the DataLoader has drop_last=True and would leave samples out of the data set; "
                         "pass one with drop_last=False")


def _to_numpy(v: Any, what: str, i: int) -> np.ndarray:
    if torch_input.is_tensor(v):
        return torch_input.tensor_to_numpy(v, copy=False)
    try:
        return np.asarray(v)
    except Exception as exc:  # noqa: BLE001 - ragged lists and the like
        raise TypeError(f"X: batch {i}: its {what} could not be converted to an array: {exc}") from None


class _Sink:
    """Rows appended batch by batch: in memory up to ``budget`` bytes, then in a temporary file
    (read back as a memory map)."""

    def __init__(self, budget: int) -> None:
        self.budget, self.parts, self.nbytes = budget, [], 0
        self.file: Any = None
        self.dtype: np.dtype | None = None
        self.width: tuple[int, ...] | None = None
        self.rows = 0

    def add(self, a: np.ndarray) -> None:
        if self.file is None and self.nbytes + a.nbytes > self.budget:
            self.file = tempfile.NamedTemporaryFile(prefix="wsbound_fast-", suffix=".bin", delete=False)  # noqa: SIM115
            for p in self.parts:
                self.file.write(np.ascontiguousarray(p, dtype=self.dtype).tobytes())
            self.parts = []
        if self.file is not None:
            self.file.write(np.ascontiguousarray(a, dtype=self.dtype).tobytes())
        else:
            self.parts.append(a)
        self.nbytes += a.nbytes
        self.rows += a.shape[0]

    def array(self) -> np.ndarray:
        if self.file is None:
            return np.concatenate(self.parts, axis=0)
        self.file.close()
        out = np.memmap(self.file.name, dtype=self.dtype, mode="r", shape=(self.rows, *self.width))
        try:  # the mapping keeps the data; the name can go (POSIX)
            os.unlink(self.file.name)
        except OSError:  # pragma: no cover - Windows keeps it until the map closes
            pass
        return out


def resolve(X: Any, y: Any, memory_limit: int | None) -> tuple[Any, Any]:
    """(X, y) as the validation takes them: X and y as given, or, when y is None and X is a
    loader of (X, y) batches, the collected data set.  ``memory_limit`` None: the default
    budget."""
    if not is_batches(X):
        if y is None:
            raise TypeError("y is required: the targets of X (or pass a torch DataLoader, or an iterable of "
                            "(X, y) batches, as X and leave y out)")
        return X, y
    if y is not None:
        raise ValueError("X is a loader of (X, y) batches, which holds the targets: leave y out (pass v= or k= "
                         "by keyword to hvp and eigsh)")
    return collect(X, default_memory_limit() if memory_limit is None else int(memory_limit))


def collect(batches: Any, memory_limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) of the whole data set from batches of (X, y), in order.  X beyond ``memory_limit``
    bytes is kept in a temporary file (a read-only memory map)."""
    if _is_dataloader(batches):
        _check_loader(batches)
    xs = _Sink(memory_limit)
    ys: list[np.ndarray] = []
    for i, batch in enumerate(batches):
        if isinstance(batch, dict) or not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"X: batch {i} must be an (inputs, targets) pair; got {type(batch).__name__}"
                            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
        xb, yb = _to_numpy(batch[0], "inputs", i), _to_numpy(batch[1], "targets", i)
        if xb.ndim < 1 or yb.ndim < 1 or xb.shape[0] != yb.shape[0]:
            raise ValueError(f"X: batch {i} has inputs of shape {xb.shape} and targets of shape {yb.shape}; "
                             "both need one row per sample")
        if xb.dtype.kind not in "iuf" or xb.dtype == np.bool_:
            raise TypeError(f"X: batch {i}: inputs must hold real numbers; got dtype {xb.dtype}")
        if xs.width is None:
            xs.width, xs.dtype = xb.shape[1:], np.result_type(xb.dtype, np.float32)
        elif xb.shape[1:] != xs.width:
            raise ValueError(f"X: batch {i} has inputs of shape {xb.shape[1:]} per sample; batch 0 had {xs.width}")
        if ys and yb.shape[1:] != ys[0].shape[1:]:
            raise ValueError(f"X: batch {i} has targets of shape {yb.shape[1:]} per sample; batch 0 had "
                             f"{ys[0].shape[1:]}")
        xs.add(np.asarray(xb, dtype=xs.dtype))
        ys.append(yb)
    if xs.rows == 0:
        raise ValueError("X: the loader gave no samples")
    return xs.array(), np.concatenate(ys, axis=0)


def count(batches: Any) -> int:
    """Samples in batches of (X, y): len(dataset) for a DataLoader that has one, else counted."""
    if _is_dataloader(batches):
        _check_loader(batches)
        try:
            return len(batches.dataset)
        except TypeError:
            pass
    total = 0
    for i, batch in enumerate(batches):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"n_samples: batch {i} must be an (inputs, targets) pair")
        total += len(batch[0])
    return total
