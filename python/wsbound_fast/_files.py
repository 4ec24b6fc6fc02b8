"""Model and data files of the command line.

MODEL: an ``.npz`` of ``W0, b0, W1, b1, ...`` (W_l of shape (d_out, d_in) as torch.nn.Linear,
b_l optional per layer; an optional ``activation`` array of names), or a torch.save-d
``nn.Sequential`` (read safely, see :func:`wsbound_fast._torch.load_module`).
DATA: an ``.npz`` with ``X`` (N, d) and ``y`` (N,) or (N, C); other arrays are ignored.

Every problem with a file raises ValueError (or OSError for a missing file) with a message
that names the file.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Model", "load_data", "load_model", "parse_activation"]

_KEY = re.compile(r"^([Wb])(\d+)$")


@dataclass
class Model:
    """A model read from a file: a torch module, or layers plus activations (None: not stored)."""

    source: str  # "npz" or "torch"
    layers: Any  # list of (W, b), or the torch module
    activation: Any  # list of names from the npz, or None
    dims: tuple[int, ...]
    description: str


def _check_file(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} is a directory, not a file: {path}")


def _is_npz(path: str) -> bool:
    """A zip whose members are all .npy arrays (torch.save also writes zips, with data.pkl)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except zipfile.BadZipFile:
        return False
    return all(n.endswith(".npy") for n in names)


def _open_npz(path: str, what: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            if not isinstance(f, np.lib.npyio.NpzFile):  # pragma: no cover - _is_npz checked
                raise ValueError("not an .npz archive")
            return {k: f[k] for k in f.files}
    except (ValueError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise ValueError(f"{what} {path}: cannot read the .npz archive: {exc}") from None


def parse_activation(text: str | None) -> Any:
    """The --activation argument: ``tanh``, ``tanh,relu`` (one per hidden layer) or ``leaky_relu:0.2``."""
    if text is None:
        return None
    items: list[Any] = []
    for part in text.split(","):
        part = part.strip()
        name, sep, param = part.partition(":")
        if sep:
            try:
                items.append((name.strip(), float(param)))
            except ValueError:
                raise ValueError(f"--activation: cannot read the parameter of {part!r} (expected e.g. leaky_relu:0.2)") from None
        else:
            items.append(name)
    return items[0] if len(items) == 1 else items


def _npz_model(path: str) -> Model:
    arrays = _open_npz(path, "MODEL")
    activation = None
    if "activation" in arrays:
        act = arrays.pop("activation")
        if act.dtype.kind != "U" or act.ndim > 1:
            raise ValueError(f"MODEL {path}: 'activation' must be a string or a 1-D array of strings; got dtype {act.dtype}")
        activation = parse_activation(",".join(np.atleast_1d(act).tolist()))
    bad = sorted(k for k in arrays if not _KEY.match(k))
    if bad:
        raise ValueError(f"MODEL {path}: unexpected arrays {', '.join(bad)}; expected W0, b0, W1, b1, ... "
                         "(b optional) and optionally 'activation'")
    idx = {int(_KEY.match(k).group(2)) for k in arrays if k.startswith("W")}  # type: ignore[union-attr]
    if not idx:
        raise ValueError(f"MODEL {path}: no weight arrays; expected W0, b0, W1, b1, ...")
    L = max(idx) + 1
    missing = [f"W{i}" for i in range(L) if i not in idx]
    if missing:
        raise ValueError(f"MODEL {path}: missing {', '.join(missing)} (layers must be numbered W0..W{L - 1})")
    stray = sorted(k for k in arrays if k.startswith("b") and int(k[1:]) >= L)
    if stray:
        raise ValueError(f"MODEL {path}: bias {', '.join(stray)} has no weight W{stray[0][1:]}")
    layers = [(arrays[f"W{i}"], arrays.get(f"b{i}")) for i in range(L)]
    for i, (W, _) in enumerate(layers):
        if W.ndim != 2:
            raise ValueError(f"MODEL {path}: W{i} must be 2-D (d_out, d_in); got shape {W.shape}")
    dims = (int(layers[0][0].shape[1]),) + tuple(int(W.shape[0]) for W, _ in layers)
    return Model("npz", layers, activation, dims, path)


def load_model(path: str) -> Model:
    """Read MODEL: an .npz of W0, b0, ... or (with torch installed) a saved nn.Sequential."""
    _check_file(path, "MODEL")
    if _is_npz(path):
        return _npz_model(path)
    from . import _torch

    try:
        _torch._import_torch()
    except ImportError:
        raise ValueError(f"MODEL {path} is not an .npz of W0, b0, W1, b1, ...; reading it as a saved torch "
                         "module needs PyTorch, which is not installed") from None
    module = _torch.load_module(path)
    layers, _, _ = _torch.convert(module)  # errors name the unsupported module
    dims = (int(layers[0][0].shape[1]),) + tuple(int(W.shape[0]) for W, _ in layers)
    return Model("torch", module, None, dims, f"{path} (torch {type(module).__name__})")


def load_data(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read DATA: an .npz with X and y."""
    _check_file(path, "DATA")
    if not _is_npz(path):
        raise ValueError(f"DATA {path} is not an .npz archive (expected one with arrays X and y, e.g. from np.savez)")
    arrays = _open_npz(path, "DATA")
    missing = [k for k in ("X", "y") if k not in arrays]
    if missing:
        raise ValueError(f"DATA {path}: missing array {' and '.join(missing)}; it holds {sorted(arrays) or 'nothing'}")
    return arrays["X"], arrays["y"]
