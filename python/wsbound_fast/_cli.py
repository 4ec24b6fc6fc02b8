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


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    run_demo(hidden=args.hidden, epochs=args.epochs, seed=args.seed, checkpoints=args.checkpoints,
             backend=args.backend, threads=args.threads)
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
    demo.add_argument("--hidden", type=_int_at_least(1), default=DEFAULT_HIDDEN, metavar="H",
                      help="hidden units (default: %(default)s)")
    demo.add_argument("--epochs", type=_int_at_least(0), default=DEFAULT_EPOCHS, metavar="E",
                      help="gradient-descent steps on the full data set (default: %(default)s)")
    demo.add_argument("--checkpoints", type=_int_at_least(2), default=DEFAULT_CHECKPOINTS, metavar="K",
                      help="table rows: epoch 0, the last epoch and geometrically spaced ones between "
                           "(default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the weight initialisation (default: %(default)s)")
    demo.add_argument("--backend", choices=("cpp", "numpy"), default=None,
                      help="engine for the bounds (default: cpp, or numpy with a notice if the compiled "
                           "core is unavailable)")
    demo.add_argument("--threads", type=_int_at_least(1), default=None, metavar="T",
                      help="worker threads of the cpp backend (default: all available cores)")
    demo.set_defaults(func=_cmd_demo)
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
