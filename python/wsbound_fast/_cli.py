"""The ``wsbound-fast`` command line (also ``python -m wsbound_fast``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

PROG = "wsbound-fast"


class _UsageError(Exception):
    """A command-line error, reported as one line on stderr with exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse would print the usage too
        raise _UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _int_at_least(least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
        return value

    return parse


def _demo_lambda_max(backend: str | None, threads: int | None) -> Callable:
    """The exact lambda_max for the demo's plot: Lanczos (wsb.eigsh) over the exact Hessian-vector
    product of the tanh MLP's mean cross-entropy; drawn between the WS bounds."""
    from ._lanczos import eigsh
    from ._loader import load_core

    if backend is None:  # as run_demo: the compiled core when it imports, else NumPy
        try:
            load_core()
            backend = "cpp"
        except ImportError:
            backend = "numpy"

    def lambda_max(layers: object, X: object, y: object) -> float:
        return float(eigsh(layers, X, y, k=1, which="LA", activation="tanh", tol=1e-8, backend=backend,
                           threads=threads)[-1])

    return lambda_max


def _check_writable(path: str) -> None:
    """Fail before any work when ``path`` cannot be written (missing folder, no permission)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise _UsageError(f"{PROG}: error: --plot: folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise _UsageError(f"{PROG}: error: --plot: folder is not writable: {folder}")


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import DEFAULT_CHECKPOINTS, run_demo

    checkpoints = args.checkpoints
    if args.plot is not None:
        from ._plot import require_matplotlib

        require_matplotlib()  # before training: a missing extra is an input error (exit 2)
        _check_writable(args.plot)
        from matplotlib.figure import Figure

        suffix = os.path.splitext(args.plot)[1].lstrip(".").lower()
        formats = Figure().canvas.get_supported_filetypes()
        if suffix not in formats:
            raise _UsageError(f"{PROG}: error: --plot: cannot tell the image format from {args.plot!r}; use a file "
                              f"name ending in one of {', '.join('.' + f for f in sorted(formats))}")
        if checkpoints is None:
            checkpoints = _PLOT_CHECKPOINTS
    rows = run_demo(hidden=args.hidden, epochs=args.epochs, seed=args.seed,
                    checkpoints=DEFAULT_CHECKPOINTS if checkpoints is None else checkpoints,
                    backend=args.backend, threads=args.threads,
                    lambda_max=None if args.plot is None else _demo_lambda_max(args.backend, args.threads))
    if args.plot is not None:
        from ._plot import plot_demo

        N = rows[0].bound.n_samples
        plot_demo(rows, args.plot, title=f"digits (N = {N}), tanh MLP 64-{args.hidden}-10: "
                                         f"sharpness during training")
        print(f"plot written to {args.plot}")
    return 0


#: Checkpoints of ``demo --plot`` unless --checkpoints is given (more points for a curve).
_PLOT_CHECKPOINTS = 16


def _format_table(res: object, model: object, n_classes: int, soft: bool, activation: object) -> str:
    from ._bounds import Bound
    from ._files import Model

    assert isinstance(res, Bound) and isinstance(model, Model)
    H = "H" if res.curvature == "hessian" else "G"
    arch = "-".join(map(str, model.dims))
    acts = activation if isinstance(activation, list) else [activation] * (len(model.dims) - 2)
    act_text = ", ".join(a if isinstance(a, str) else f"{a[0]}({a[1]:g})" for a in acts) or "none (one layer)"
    rows = [
        ("model", f"{model.description}: {arch}, {len(model.dims) - 1} layer(s), P = {res.n_params:,}"),
        ("activations", act_text),
        ("data", f"N = {res.n_samples:,} samples, {'soft' if soft else 'hard'} labels, {n_classes} classes"),
        ("curvature", f"{'Hessian' if H == 'H' else 'generalized Gauss-Newton'} of the {res.reduction} "
                      f"cross-entropy; backend {res.backend}, {res.elapsed_s:.3g} s"),
        (f"tr({H})", f"{res.trace:.12g}"),
        (f"tr({H}^2)", f"{res.trace_sq:.12g}"),
        ("eigenvalues", f"mean {res.mean:.6g}, std {res.std:.6g}"),
        ("lambda_max", f"in [{res.lambda_max_lower:.6g}, {res.lambda_max_upper:.6g}]"),
        ("lambda_min", f"in [{res.lambda_min_lower:.6g}, {res.lambda_min_upper:.6g}]"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines.append(f"{'':{width}}  (lambda_*: certified Wolkowicz-Styan bounds on the extreme eigenvalues of {H})")
    return "\n".join(lines)


def _cmd_bound(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from ._api import bound
    from ._demo import resolve_backend
    from ._files import load_data, load_model, parse_activation

    activation = parse_activation(args.activation)
    model = load_model(args.model)
    X, y = load_data(args.data)
    if model.source == "npz":
        if activation is None:
            activation = model.activation
        if activation is None and len(model.dims) > 2:
            raise _UsageError(
                f"{PROG}: error: the model has hidden layers: give --activation (e.g. tanh, or tanh,relu for one "
                "per hidden layer), or store an 'activation' array in the .npz"
            )
    which = resolve_backend(args.backend)
    # a progress bar over block pairs on a terminal (stderr), unless --quiet
    res = bound(model.layers, X, y, activation=activation, curvature=args.curvature, reduction=args.reduction,
                batch_size=args.batch_size, threads=args.threads, backend=which, device=args.device,
                dtype=args.dtype, progress=not args.quiet and sys.stderr.isatty())
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
    else:
        if model.source == "torch":
            from ._torch import convert

            activation = convert(model.layers)[1]
        elif activation is None:
            activation = []
        print(_format_table(res, model, model.dims[-1], np.ndim(y) == 2, activation))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subcommand per sub-parser."""
    from . import __version__
    from ._demo import DEFAULT_CHECKPOINTS, DEFAULT_EPOCHS, DEFAULT_HIDDEN

    parser = _Parser(
        prog=PROG,
        description="Exact tr(H), tr(H^2) of the loss Hessian of an MLP and Wolkowicz-Styan bounds on its "
                    "extreme eigenvalues.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)

    demo = sub.add_parser(
        "demo",
        help="train a small MLP on the bundled digits data and print tr(H), tr(H^2) and bounds as it trains",
        description="Train a one-hidden-layer tanh MLP (64-H-10) on the bundled 8x8 digits (N = 1797) with "
                    "full-batch gradient descent, and at a few checkpoints print the loss, the accuracy, "
                    "tr(H), tr(H^2) of the loss Hessian and the Wolkowicz-Styan bounds on its largest "
                    "eigenvalue.",
    )
    demo.add_argument("--plot", metavar="FILE", default=None,
                      help="also draw tr(H), the WS bounds and the loss against training steps into FILE "
                           "(.png, .pdf, .svg; needs matplotlib)")
    demo.add_argument("--hidden", type=_int_at_least(1), default=DEFAULT_HIDDEN, metavar="H",
                      help="hidden units (default: %(default)s)")
    demo.add_argument("--epochs", type=_int_at_least(0), default=DEFAULT_EPOCHS, metavar="E",
                      help="gradient-descent steps on the full data set (default: %(default)s)")
    demo.add_argument("--checkpoints", type=_int_at_least(2), default=None, metavar="K",
                      help="table rows: epoch 0, the last epoch and geometrically spaced ones between "
                           f"(default: {DEFAULT_CHECKPOINTS}, or {_PLOT_CHECKPOINTS} with --plot)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the weight initialisation (default: %(default)s)")
    demo.add_argument("--backend", choices=("cpp", "numpy"), default=None,
                      help="engine for the bounds (default: cpp, or numpy with a notice if the compiled "
                           "core is unavailable)")
    demo.add_argument("--threads", type=_int_at_least(1), default=None, metavar="T",
                      help="worker threads of the cpp backend (default: all available cores)")
    demo.set_defaults(func=_cmd_demo)

    bnd = sub.add_parser(
        "bound",
        help="tr(H), tr(H^2) and the WS bounds of a model file on a data file",
        description="Exact tr(H), tr(H^2) of the cross-entropy loss curvature of the MLP in MODEL over the data "
                    "in DATA, and the Wolkowicz-Styan bounds on its extreme eigenvalues. MODEL: an .npz of "
                    "W0, b0, W1, b1, ... (W of shape (out, in) as torch.nn.Linear; b optional; optional "
                    "'activation' strings), or a torch.save-d nn.Sequential (needs torch; read with "
                    "weights_only=True, only the supported module classes are allowed). DATA: an .npz with X "
                    "(N, d) and y (N,) class indices or (N, C) probability rows. Exit status 0 ok, 2 bad input.",
    )
    bnd.add_argument("model", metavar="MODEL", help="model file (.npz of W0, b0, ...; or a saved torch nn.Sequential)")
    bnd.add_argument("data", metavar="DATA", help=".npz with arrays X and y")
    bnd.add_argument("--activation", metavar="A", default=None,
                     help="hidden activation: a name (tanh, sigmoid, softplus, gelu, gelu_tanh, silu, identity, relu, "
                          "leaky_relu[:slope]) or one per hidden layer, comma-separated; required for an .npz model "
                          "with hidden layers unless stored in it; for a torch model it must agree with the model")
    bnd.add_argument("--curvature", choices=("hessian", "ggn"), default="hessian",
                     help="the Hessian or the generalized Gauss-Newton matrix (default: %(default)s)")
    bnd.add_argument("--reduction", choices=("mean", "sum"), default="mean",
                     help="loss averaged or summed over samples (default: %(default)s)")
    bnd.add_argument("--json", action="store_true", help="print the result as a JSON object")
    bnd.add_argument("--backend", choices=("cpp", "numpy", "torch"), default=None,
                     help="engine (default: cpp, or numpy with a notice if the compiled core is unavailable; "
                          "torch needs PyTorch)")
    bnd.add_argument("--device", default=None, metavar="D",
                     help="--backend torch only: where to compute, e.g. cpu, cuda, cuda:1 (default: cpu)")
    bnd.add_argument("--dtype", choices=("float64", "float32"), default=None,
                     help="--backend cpp or torch: float32 Gram products with float64 accumulation "
                          "(default: float64)")
    bnd.add_argument("--batch-size", type=_int_at_least(1), default=None, metavar="B",
                     help="samples per streamed block (default: chosen from the memory budget)")
    bnd.add_argument("--threads", type=_int_at_least(1), default=None, metavar="T",
                     help="worker threads of the cpp backend (default: all available cores)")
    bnd.add_argument("--quiet", action="store_true", help="no status line on a terminal")
    bnd.set_defaults(func=_cmd_bound)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 usage or input error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.func(args))
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (ValueError, TypeError, ImportError, FloatingPointError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
