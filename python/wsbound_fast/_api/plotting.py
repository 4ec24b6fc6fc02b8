"""wsb.plot_history: the certified bracket of a tracked run (matplotlib, an optional extra:
``pip install 'wsbound_fast[plot]'``).

Uses ``matplotlib.figure.Figure`` directly (no pyplot) unless given an ``ax``: no GUI backend is
touched and the caller's pyplot state is left alone.  matplotlib is imported when a plot is
drawn, never when the package is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .tracking import History

__all__ = ["plot_history", "require_matplotlib"]

#: Resolution of a saved plot unless ``dpi`` says otherwise (print quality: >= 150).
DEFAULT_DPI = 200


def require_matplotlib() -> Any:
    """Import matplotlib, or raise ImportError saying how to install it."""
    try:
        import matplotlib
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "plotting needs matplotlib, which is not installed: pip install 'wsbound_fast[plot]' "
            f"(or pip install matplotlib) [{exc}]"
        ) from None
    return matplotlib


def check_image_path(path: Any, name: str = "path") -> str:
    """``path`` as a string whose suffix names an image format matplotlib writes (else ValueError)."""
    if not isinstance(path, (str, Path)):
        raise TypeError(f"{name} must be a str or pathlib.Path; got {type(path).__name__}")
    require_matplotlib()
    from matplotlib.figure import Figure

    suffix = Path(path).suffix.lstrip(".").lower()
    formats = Figure().canvas.get_supported_filetypes()
    if suffix not in formats:
        raise ValueError(f"{name}: cannot tell the image format from {str(path)!r}; use a file name ending in one "
                         f"of {', '.join('.' + f for f in sorted(formats))}")
    return str(path)


def _threshold(lr: Any) -> float | None:
    if lr is None:
        return None
    if isinstance(lr, bool):
        raise TypeError(f"lr must be a positive number or None; got {lr!r}")
    try:
        value = float(lr)
    except (TypeError, ValueError):
        raise TypeError(f"lr must be a positive number or None; got {lr!r}") from None
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"lr must be a finite number > 0; got {lr!r}")
    return 2.0 / value


def draw_bracket(ax: Any, steps: np.ndarray, lo: np.ndarray, hi: np.ndarray, threshold: float | None,
                 curvature: str | None = "hessian") -> None:
    """The certified bracket [lo, hi] of λ_max at ``steps`` on ``ax``: a band with error bars at
    the midpoints, and the line ``threshold`` (2/η) when given."""
    if threshold is not None:
        ax.axhline(threshold, color="tab:red", ls="--", lw=1.4, zorder=1,
                   label=f"2/η = {threshold:.4g}: gradient descent is unstable above")
    what = "GGN" if curvature == "ggn" else "loss Hessian"
    label = rf"$\lambda_{{max}}$ of the {what}: certified bracket"
    top = float(np.nanmax(hi))
    if np.all(hi > 0):
        rel = float(np.nanmax((hi - lo) / hi))
        scale = threshold if threshold is not None else top
        thin = ", thinner than the line" if rel * top < 0.006 * scale else ""
        label += f"\n(each at most {100 * rel:.2g}% wide{thin})"
    ax.fill_between(steps, lo, hi, color="tab:blue", alpha=0.30, lw=0, zorder=2)
    mid = 0.5 * (lo + hi)
    ax.errorbar(steps, mid, yerr=(mid - lo, hi - mid), fmt="o-", color="tab:blue", ms=3.2, lw=1.3, capsize=0,
                elinewidth=1.0, zorder=3, label=label)
    ymax = 1.15 * (max(top, threshold) if threshold is not None else top)
    ymin = min(0.0, 1.15 * float(np.nanmin(lo)))
    if np.isfinite(ymax) and ymax > ymin:
        ax.set_ylim(ymin, ymax)
    ax.set_ylabel(r"sharpness $\lambda_{max}$")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small", framealpha=0.9)


def plot_history(history: History, path: str | Path | None = None, *, lr: float | None = None, ax: Any = None,
                 title: str | None = None, dpi: int = DEFAULT_DPI) -> Any:
    """Draw a tracked run: the certified bracket of λ_max against the training step.

    The bracket (``lambda_max_bracket`` of each record) is a band with error bars; with a
    learning rate (``lr``, or else the history's own ``lr``) the stability threshold 2/η is a
    dashed line.  Without ``ax``: a new figure, with a second panel below for the training loss
    when the records have one.  With ``ax`` (a matplotlib Axes): the bracket is drawn on it
    (the loss is not).  ``path``: also save the figure there (the format from the suffix: .png,
    .pdf, .svg, ...; at ``dpi``, default 200).  Returns the matplotlib Figure.

    Needs matplotlib (ImportError saying how to install it otherwise).
    """
    if not isinstance(history, History):
        raise TypeError(f"history must be a wsbound_fast.History (tracker.history, History.load(path)); "
                        f"got {type(history).__name__}")
    if not len(history):
        raise ValueError("history has no records to plot")
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not dpi > 0:
        raise ValueError(f"dpi must be a positive number; got {dpi!r}")
    threshold = _threshold(history.lr if lr is None else lr)
    out = None if path is None else check_image_path(path)
    require_matplotlib()

    steps = np.asarray(history.column("step"), dtype=np.float64)
    lo = np.asarray(history.column("lambda_max_lo"), dtype=np.float64)
    hi = np.asarray(history.column("lambda_max_hi"), dtype=np.float64)
    losses = history.column("train_loss")
    if ax is None:
        from matplotlib.figure import Figure

        with_loss = any(v is not None for v in losses)
        if with_loss:
            fig = Figure(figsize=(7.0, 5.4), layout="constrained")
            ax, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
        else:
            fig = Figure(figsize=(7.0, 4.2), layout="constrained")
            ax, bottom = fig.add_subplot(), None
        draw_bracket(ax, steps, lo, hi, threshold, history.curvature)
        last = ax
        if bottom is not None:
            known = np.array([v is not None for v in losses])
            ls = np.array([np.nan if v is None else v for v in losses], dtype=np.float64)
            bottom.plot(steps[known], ls[known], "o-", color="tab:gray", ms=3.0, lw=1.1)
            finite = ls[known & np.isfinite(ls)]
            if finite.size and (finite > 0).all() and finite.max() / finite.min() > 5:
                bottom.set_yscale("log")
            name = {"cross_entropy": "cross-entropy", "mse": "MSE", "bce": "BCE"}.get(history.loss or "")
            bottom.set_ylabel(f"training loss ({name})" if name else "training loss")
            bottom.grid(True, which="both", alpha=0.3)
            last = bottom
        last.set_xlabel("training step")
    else:
        fig = ax.figure
        draw_bracket(ax, steps, lo, hi, threshold, history.curvature)
    if title:
        ax.set_title(title, fontsize="medium")
    if out is not None:
        fig.savefig(out, dpi=dpi)
    return fig
