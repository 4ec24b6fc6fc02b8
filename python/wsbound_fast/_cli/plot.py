"""Pictures of sharpness during training (matplotlib, an optional extra: ``pip install .[plot]``).

Uses ``matplotlib.figure.Figure`` directly (no pyplot): no GUI backend is touched and the
caller's pyplot state is left alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .._api.plotting import plot_history, require_matplotlib
from .._api.tracking import History
from .demo import LAMBDA_MAX

__all__ = ["plot_demo", "plot_edge_of_stability", "plot_sharpness", "require_matplotlib"]


def _series(values: Sequence[float] | None, n: int, name: str) -> np.ndarray | None:
    if values is None:
        return None
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have one value per step ({n}); got shape {arr.shape}")
    return arr


def plot_sharpness(path: str, steps: Sequence[float], trace: Sequence[float], ws_upper: Sequence[float],
                   loss: Sequence[float] | None = None, *, ws_lower: Sequence[float] | None = None,
                   lambda_max: Sequence[float | None] | None = None, title: str | None = None,
                   xlabel: str = "training step", curvature: str = "hessian", dpi: int = 100) -> None:
    """Draw tr(H), the Wolkowicz-Styan bounds and (optionally) λ_max against training steps.

    ``ws_lower`` / ``ws_upper``: the certified interval for λ_max (shaded); ``lambda_max``:
    exact values (e.g. from Lanczos) where known (None entries are skipped); ``loss`` goes on
    a second y-axis.  Curvature values use a log scale (values <= 0 are not drawn); the
    x-axis is symmetric-log when the steps span more than two decades (geometric
    checkpoints), linear otherwise.  Written to ``path`` (format from its suffix, e.g. .png).
    """
    require_matplotlib()
    from matplotlib.figure import Figure

    x = np.asarray(steps, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"steps must be a non-empty 1-D sequence; got shape {x.shape}")
    n = x.size
    tr = _series(trace, n, "trace")
    hi = _series(ws_upper, n, "ws_upper")
    lo = _series(ws_lower, n, "ws_lower")
    ls = _series(loss, n, "loss")
    lm = None
    if lambda_max is not None:
        lm = _series([np.nan if v is None else v for v in lambda_max], n, "lambda_max")
    H = "H" if curvature == "hessian" else "G"

    fig = Figure(figsize=(7.0, 4.2), dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    ax.plot(x, tr, "o-", color="tab:blue", ms=3.5, lw=1.6, label=f"tr({H}) (exact)")
    ax.plot(x, hi, "s-", color="tab:red", ms=3.5, lw=1.6, label=r"WS upper bound on $\lambda_{max}$")
    if lo is not None:
        ax.plot(x, lo, "-", color="tab:red", lw=0.9, alpha=0.7, label=r"WS lower bound on $\lambda_{max}$")
        ax.fill_between(x, lo, hi, color="tab:red", alpha=0.10, lw=0,
                        label=r"certified interval for $\lambda_{max}$")
    if lm is not None and np.isfinite(lm).any():
        ok = np.isfinite(lm)
        ax.plot(x[ok], lm[ok], "D-", color="black", ms=3.5, lw=1.2, label=r"$\lambda_{max}$ (exact)")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"curvature of the loss ({'Hessian' if H == 'H' else 'GGN'})")
    positive = x[x > 0]
    if positive.size and positive.max() / positive.min() > 100:
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(left=0)
    ax.grid(True, which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if ls is not None:
        ax2 = ax.twinx()
        h2 = ax2.plot(x, ls, "^--", color="tab:gray", ms=3.5, lw=1.2, label="training loss")
        if (ls > 0).all() and ls.max() / ls.min() > 20:
            ax2.set_yscale("log")
        ax2.set_ylabel("training loss (mean cross-entropy)", color="tab:gray")
        ax2.tick_params(axis="y", colors="tab:gray")
        handles += h2
        labels += [h.get_label() for h in h2]
    ax.legend(handles, labels, loc="best", fontsize="small", framealpha=0.85)
    if title:
        ax.set_title(title, fontsize="medium")
    fig.savefig(path, dpi=dpi)


def plot_demo(history: History, path: str, *, title: str | None = None) -> None:
    """The cross-entropy demo's picture: its history (records with their full ``bound``, and
    the exact λ_max as the metric ``demo.LAMBDA_MAX`` where run_demo computed it) against the epoch."""
    bounds = [r.bound for r in history]
    if any(b is None for b in bounds):
        raise ValueError("plot_demo needs each record's full Bound (a tracked history, or one loaded from JSON)")
    lmax = history.column(LAMBDA_MAX) if LAMBDA_MAX in history.metric_names else [None] * len(history)
    plot_sharpness(
        path,
        steps=history.column("step"),
        trace=history.column("trace"),
        ws_upper=[b.lambda_max_upper for b in bounds],
        ws_lower=[b.lambda_max_lower for b in bounds],
        loss=history.column("train_loss"),
        lambda_max=None if all(v is None for v in lmax) else lmax,
        title=title,
        xlabel="full-batch gradient-descent step (epoch)",
        curvature=history.curvature or "hessian",
    )


def plot_edge_of_stability(path: str, history: History, loss_steps: Sequence[float], loss: Sequence[float], *,
                           lr: float | None = None, title: str | None = None, loss_label: str = "training loss",
                           dpi: int = 200) -> None:
    """The edge of stability: the certified bracket of λ_max of each record of ``history``
    against the line 2/η (η: ``lr``, else the history's own lr), drawn by
    :func:`wsbound_fast.plot_history`, with the two phases marked; below it the training loss
    at ``loss_steps`` (every step, say; the history's steps are marked on it).

    Two panels sharing a linear step axis; written to ``path`` at ``dpi`` (>= 150 for print).
    """
    require_matplotlib()
    from matplotlib.figure import Figure

    if not isinstance(history, History) or not len(history):
        raise ValueError("history must be a wsbound_fast.History with at least one record")
    eta = history.lr if lr is None else lr
    if eta is None:
        raise ValueError("lr: the edge of stability needs the learning rate (Tracker(..., lr=...) or lr=)")
    x = np.asarray(history.column("step"), dtype=np.float64)
    hi = np.asarray(history.column("lambda_max_hi"), dtype=np.float64)
    xl = np.asarray(loss_steps, dtype=np.float64)
    ls = _series(loss, xl.size, "loss")
    assert ls is not None

    fig = Figure(figsize=(7.0, 5.4), dpi=dpi, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    plot_history(history, ax=top, lr=eta)
    threshold = 2.0 / float(eta)
    reach = np.flatnonzero(hi >= threshold)
    if reach.size and 0 < reach[0] < x.size - 1:  # mark the two phases
        xc, y_arrow = float(x[reach[0]]), 0.45 * threshold
        for ax in (top, bottom):
            ax.axvline(xc, color="tab:red", ls=":", lw=1.0, zorder=1)
        for a, b, text in ((float(x[0]), xc, "progressive sharpening"),
                           (xc, float(x[-1]), "edge of stability: $\\lambda_{max}$ stays near 2/η")):
            top.annotate("", xy=(a, y_arrow), xytext=(b, y_arrow),
                         arrowprops={"arrowstyle": "<->", "color": "0.35", "lw": 0.9})
            top.text(0.5 * (a + b), y_arrow * 1.04, text, ha="center", va="bottom", fontsize="small", color="0.2")
        top.text(xc, y_arrow * 0.96, f" epoch {x[reach[0]]:g}: the bracket reaches 2/η", ha="left", va="top",
                 fontsize="small", color="tab:red")
        late = np.flatnonzero(xl > xc)
        if late.size:  # Cohen et al.: non-monotone over short times, decreasing over long ones
            j = late[np.argmax(ls[late])]
            left = xl[j] < xl.min() + 0.65 * (xl.max() - xl.min())  # room for the text on its right
            bottom.annotate("non-monotone over a few steps,\nyet falling over many",
                            xy=(xl[j], ls[j]), xytext=(12 if left else -12, -4), textcoords="offset points",
                            ha="left" if left else "right", va="top", fontsize="small", color="0.2")
    top.legend(loc="lower right", fontsize="small", framealpha=0.9)
    if title:
        top.set_title(title, fontsize="medium")

    bottom.plot(xl, ls, "-", color="tab:gray", lw=1.0, label="every step")
    on = np.isin(xl, x)
    bottom.plot(xl[on], ls[on], "o", color="black", ms=2.5, label="at the checkpoints above")
    if (ls > 0).all() and ls.max() / ls.min() > 5:
        bottom.set_yscale("log")
    bottom.set_ylabel(loss_label)
    bottom.set_xlabel("full-batch gradient-descent step (epoch)")
    bottom.grid(True, which="both", alpha=0.3)
    bottom.legend(loc="upper right", fontsize="small", framealpha=0.9)
    bottom.set_xlim(float(min(x.min(), xl.min())), float(max(x.max(), xl.max())))
    fig.savefig(path, dpi=dpi)
