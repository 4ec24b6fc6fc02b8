"""How tight are the certified bounds?  lambda_max against the plain, rank-aware and deflated
upper bounds, and the Lanczos time against the bound() time (not part of the test suite).

Settings (full Hessian, mean reduction, threads=1 unless --threads):
  T1  digits 64-32-10 tanh MLP after the demo's 300 epochs of training (N = 1797, low loss)
  D1  a random (Glorot) 64-48-48-48-10 tanh MLP at initialisation, first 500 digits

    python bench/bench_certify.py [--k 10 50] [--threads T]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
try:
    import wsbound_fast as wsb
except ImportError:  # not installed: use the source tree (the NumPy backend only)
    sys.path.insert(0, str(HERE.parent / "python"))
    import wsbound_fast as wsb

from wsbound_fast._cli.demo import init_mlp, loss_and_grads, train  # noqa: E402


def settings() -> list[tuple[str, list, np.ndarray, np.ndarray, str]]:
    X, y = wsb.load_digits()
    trained = train(init_mlp((64, 32, 10), np.random.default_rng(0)), X, y, epochs=300)
    loss = loss_and_grads(trained, X, y)[0]
    deep = init_mlp((64, 48, 48, 48, 10), np.random.default_rng(0))
    return [(f"T1 digits 64-32-10 tanh, trained (loss {loss:.4f}), N=1797", trained, X, y, "tanh"),
            ("D1 random 64-48-48-48-10 tanh, N=500", deep, X[:500], y[:500], "tanh")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[10, 50], help="certify=k values (default 10 50)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--curvature", default="hessian")
    args = parser.parse_args(argv)
    print(f"1-min load average: {os.getloadavg()[0]:.2f} (timings are noisy above the core count)")
    for name, layers, X, y, act in settings():
        kw = dict(activation=act, curvature=args.curvature, threads=args.threads)
        t0 = time.perf_counter()
        plain = wsb.bound(layers, X, y, **kw)
        t_bound = time.perf_counter() - t0
        print(f"\n{name}: P = {plain.n_params}, rank <= {plain.rank}; bound() {t_bound:.2f} s")
        print("| k | lambda_max (Lanczos) | WS upper (ratio) | rank-aware upper (ratio) | deflated upper (ratio, k used) "
              "| bracket | Lanczos its | Lanczos + certificate s |")
        print("|---|---|---|---|---|---|---|---|")
        for k in args.k:
            res = wsb.bound(layers, X, y, certify=k, **kw)
            lam = res.lambda_max

            def ratio(v: float) -> str:
                return f"{v:.6g} ({v / lam:.3f}x)"

            print(f"| {k} | {lam:.8g} (res {res.lambda_max_residual:.1e}) | {ratio(res.lambda_max_upper)} "
                  f"| {ratio(res.lambda_max_upper_rank)} | {ratio(res.lambda_max_upper_deflated)}, k={res.certify_k} "
                  f"| [{res.lambda_max_bracket[0]:.6g}, {res.lambda_max_bracket[1]:.6g}] "
                  f"| {res.lanczos_iterations}{'' if res.lanczos_converged else ' (not converged)'} "
                  f"| {res.lanczos_s:.2f} |")
        print("per layer (lambda_max(H^ll) bracket):",
              ", ".join(f"{lb.layer}: [{lb.lambda_max_lower:.3g}, {lb.lambda_max_upper:.3g}]"
                        for lb in plain.layer_bounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
