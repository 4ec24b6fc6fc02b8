"""The demo: train a small tanh MLP on the digits and follow the curvature of its loss.

Training is NumPy full-batch gradient descent (forward and backward written out here, one
loop for every loss); at checkpoints a :class:`wsbound_fast.Tracker` records
:func:`wsbound_fast.bound` on the full data set and one table row is printed.  Two stories,
one per loss:

- ``cross_entropy`` (the default): heavy-ball momentum, and at geometrically spaced
  checkpoints tr(H), tr(H^2) and the Wolkowicz-Styan bounds on λ_max;
- ``mse`` (one-hot targets, ``torch.nn.functional.mse_loss``: the mean over N*C entries):
  plain gradient descent with step η, as in Cohen et al. 2021 ("Gradient descent on neural
  networks typically occurs at the edge of stability"), and at evenly spaced checkpoints the
  certified bracket of λ_max (``bound(..., certify=True)``) against the stability threshold
  2/η: progressive sharpening up to the edge of stability, in certified numbers.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

import numpy as np

from .._api.data import load_digits
from .._api.tracking import History, Record, Tracker
from .._backends.compiled import load_core
from .._problem.problem import BACKENDS
from .._problem.validate import _choice
from .fmt import directed, directed_digits

__all__ = ["LAMBDA_MAX", "LOSSES", "SETUPS", "DemoSetup", "checkpoint_epochs", "init_mlp", "loss_and_grads", "resolve_backend",
           "run_demo", "train"]

Layers = list[tuple[np.ndarray, np.ndarray]]

#: The demo's losses: ``cross_entropy`` (softmax) and ``mse`` (one-hot targets, mean over N*C).
LOSSES = ("cross_entropy", "mse")


@dataclass(frozen=True)
class DemoSetup:
    """The defaults of one loss's demo."""

    hidden: int
    epochs: int
    checkpoints: int
    lr: float
    momentum: float
    init_scale: float  # the weights are this times Glorot-uniform
    spacing: str  # of the checkpoints: "geometric" or "linear"
    certify: bool | None  # bound(certify=...) at each checkpoint


#: cross_entropy: today's demo.  mse: the edge of stability.  The weights start at 0.3 x
#: Glorot so that the network starts flat (λ_max ≈ 1.0 < 2/η = 2): at full Glorot scale the
#: output layer's curvature alone is ≈ 5.7 and only falls.  With η = 1 and 32 hidden units
#: λ_max rises to 2/η in about 200 steps, overshoots a little, and the loss goes non-monotone
#: while λ_max hovers at 2/η (found by experiment; see the README).
SETUPS = {
    "cross_entropy": DemoSetup(hidden=32, epochs=300, checkpoints=7, lr=0.5, momentum=0.9, init_scale=1.0,
                               spacing="geometric", certify=None),
    "mse": DemoSetup(hidden=32, epochs=600, checkpoints=61, lr=1.0, momentum=0.0, init_scale=0.3,
                     spacing="linear", certify=True),
}

#: The metric of run_demo's records that holds what its ``lambda_max`` callable returned.
LAMBDA_MAX = "lambda_max_lanczos"

DEFAULT_HIDDEN = SETUPS["cross_entropy"].hidden
DEFAULT_EPOCHS = SETUPS["cross_entropy"].epochs
DEFAULT_CHECKPOINTS = SETUPS["cross_entropy"].checkpoints
DEFAULT_LR = SETUPS["cross_entropy"].lr
DEFAULT_MOMENTUM = SETUPS["cross_entropy"].momentum


def init_mlp(sizes: Sequence[int], rng: np.random.Generator, scale: float = 1.0) -> Layers:
    """Glorot-uniform weights times ``scale`` (W of shape (d_out, d_in)) and zero biases."""
    layers: Layers = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:]):
        limit = np.sqrt(6.0 / (d_in + d_out))
        W = rng.uniform(-limit, limit, size=(d_out, d_in))
        layers.append((W if scale == 1.0 else scale * W, np.zeros(d_out)))
    return layers


def _output_loss(z: np.ndarray, y: np.ndarray, loss: str) -> tuple[float, float, np.ndarray]:
    """The mean loss of the output ``z`` (N, C) against class indices ``y``, the accuracy, and
    d loss / d z."""
    rows = np.arange(len(y))
    if loss == "mse":  # torch.nn.functional.mse_loss(z, one_hot(y)): mean over the N*C entries
        residual = z.copy()
        residual[rows, y] -= 1.0
        value = float(np.mean(residual * residual))
        return value, float(np.mean(z.argmax(axis=1) == y)), residual * (2.0 / residual.size)
    z = z - z.max(axis=1, keepdims=True)
    logsum = np.log(np.exp(z).sum(axis=1))
    value = float(np.mean(logsum - z[rows, y]))
    accuracy = float(np.mean(z.argmax(axis=1) == y))
    delta = np.exp(z - logsum[:, None])  # softmax p
    delta[rows, y] -= 1.0
    delta /= len(y)
    return value, accuracy, delta


def loss_and_grads(layers: Layers, X: np.ndarray, y: np.ndarray,
                   loss: str = "cross_entropy") -> tuple[float, float, Layers]:
    """Mean loss (``loss`` one of :data:`LOSSES`), accuracy and gradients of a tanh MLP."""
    acts = [X]
    for W, b in layers[:-1]:
        acts.append(np.tanh(acts[-1] @ W.T + b))
    W, b = layers[-1]
    value, accuracy, delta = _output_loss(acts[-1] @ W.T + b, y, loss)  # delta: d loss / d z_L
    grads: Layers = []
    for i in range(len(layers) - 1, -1, -1):
        W, _ = layers[i]
        grads.append((delta.T @ acts[i], delta.sum(axis=0)))
        if i > 0:
            delta = (delta @ W) * (1.0 - acts[i] ** 2)  # tanh' = 1 - tanh^2
    grads.reverse()
    return value, accuracy, grads


def train(layers: Layers, X: np.ndarray, y: np.ndarray, *, epochs: int, lr: float = DEFAULT_LR,
          momentum: float = DEFAULT_MOMENTUM, loss: str = "cross_entropy", checkpoints: Sequence[int] = (),
          on_checkpoint: Callable[[int, Layers, float, float], None] | None = None,
          on_epoch: Callable[[int, float, float], None] | None = None) -> Layers:
    """Full-batch gradient descent on the mean ``loss``, with heavy-ball momentum (``momentum=0``:
    plain gradient descent, each step exactly ``-lr`` times the gradient); returns the trained layers.

    ``on_checkpoint(epoch, layers, loss, accuracy)`` is called after ``epoch`` updates for
    every epoch in ``checkpoints`` (0 is the initialisation); ``on_epoch(epoch, loss,
    accuracy)`` after every update count 0 .. ``epochs``.  ``layers`` is not modified.
    """
    params = [(W.copy(), b.copy()) for W, b in layers]
    velocity = [(np.zeros_like(W), np.zeros_like(b)) for W, b in params]
    wanted = set(checkpoints)
    for epoch in range(epochs + 1):
        value, acc, grads = loss_and_grads(params, X, y, loss)
        if on_epoch is not None:
            on_epoch(epoch, value, acc)
        if epoch in wanted and on_checkpoint is not None:
            on_checkpoint(epoch, params, value, acc)
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


def checkpoint_epochs(epochs: int, count: int, spacing: str = "geometric") -> list[int]:
    """Up to ``count`` (>= 2) epochs: 0, ``epochs`` and geometrically (or, ``spacing="linear"``,
    evenly) spaced ones in between."""
    if epochs <= 0:
        return [0]
    if spacing == "linear":
        return sorted(set(np.rint(np.linspace(0, epochs, max(count, 2))).astype(int).tolist()))
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


_UNICODE = {"trH": "tr(H)", "trH2": "tr(H²)", "H2": "H²", "lo": "λ_max ≥", "hi": "λ_max ≤", "eta": "η",
            "thr": "2/η", "vs": "vs 2/η"}
_ASCII = {"trH": "tr(H)", "trH2": "tr(H^2)", "H2": "H^2", "lo": "lmax >=", "hi": "lmax <=", "eta": "eta",
          "thr": "2/eta", "vs": "vs 2/eta"}


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
#: The edge-of-stability table (loss="mse"): the certified bracket against 2/η.
_EOS_COLUMNS = (("epoch", 5), ("loss", 7), ("acc", 6), ("lo", 9), ("hi", 9), ("thr", 7), ("vs", 8), ("s", 6))
_BRACKET_DIGITS = 5  # significant digits of the printed bracket, rounded outward


def _fmt_row(cells: Sequence[str], columns: Sequence[tuple[str, int]] = _COLUMNS) -> str:
    return "  ".join(c.rjust(w) for c, (_, w) in zip(cells, columns))


def _side(lo: float, hi: float, threshold: float) -> str:
    """Where the certified bracket [lo, hi] lies relative to ``threshold``."""
    return "below" if hi < threshold else "above" if lo > threshold else "at"


def _check_count(name: str, value: object, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}; got {value!r}")


def run_demo(hidden: int | None = None, epochs: int | None = None, seed: int = 0, *, loss: str = "cross_entropy",
             checkpoints: int | None = None, lr: float | None = None, momentum: float | None = None,
             backend: str | None = None, threads: int | None = None, out: TextIO | None = None,
             notice: TextIO | None = None,
             lambda_max: Callable[[Layers, np.ndarray, np.ndarray], float] | None = None,
             on_epoch: Callable[[int, float, float], None] | None = None) -> History:
    """Train a 64-``hidden``-10 tanh MLP on the digits with the mean ``loss`` and print a table row
    per checkpoint.

    ``loss="cross_entropy"``: tr(H), tr(H^2) and the WS bounds at geometrically spaced
    checkpoints.  ``loss="mse"``: plain gradient descent and the certified bracket of λ_max
    (``bound(..., certify=True)``) against 2/``lr`` at evenly spaced checkpoints.  Arguments left
    None take the loss's defaults (:data:`SETUPS`).  ``backend=None`` uses the compiled core and
    falls back to NumPy (with a one-line notice on ``notice``, default stderr) when it cannot be
    imported.  The table goes to ``out`` (default stdout).  Returns the
    :class:`wsbound_fast.History` of the checkpoints (its records hold the loss, the accuracy as
    the metric ``accuracy`` and each full Bound; its lr is ``lr`` when ``momentum`` is 0).
    ``lambda_max(layers, X, y)``, when given, is called at each checkpoint and its value kept as
    the metric :data:`LAMBDA_MAX` (for plots; not printed); ``on_epoch`` is passed to :func:`train`.
    """
    loss = _choice(loss, "loss", LOSSES)
    setup = SETUPS[loss]
    hidden = setup.hidden if hidden is None else hidden
    epochs = setup.epochs if epochs is None else epochs
    checkpoints = setup.checkpoints if checkpoints is None else checkpoints
    lr = setup.lr if lr is None else lr
    momentum = setup.momentum if momentum is None else momentum
    for name, value, least in (("hidden", hidden, 1), ("epochs", epochs, 0), ("checkpoints", checkpoints, 2)):
        _check_count(name, value, least)
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number; got {lr!r}")
    out = out if out is not None else sys.stdout
    which = resolve_backend(backend, notice)
    t_start = time.perf_counter()
    X, y = load_digits()
    n_classes = int(y.max()) + 1
    sizes = (X.shape[1], hidden, n_classes)
    layers = init_mlp(sizes, np.random.default_rng(seed), setup.init_scale)
    n_params = sum(W.size + b.size for W, b in layers)
    lab = _labels(out)
    arch = "-".join(map(str, sizes))
    eos = loss == "mse"
    columns = _EOS_COLUMNS if eos else _COLUMNS
    threshold = 2.0 / lr
    if eos:
        print(f"digits (N = {X.shape[0]}, {X.shape[1]} pixels, {n_classes} classes), tanh MLP {arch} "
              f"(P = {n_params:,}, weights {setup.init_scale:g} x Glorot), mean squared error; full-batch "
              f"gradient descent {lab['eta']} = {lr:g} (no momentum), seed {seed}; backend {which}", file=out)
    else:
        print(f"digits (N = {X.shape[0]}, {X.shape[1]} pixels, {n_classes} classes), tanh MLP {arch} "
              f"(P = {n_params:,}); full-batch GD lr {lr:g} momentum {momentum:g}, seed {seed}; backend {which}",
              file=out)
    print(_fmt_row([lab.get(k, k) for k, _ in columns], columns), file=out)
    print(_fmt_row(["-" * w for _, w in columns], columns), file=out)
    out.flush()

    # the certified bracket for mse (certify=True); for cross-entropy the WS bounds, plus Lanczos with exact
    # (lr only without momentum: 2/lr is the threshold of plain gradient descent)
    ckpts = checkpoint_epochs(epochs, checkpoints, setup.spacing)
    tracker = Tracker(X, y, every=ckpts, lr=lr if momentum == 0 else None, activation="tanh", loss=loss,
                      curvature="hessian", certify=setup.certify, reduction="mean", backend=which, threads=threads)

    def report(epoch: int, params: Layers, value: float, acc: float) -> None:
        metrics = {"accuracy": acc}
        if lambda_max is not None:
            metrics[LAMBDA_MAX] = float(lambda_max(params, X, y))
        with warnings.catch_warnings():
            # certify=True warns when it stops short of its width; the row's '*' says so instead
            warnings.simplefilter("ignore", RuntimeWarning)
            rec = tracker.step(params, step=epoch, train_loss=value, **metrics)
        if rec is None:
            return
        res = rec.bound
        assert res is not None
        if eos:
            lo, hi = rec.lambda_max_bracket
            short = "*" if rec.certify_met is False else ""
            cells = [str(epoch), f"{value:.5f}", f"{100 * acc:.1f}%", directed_digits(lo, _BRACKET_DIGITS, False),
                     directed_digits(hi, _BRACKET_DIGITS, True), f"{threshold:#.5g}", _side(lo, hi, threshold) + short,
                     f"{rec.seconds:.2f}"]
        else:
            cells = [str(epoch), f"{value:.4f}", f"{100 * acc:.1f}%", f"{res.trace:.4g}", f"{res.trace_sq:.4g}",
                     f"{res.lambda_max_lower:.4g}", f"{res.lambda_max_upper:.4g}", f"{res.elapsed_s:.3f}"]
        print(_fmt_row(cells, columns), file=out)
        out.flush()

    train(layers, X, y, epochs=epochs, lr=lr, momentum=momentum, loss=loss, checkpoints=ckpts,
          on_checkpoint=report, on_epoch=on_epoch)
    history = tracker.history
    total = time.perf_counter() - t_start
    if eos:
        in_bounds = sum(r.seconds or 0.0 for r in history)
        _eos_summary(history.records, threshold, X.shape[0] * n_classes, lab, out)
    else:
        in_bounds = sum(r.bound.elapsed_s for r in history if r.bound is not None)
        print(f"loss, acc: mean cross-entropy and accuracy on all N samples; {lab['trH']}, {lab['trH2']}: exact "
              f"trace of its Hessian H and of {lab['H2']};", file=out)
        print(f"{lab['lo']} / {lab['hi']}: certified Wolkowicz-Styan bounds on the largest eigenvalue of H; "
              f"s: seconds per bound() call.", file=out)
    print(f"total {total:.2f} s, of which {in_bounds:.2f} s in bound()", file=out)
    return history


def _eos_summary(rows: Sequence[Record], threshold: float, entries: int, lab: dict[str, str],
                 out: TextIO) -> None:
    """The footer of the edge-of-stability table: what the columns are, and the story in numbers."""
    thr, lo_lab, hi_lab = lab["thr"], lab["lo"], lab["hi"]
    print(f"loss, acc: mean squared error against one-hot targets (the mean over N*C = {entries:,} entries, as "
          f"torch.nn.functional.mse_loss) and accuracy on all N samples;", file=out)
    print(f"{lo_lab} / {hi_lab}: certified bracket of the largest eigenvalue of its Hessian H "
          f"(bound(..., loss='mse', certify=True)), rounded outward; {thr}: the stability threshold of gradient "
          f"descent with step {lab['eta']};", file=out)
    print(f"{lab['vs']}: the whole bracket below or above {thr}, or 'at' (it contains {thr}); s: seconds per "
          f"bound() call.", file=out)
    if any(r.certify_met is False for r in rows):
        print("*: the certificate stopped before the requested width (its bracket is still certified, only wider).",
              file=out)
    name = lab["lo"].split()[0]  # λ_max (or lmax)
    above = [i for i, r in enumerate(rows) if r.lambda_max_bracket[1] >= threshold]
    if not above:
        print(f"{name} stayed below {thr} = {threshold:.4g} (certified) throughout: train longer, or take a "
              f"larger {lab['eta']}, to reach the edge of stability.", file=out)
        return
    first = rows[above[0]]
    lo0, hi0 = rows[0].lambda_max_bracket
    rest = rows[above[0]:]
    lo_min = min(r.lambda_max_bracket[0] for r in rest)
    hi_max = max(r.lambda_max_bracket[1] for r in rest)
    start = f"{name} in [{directed(lo0, 4, False)}, {directed(hi0, 4, True)}] at epoch {rows[0].step}"
    if above[0] == 0:
        story = (f"{start}, already at or above {thr} = {threshold:.4g} (no sharpening phase: a smaller "
                 f"{lab['eta']} shows one)")
    else:
        story = f"{start} rose to {thr} = {threshold:.4g} by epoch {first.step} (progressive sharpening)"
    print(f"{story}; from then on it stayed in [{directed(lo_min, 4, False)}, {directed(hi_max, 4, True)}] = "
          f"{thr} x [{directed(lo_min / threshold, 3, False)}, {directed(hi_max / threshold, 3, True)}] "
          f"(the edge of stability, Cohen et al. 2021).", file=out)
