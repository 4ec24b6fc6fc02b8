"""The ``wsbound-fast`` command line (also ``python -m wsbound_fast``)."""

from __future__ import annotations

import argparse
import math
import os
import re
import stat
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from .._api.bound import bound
from .._api.products import eigsh
from .._api.tracking import History
from .._backends.compiled import load_core
from .._problem.losses import LOSSES
from .._problem.torch_input import convert
from .._spectral.bounds import Bound
from .._version import __version__
from .demo import (
    DEFAULT_CHECKPOINTS,
    SETUPS,
    resolve_backend,
    run_demo,
)
from .files import Model, load_data, load_model, parse_activation
from .fmt import directed as _directed
from .plot import plot_demo, plot_edge_of_stability, require_matplotlib

PROG = "wsbound-fast"


class _UsageError(Exception):
    """A command-line error, reported as one line on stderr with exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse would print the usage too
        raise _UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _certify_arg(text: str) -> int | bool:
    """--certify: K >= 1, or 'auto' (certify=True: to the width --rtol)."""
    if text.strip().lower() == "auto":
        return True
    return _int_at_least(1)(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (0.0 < value <= 10.0):
        raise argparse.ArgumentTypeError(f"must be in (0, 10], got {text}")
    return value


def _step_size(text: str) -> float:
    """--lr: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0.0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


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


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(i?)b?|(b?))\s*$", re.IGNORECASE)
_POWER = {"k": 1, "m": 2, "g": 3, "t": 4}


def _bytes_arg(text: str) -> int:
    """A size in bytes: 4294967296, 4GiB, 4G (binary), 4GB (decimal), 512MiB, 1.5GiB, 64k, ..."""
    m = _SIZE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"expected a size in bytes such as 4294967296, 4GiB, 512MiB or 4GB; "
                                         f"got {text!r}")
    number, unit, binary = m.group(1), (m.group(2) or "").lower(), m.group(3)
    if not unit and "." in number:
        raise argparse.ArgumentTypeError(f"a size in bytes without a unit must be a whole number; got {text!r}")
    decimal = unit and not binary and text.strip()[-1] in "bB"  # 4GB: 10^9; 4G, 4GiB: 2^30
    scale = (1000 if decimal else 1024) ** _POWER[unit] if unit else 1
    value = int(float(number) * scale) if "." in number else int(number) * scale
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte; got {text!r}")
    return value


def _demo_lambda_max(backend: str | None, threads: int | None) -> Callable:
    """The exact lambda_max for the demo's plot: Lanczos (wsb.eigsh) over the exact Hessian-vector
    product of the tanh MLP's mean cross-entropy; drawn between the WS bounds.  (Cheaper than the
    tracker's exact=True, which also waits for lambda_min.)"""
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


def _n_samples(history: History) -> int:
    """N of the demo's data (its records carry their Bound)."""
    res = history[0].bound
    assert res is not None
    return res.n_samples


def _check_writable(path: str, option: str = "--plot", inputs: Sequence[str] = ()) -> None:
    """Fail before any work when ``path`` cannot be written (missing folder, no permission, a
    directory, a FIFO that would block, one of the input files)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise _UsageError(f"{PROG}: error: {option}: cannot use {path}: {exc.strerror or exc}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise _UsageError(f"{PROG}: error: {option}: {path} is a directory; give a file name")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):  # (a character device: /dev/null)
            raise _UsageError(f"{PROG}: error: {option}: {path} is not a regular file (a FIFO or a socket)")
        for other in inputs:
            try:
                same = os.path.samefile(path, other)
            except OSError:
                same = False
            if same:
                raise _UsageError(f"{PROG}: error: {option}: {path} is an input file; it would be overwritten")
        if not os.access(path, os.W_OK):
            raise _UsageError(f"{PROG}: error: {option}: file is not writable: {path}")
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise _UsageError(f"{PROG}: error: {option}: folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise _UsageError(f"{PROG}: error: {option}: folder is not writable: {folder}")


def _cmd_demo(args: argparse.Namespace) -> int:
    checkpoints = args.checkpoints
    if args.plot is not None:
        require_matplotlib()  # before training: a missing extra is an input error (exit 2)
        _check_writable(args.plot)
        from matplotlib.figure import Figure

        suffix = os.path.splitext(args.plot)[1].lstrip(".").lower()
        formats = Figure().canvas.get_supported_filetypes()
        if suffix not in formats:
            raise _UsageError(f"{PROG}: error: --plot: cannot tell the image format from {args.plot!r}; use a file "
                              f"name ending in one of {', '.join('.' + f for f in sorted(formats))}")
    setup = SETUPS[args.loss]
    hidden = setup.hidden if args.hidden is None else args.hidden
    lr = setup.lr if args.lr is None else args.lr
    if args.loss == "mse":  # the edge of stability: the certified bracket already holds λ_max
        losses: list[float] = []
        history = run_demo(hidden=hidden, epochs=args.epochs, seed=args.seed, loss="mse", checkpoints=checkpoints,
                           lr=lr, backend=args.backend, threads=args.threads,
                           on_epoch=lambda epoch, value, acc: losses.append(value))
        if args.plot is not None:
            N = _n_samples(history)
            plot_edge_of_stability(
                args.plot, history, list(range(len(losses))), losses,
                title=f"digits (N = {N}), tanh MLP 64-{hidden}-10, mean squared error, gradient descent "
                      f"η = {lr:g}:\nprogressive sharpening to the edge of stability",
                loss_label="training loss (MSE)")
            print(f"plot written to {args.plot}")
        return 0
    if args.plot is not None and checkpoints is None:
        checkpoints = _PLOT_CHECKPOINTS
    history = run_demo(hidden=hidden, epochs=args.epochs, seed=args.seed,
                       checkpoints=DEFAULT_CHECKPOINTS if checkpoints is None else checkpoints, lr=lr,
                       backend=args.backend, threads=args.threads,
                       lambda_max=None if args.plot is None else _demo_lambda_max(args.backend, args.threads))
    if args.plot is not None:
        N = _n_samples(history)
        plot_demo(history, args.plot, title=f"digits (N = {N}), tanh MLP 64-{hidden}-10: "
                                            f"sharpness during training")
        print(f"plot written to {args.plot}")
    return 0


#: Checkpoints of ``demo --plot`` unless --checkpoints is given (more points for a curve).
_PLOT_CHECKPOINTS = 16

#: How the table names each loss.
_LOSS_TEXT = {"cross_entropy": "cross-entropy", "mse": "squared error (mse)", "bce": "binary cross-entropy (bce)"}


def _interval(lo: float, hi: float) -> str:
    """"in [lo, hi]" rounded outward, with as many significant digits (6 to 12) as it takes for
    the printed interval to be at most twice as wide as the interval itself."""
    for digits in range(6, 13):
        a, b = _directed(lo, digits, False), _directed(hi, digits, True)
        if float(b) - float(a) <= 2.0 * (hi - lo):
            break
    return f"in [{a}, {b}]"


def _format_table(res: object, model: object, n_classes: int, soft: bool, activation: object) -> str:
    """The result as a table: the certified brackets first, then what they were computed from
    (the model, the data, the moments), the loose Wolkowicz-Styan interval, and with
    --exact / --certify the Lanczos estimates and the deflated certificate."""
    assert isinstance(res, Bound) and isinstance(model, Model)
    H = "H" if res.curvature == "hessian" else "G"
    arch = "-".join(map(str, model.dims))
    acts = activation if isinstance(activation, list) else [activation] * (len(model.dims) - 2)
    act_text = ", ".join(a if isinstance(a, str) else f"{a[0]}({a[1]:g})" for a in acts) or "none (one layer)"
    (max_lo, max_hi), (min_lo, min_hi) = res.lambda_max_bracket, res.lambda_min_bracket
    rows = [
        ("lambda_max", f"{_interval(max_lo, max_hi)}  certified"),
        ("lambda_min", f"{_interval(min_lo, min_hi)}  certified"),
        ("model", f"{model.description}: {arch}, {len(model.dims) - 1} layer(s), P = {res.n_params:,}"),
        ("activations", act_text),
        ("data", f"N = {res.n_samples:,} samples, {'soft' if soft else 'hard'} labels, {n_classes} classes"
         if res.loss == "cross_entropy" else f"N = {res.n_samples:,} samples, {n_classes} outputs"),
        ("curvature", f"{'Hessian' if H == 'H' else 'generalized Gauss-Newton'} of the {res.reduction} "
                      f"{_LOSS_TEXT[res.loss]}; backend {res.backend}, {res.elapsed_s:.3g} s"),
        (f"tr({H})", f"{res.trace:.12g}"),
        (f"tr({H}^2)", f"{res.trace_sq:.12g}"),
        ("eigenvalues", f"mean {res.mean:.6g}, std {res.std:.6g}"),
        ("WS", f"lambda_max {_interval(res.lambda_max_lower, res.lambda_max_upper)}, "
               f"lambda_min {_interval(res.lambda_min_lower, res.lambda_min_upper)}  (from tr({H}), tr({H}^2) alone)"),
    ]
    if res.lambda_max is not None:
        state = "converged" if res.lanczos_converged else "not converged"
        rows.append(("Lanczos", f"lambda_max ~ {res.lambda_max:.8g}, lambda_min ~ {res.lambda_min:.8g} "
                                f"({res.lanczos_iterations} iterations, {state}, {res.lanczos_s:.3g} s)"))
    if res.certify_k is not None and res.lambda_max_upper_deflated is not None:
        up, down = _directed(res.lambda_max_upper_deflated, 9, True), _directed(res.lambda_min_lower_deflated, 9, False)
        rows.append(("deflated", f"lambda_max <= {up}, lambda_min >= {down}  (k = {res.certify_k} Ritz pairs, "
                                 f"residual {res.certify_residual:.3g})"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    how = "with the Lanczos and deflated bounds" if res.certify_k is not None else (
        "with the Lanczos Rayleigh quotients" if res.lambda_max is not None else "--certify K tightens them")
    lines.append(f"{'':{width}}  (certified: the best bounds proved on the extreme eigenvalues of {H}, rounding "
                 f"included; {how})")
    return "\n".join(lines)


def _cmd_bound(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    activation = parse_activation(args.activation)
    if args.output is not None:  # before any work
        _check_writable(args.output, "--output", inputs=(args.model, args.data))
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
    try:
        res = bound(model.layers, X, y, activation=activation, curvature=args.curvature, reduction=args.reduction,
                    loss=args.loss,
                    batch_size=args.batch_size, threads=args.threads, backend=which, device=args.device,
                    dtype=args.dtype, progress=not args.quiet and sys.stderr.isatty(), memory_limit=args.memory_limit,
                    exact=args.exact, certify=args.certify, rtol=args.rtol)
    except ValueError as exc:  # the library names its arguments; on the command line, the options
        text = str(exc)
        if text.startswith("memory_limit = "):
            raise ValueError(text.replace("memory_limit", "--memory-limit")) from None
        raise
    text = json.dumps(res.to_dict(), indent=2)
    if args.output is not None:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if args.json:
        print(text)
    else:
        if model.source == "torch":
            activation = convert(model.layers)[1]
        elif activation is None:
            activation = []
        print(_format_table(res, model, model.dims[-1], np.ndim(y) == 2, activation))
        if args.output is not None:
            print(f"result written to {args.output} (JSON; wsbound_fast.Bound.from_dict reads it back)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subcommand per sub-parser."""
    parser = _Parser(
        prog=PROG,
        description="Exact tr(H), tr(H^2) of the loss Hessian of an MLP and Wolkowicz-Styan bounds on its "
                    "extreme eigenvalues.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)

    ce, mse = SETUPS["cross_entropy"], SETUPS["mse"]
    demo = sub.add_parser(
        "demo",
        help="train a small MLP on the bundled digits data and print tr(H), tr(H^2) and bounds as it trains",
        description="Train a one-hidden-layer tanh MLP (64-H-10) on the bundled 8x8 digits (N = 1797) with "
                    "full-batch gradient descent, and at a few checkpoints print the loss, the accuracy, "
                    "tr(H), tr(H^2) of the loss Hessian and the Wolkowicz-Styan bounds on its largest "
                    "eigenvalue. With --loss mse: the edge of stability (Cohen et al. 2021): plain gradient "
                    "descent with step eta (--lr) on the mean squared error against one-hot targets, and at "
                    "evenly spaced checkpoints the certified bracket of the largest Hessian eigenvalue "
                    "against 2/eta.",
    )
    demo.add_argument("--loss", choices=tuple(SETUPS), default="cross_entropy",
                      help="cross_entropy (default: heavy-ball momentum, tr(H) and the WS bounds) or mse (plain "
                           "gradient descent, the certified lambda_max against 2/eta: the edge of stability)")
    demo.add_argument("--plot", metavar="FILE", default=None,
                      help="also draw into FILE (.png, .pdf, .svg; needs matplotlib) tr(H), the WS bounds and the "
                           "loss against training steps; with --loss mse the certified lambda_max bracket, the "
                           "2/eta line and the training loss")
    demo.add_argument("--hidden", type=_int_at_least(1), default=None, metavar="H",
                      help=f"hidden units (default: {ce.hidden})")
    demo.add_argument("--epochs", type=_int_at_least(0), default=None, metavar="E",
                      help=f"gradient-descent steps on the full data set (default: {ce.epochs}; {mse.epochs} with "
                           "--loss mse)")
    demo.add_argument("--lr", type=_step_size, default=None, metavar="ETA",
                      help=f"step size of gradient descent (default: {ce.lr:g}, with momentum {ce.momentum:g}; "
                           f"{mse.lr:g} with --loss mse, no momentum)")
    demo.add_argument("--checkpoints", type=_int_at_least(2), default=None, metavar="K",
                      help="table rows: epoch 0, the last epoch and geometrically spaced ones between "
                           f"(default: {DEFAULT_CHECKPOINTS}, or {_PLOT_CHECKPOINTS} with --plot; with --loss mse "
                           f"{mse.checkpoints}, evenly spaced)")
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
        description="Certified bounds on the extreme eigenvalues (lambda_max, lambda_min) of the cross-entropy "
                    "loss curvature of the MLP in MODEL over the data in DATA, from its exact tr(H) and tr(H^2) "
                    "(Wolkowicz-Styan, rank and per-layer bounds; with --exact / --certify K also Lanczos and the "
                    "deflated certificate). MODEL: an .npz of "
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
    bnd.add_argument("--loss", choices=LOSSES, default="cross_entropy",
                     help="the loss: softmax cross-entropy of the logits (default), mse (squared error), or bce "
                          "(binary cross-entropy of the logits); y holds its targets")
    bnd.add_argument("--reduction", choices=("mean", "sum"), default="mean",
                     help="loss averaged (over samples; for mse and bce over every element, as torch) or summed "
                          "(default: %(default)s)")
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
    bnd.add_argument("--exact", action="store_true",
                     help="also run Lanczos on the exact curvature-vector product: Rayleigh quotients (a certified "
                          "lower bound on lambda_max, upper bound on lambda_min) that tighten the certified brackets")
    bnd.add_argument("--certify", type=_certify_arg, default=None, metavar="K|auto",
                     help="the deflated certificate from the K Ritz pairs of largest magnitude (implies --exact): "
                          "usually the tightest certified upper bound on lambda_max; 'auto': certified to the "
                          "relative width --rtol, choosing K itself")
    bnd.add_argument("--rtol", type=_positive_float, default=1e-2, metavar="R",
                     help="with --certify auto: stop when the certified lambda_max bracket is R wide relative to it "
                          "(hi/lo - 1 <= R; default 0.01)")
    bnd.add_argument("--memory-limit", type=_bytes_arg, default=None, metavar="BYTES",
                     help="memory the engine may use for features and scratch: bytes, or with a unit (4GiB, 512MiB, "
                          "4G = 4GiB; 4GB = 4*10^9) (default: a quarter of the machine's memory, at most 4 GiB)")
    bnd.add_argument("--output", metavar="FILE", default=None,
                     help="also write the result as JSON to FILE (checked writable before any work; read it back "
                          "with wsbound_fast.Bound.from_dict)")
    bnd.add_argument("--quiet", action="store_true", help="no status line on a terminal")
    bnd.set_defaults(func=_cmd_bound)
    return parser


def _one_line(exc: BaseException) -> str:
    """An error message on one line (a message of several lines is joined)."""
    return " ".join(str(exc).split()) or type(exc).__name__


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
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{PROG}: error: out of memory (a smaller --memory-limit or --batch-size may help)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
