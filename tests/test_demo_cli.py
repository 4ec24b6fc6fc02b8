"""The packaged data, the demo's training maths, and the command line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import wsbound_fast as wsb
from wsbound_fast._cli import demo as cli_demo


def test_load_digits() -> None:
    X, y = wsb.load_digits()
    assert X.shape == (1797, 64) and X.dtype == np.float64
    assert y.shape == (1797,) and y.dtype == np.int64
    assert X.min() == 0.0 and X.max() == 1.0
    assert set(np.unique(y).tolist()) == set(range(10))


def test_demo_gradient_matches_finite_differences() -> None:
    X, y = wsb.load_digits()
    X, y = X[:40], y[:40]
    layers = cli_demo.init_mlp([64, 5, 10], np.random.default_rng(3))
    _, _, grads = cli_demo.loss_and_grads(layers, X, y)
    rng = np.random.default_rng(4)
    for li, (W, b) in enumerate(layers):
        for arr, g in ((W, grads[li][0]), (b, grads[li][1])):
            for _ in range(3):
                idx = tuple(rng.integers(0, s) for s in arr.shape)
                old = arr[idx]
                h = 1e-6
                arr[idx] = old + h
                up = cli_demo.loss_and_grads(layers, X, y)[0]
                arr[idx] = old - h
                down = cli_demo.loss_and_grads(layers, X, y)[0]
                arr[idx] = old
                assert g[idx] == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)


def test_demo_rows_are_exact_for_the_trained_model() -> None:
    """Each checkpoint's tr(H), tr(H^2) equal the dense Hessian of the model at that epoch."""
    X, y = wsb.load_digits()
    X, y = X[:200], y[:200]
    seen: dict[int, list] = {}
    layers = cli_demo.init_mlp([64, 4, 10], np.random.default_rng(0))
    cli_demo.train(layers, X, y, epochs=5, checkpoints=[0, 5],
                on_checkpoint=lambda e, p, loss, acc: seen.__setitem__(e, [(W.copy(), b.copy()) for W, b in p]))
    assert sorted(seen) == [0, 5]
    for params in seen.values():
        H = wsb.dense_hessian(params, X, y, activation="tanh")
        res = wsb.bound(params, X, y, activation="tanh")
        assert res.trace == pytest.approx(np.trace(H), rel=1e-10)
        assert res.trace_sq == pytest.approx(np.sum(H * H), rel=1e-10)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wsbound_fast", *args], capture_output=True, text=True, timeout=300)


def test_cli_demo_prints_a_table() -> None:
    proc = _cli("demo", "--hidden", "4", "--epochs", "8", "--checkpoints", "3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "P = 310" in lines[0]  # 64*4 + 4 + 4*10 + 10
    rows = [ln.split() for ln in lines if ln.strip() and ln.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == cli_demo.checkpoint_epochs(8, 3)
    for r in rows:
        lo, hi = float(r[5]), float(r[6])
        assert lo <= hi


def test_cli_bad_argument_exits_2_with_one_line() -> None:
    proc = _cli("demo", "--hidden", "0")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "--hidden" in proc.stderr


def test_cli_console_script_help() -> None:
    proc = _cli("--help")
    assert proc.returncode == 0 and "demo" in proc.stdout


def test_demo_lambda_max_is_the_top_eigenvalue() -> None:
    """The λ_max curve of demo --plot: Lanczos equals eigvalsh of the dense Hessian, inside the WS bounds."""
    from wsbound_fast._cli import main as cli_main

    X, y = wsb.load_digits()
    X, y = X[:150], y[:150]
    layers = cli_demo.init_mlp([64, 3, 10], np.random.default_rng(1))
    lam = cli_main._demo_lambda_max("cpp", 1)(layers, X, y)
    H = wsb.dense_hessian(layers, X, y, activation="tanh")
    top = np.linalg.eigvalsh(H)[-1]
    assert lam == pytest.approx(top, rel=1e-7)
    res = wsb.bound(layers, X, y, activation="tanh")
    assert res.lambda_max_lower <= lam <= res.lambda_max_upper
