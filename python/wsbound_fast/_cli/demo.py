"""The demo: train a small tanh MLP on the digits and follow tr(H), tr(H^2) and the WS bounds.

Training is plain NumPy full-batch gradient descent with heavy-ball momentum (forward and
backward written out here); at a few checkpoints :func:`wsbound_fast.bound` is evaluated
on the full data set and one table row is printed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

import numpy as np

from .._api.bound import bound
from .._api.data import load_digits
from .._backends.compiled import load_core
from .._problem.problem import BACKENDS
from .._problem.validate import _choice
from .._spectral.bounds import Bound

__all__ = ["DemoRow", "checkpoint_epochs", "init_mlp", "loss_and_grads", "resolve_backend", "run_demo", "train"]

Layers = list[tuple[np.ndarray, np.ndarray]]

DEFAULT_HIDDEN = 32
DEFAULT_EPOCHS = 300
DEFAULT_CHECKPOINTS = 7
DEFAULT_LR = 0.5
DEFAULT_MOMENTUM = 0.9


def init_mlp(sizes: Sequence[int], rng: np.random.Generator) -> Layers:
    """Glorot-uniform weights (W of shape (d_out, d_in)) and zero biases."""
    layers: Layers = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:]):
        limit = np.sqrt(6.0 / (d_in + d_out))
        layers.append((rng.uniform(-limit, limit, size=(d_out, d_in)), np.zeros(d_out)))
    return layers


def loss_and_grads(layers: Layers, X: np.ndarray, y: np.ndarray) -> tuple[float, float, Layers]:
    """Mean cross-entropy, accuracy and gradients of a tanh MLP (softmax output)."""
    acts = [X]
    for W, b in layers[:-1]:
        acts.append(np.tanh(acts[-1] @ W.T + b))
    W, b = layers[-1]
    z = acts[-1] @ W.T + b
    z = z - z.max(axis=1, keepdims=True)
    logsum = np.log(np.exp(z).sum(axis=1))
    rows = np.arange(len(y))
    loss = float(np.mean(logsum - z[rows, y]))
    accuracy = float(np.mean(z.argmax(axis=1) == y))
    delta = np.exp(z - logsum[:, None])  # softmax p
    delta[rows, y] -= 1.0
    delta /= len(y)  # d loss / d z_L
    grads: Layers = []
    for i in range(len(layers) - 1, -1, -1):
        W, _ = layers[i]
        grads.append((delta.T @ acts[i], delta.sum(axis=0)))
        if i > 0:
            delta = (delta @ W) * (1.0 - acts[i] ** 2)  # tanh' = 1 - tanh^2
    grads.reverse()
    return loss, accuracy, grads


def train(layers: Layers, X: np.ndarray, y: np.ndarray, *, epochs: int, lr: float = DEFAULT_LR,
          momentum: float = DEFAULT_MOMENTUM, checkpoints: Sequence[int] = (),
          on_checkpoint: Callable[[int, Layers, float, float], None] | None = None) -> Layers:
    """Full-batch gradient descent with heavy-ball momentum; returns the trained layers.

    ``on_checkpoint(epoch, layers, loss, accuracy)`` is called after ``epoch`` updates for
    every epoch in ``checkpoints`` (0 is the initialisation).  ``layers`` is not modified.
    """
    params = [(W.copy(), b.copy()) for W, b in layers]
    velocity = [(np.zeros_like(W), np.zeros_like(b)) for W, b in params]
    wanted = set(checkpoints)
    for epoch in range(epochs + 1):
        loss, acc, grads = loss_and_grads(params, X, y)
        if epoch in wanted and on_checkpoint is not None:
            on_checkpoint(epoch, params, loss, acc)
        if epoch == epochs:
            break
        for (W, b), (vW, vb), (gW, gb) in zip(params, velocity, grads):
            vW *= momentum
            vW -= lr * gW
            vb *= momentum
            vb -= lr * gb
            W += vW
            b += vb
    return params


def checkpoint_epochs(epochs: int, count: int) -> list[int]:
    """Up to ``count`` (>= 2) epochs: 0, ``epochs`` and geometrically spaced ones in between."""
    if epochs <= 0:
        return [0]
    ticks = np.geomspace(1, epochs, max(count, 2) - 1)
    return sorted({0, *np.rint(ticks).astype(int).tolist()})


def resolve_backend(backend: str | None, notice: TextIO | None = None) -> str:
    """``backend``, or for None "cpp" if the compiled core imports, else "numpy" with a notice.

    An explicit "cpp" whose core cannot be imported raises ImportError here, before any work.
    """
    if backend is not None:
        which = _choice(backend, "backend", BACKENDS)
        if which == "cpp":
            load_core()
        return which
    try:
        load_core()
    except ImportError as exc:
        reason = exc.__cause__ if exc.__cause__ is not None else exc
        print(f"note: compiled backend unavailable ({reason}); falling back to backend='numpy' (slower)",
              file=notice if notice is not None else sys.stderr)
        return "numpy"
    return "cpp"


@dataclass(frozen=True)
class DemoRow:
    """One checkpoint of the demo."""

    epoch: int
    loss: float
    accuracy: float
    bound: Bound
    lambda_max: float | None = None  # exact largest eigenvalue, when run_demo was given a way to get it


_UNICODE = {"trH": "tr(H)", "trH2": "tr(H²)", "H2": "H²", "lo": "λ_max ≥", "hi": "λ_max ≤"}
_ASCII = {"trH": "tr(H)", "trH2": "tr(H^2)", "H2": "H^2", "lo": "lmax >=", "hi": "lmax <="}


def _labels(out: TextIO) -> dict[str, str]:
    """Column labels, in plain ASCII when ``out`` cannot encode the Unicode ones."""
    encoding = getattr(out, "encoding", None)
    if encoding:
        try:
            "".join(_UNICODE.values()).encode(encoding)
        except (UnicodeEncodeError, LookupError):
            return _ASCII
    return _UNICODE


_COLUMNS = (("epoch", 5), ("loss", 7), ("acc", 6), ("trH", 9), ("trH2", 9), ("lo", 9), ("hi", 9), ("s", 6))


def _fmt_row(cells: Sequence[str]) -> str:
    return "  ".join(c.rjust(w) for c, (_, w) in zip(cells, _COLUMNS))


def run_demo(hidden: int = DEFAULT_HIDDEN, epochs: int = DEFAULT_EPOCHS, seed: int = 0, *,
             checkpoints: int = DEFAULT_CHECKPOINTS, lr: float = DEFAULT_LR, momentum: float = DEFAULT_MOMENTUM,
             backend: str | None = None, threads: int | None = None, out: TextIO | None = None,
             notice: TextIO | None = None,
             lambda_max: Callable[[Layers, np.ndarray, np.ndarray], float] | None = None) -> list[DemoRow]:
    """Train a 64-``hidden``-10 tanh MLP on the digits; print tr(H), tr(H^2) and WS bounds at checkpoints.

    ``backend=None`` uses the compiled core and falls back to NumPy (with a one-line notice
    on ``notice``, default stderr) when it cannot be imported.  The table goes to ``out``
    (default stdout).  Returns the rows.  ``lambda_max(layers, X, y)``, when given, is called
    at each checkpoint and its value stored in the row (for plots; not printed).
    """
    for name, value, least in (("hidden", hidden, 1), ("epochs", epochs, 0), ("checkpoints", checkpoints, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}; got {value!r}")
    out = out if out is not None else sys.stdout
    which = resolve_backend(backend, notice)
    t_start = time.perf_counter()
    X, y = load_digits()
    n_classes = int(y.max()) + 1
    sizes = (X.shape[1], hidden, n_classes)
    layers = init_mlp(sizes, np.random.default_rng(seed))
    n_params = sum(W.size + b.size for W, b in layers)
    lab = _labels(out)
    arch = "-".join(map(str, sizes))
    print(f"digits (N = {X.shape[0]}, {X.shape[1]} pixels, {n_classes} classes), tanh MLP {arch} "
          f"(P = {n_params:,}); full-batch GD lr {lr:g} momentum {momentum:g}, seed {seed}; backend {which}",
          file=out)
    print(_fmt_row([lab.get(k, k) for k, _ in _COLUMNS]), file=out)
    print(_fmt_row(["-" * w for _, w in _COLUMNS]), file=out)
    out.flush()

    rows: list[DemoRow] = []

    def report(epoch: int, params: Layers, loss: float, acc: float) -> None:
        res = bound(params, X, y, activation="tanh", curvature="hessian", reduction="mean",
                    backend=which, threads=threads)
        lmax = None if lambda_max is None else float(lambda_max(params, X, y))
        rows.append(DemoRow(epoch, loss, acc, res, lmax))
        print(_fmt_row([str(epoch), f"{loss:.4f}", f"{100 * acc:.1f}%", f"{res.trace:.4g}", f"{res.trace_sq:.4g}",
                        f"{res.lambda_max_lower:.4g}", f"{res.lambda_max_upper:.4g}", f"{res.elapsed_s:.3f}"]),
              file=out)
        out.flush()

    train(layers, X, y, epochs=epochs, lr=lr, momentum=momentum,
          checkpoints=checkpoint_epochs(epochs, checkpoints), on_checkpoint=report)
    total = time.perf_counter() - t_start
    in_bounds = sum(r.bound.elapsed_s for r in rows)
    print(f"loss, acc: mean cross-entropy and accuracy on all N samples; {lab['trH']}, {lab['trH2']}: exact trace "
          f"of its Hessian H and of {lab['H2']};", file=out)
    print(f"{lab['lo']} / {lab['hi']}: certified Wolkowicz-Styan bounds on the largest eigenvalue of H; "
          f"s: seconds per bound() call.", file=out)
    print(f"total {total:.2f} s, of which {in_bounds:.2f} s in bound()", file=out)
    return rows
