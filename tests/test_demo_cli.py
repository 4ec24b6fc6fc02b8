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


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_demo_gradient_matches_finite_differences(loss) -> None:
    X, y = wsb.load_digits()
    X, y = X[:40], y[:40]
    layers = cli_demo.init_mlp([64, 5, 10], np.random.default_rng(3))
    _, _, grads = cli_demo.loss_and_grads(layers, X, y, loss)
    rng = np.random.default_rng(4)
    for li, (W, b) in enumerate(layers):
        for arr, g in ((W, grads[li][0]), (b, grads[li][1])):
            for _ in range(3):
                idx = tuple(rng.integers(0, s) for s in arr.shape)
                old = arr[idx]
                h = 1e-6
                arr[idx] = old + h
                up = cli_demo.loss_and_grads(layers, X, y, loss)[0]
                arr[idx] = old - h
                down = cli_demo.loss_and_grads(layers, X, y, loss)[0]
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


def test_run_demo_returns_its_history() -> None:
    """run_demo records through a public Tracker: the History holds the table's values, the
    accuracy and the plot's λ_max as metrics."""
    import io

    from wsbound_fast._cli import main as cli_main

    X, y = wsb.load_digits()
    history = cli_demo.run_demo(hidden=3, epochs=1, checkpoints=2, backend="cpp", threads=1, out=io.StringIO(),
                                lambda_max=cli_main._demo_lambda_max("cpp", 1))
    assert isinstance(history, wsb.History) and history.column("step") == [0, 1]
    assert history.lr is None  # momentum 0.9: 2/lr is not its threshold
    layers = cli_demo.init_mlp([64, 3, 10], np.random.default_rng(0))  # epoch 0: the initialisation
    rec = history[0]
    loss, acc, _ = cli_demo.loss_and_grads(layers, X, y)
    assert rec.train_loss == loss and rec.metrics["accuracy"] == acc
    res = wsb.bound(layers, X, y, activation="tanh", threads=1)  # threads set the default batch size
    assert rec.trace == res.trace and rec.lambda_max_bracket == res.lambda_max_bracket
    lam = rec.metrics[cli_demo.LAMBDA_MAX]
    assert lam == pytest.approx(np.linalg.eigvalsh(wsb.dense_hessian(layers, X, y, activation="tanh"))[-1], rel=1e-7)


# --- the edge-of-stability demo: demo --loss mse ---------------------------------------------


def _torch_mse_fn(torch, sizes, X, y):
    """theta (flat, W then b per layer) -> torch.nn.functional.mse_loss of the tanh MLP against one-hot y."""
    F = torch.nn.functional
    Xt = torch.tensor(X)
    Y = F.one_hot(torch.tensor(y), sizes[-1]).double()
    shapes = [s for d_in, d_out in zip(sizes[:-1], sizes[1:]) for s in ((d_out, d_in), (d_out,))]

    def fn(theta):
        a, i = Xt, 0
        params = []
        for shape in shapes:
            n = int(np.prod(shape))
            params.append(theta[i:i + n].reshape(shape))
            i += n
        for li in range(0, len(params), 2):
            z = a @ params[li].T + params[li + 1]
            a = torch.tanh(z) if li + 2 < len(params) else z
        return F.mse_loss(a, Y)

    return fn


def test_demo_mse_is_torch_mse_loss(torch) -> None:
    """The demo's MSE is torch's mse_loss against one-hot targets (the mean over N*C entries)."""
    X, y = wsb.load_digits()
    X, y = X[:50], y[:50]
    sizes = (64, 4, 10)
    layers = cli_demo.init_mlp(sizes, np.random.default_rng(2))
    theta = np.concatenate([a.ravel() for W, b in layers for a in (W, b)])
    want = float(_torch_mse_fn(torch, sizes, X, y)(torch.tensor(theta)))
    assert cli_demo.loss_and_grads(layers, X, y, "mse")[0] == pytest.approx(want, rel=1e-13)


def test_train_without_momentum_is_plain_gradient_descent() -> None:
    X, y = wsb.load_digits()
    X, y = X[:30], y[:30]
    layers = cli_demo.init_mlp([64, 3, 10], np.random.default_rng(5))
    out = cli_demo.train(layers, X, y, epochs=2, lr=0.7, momentum=0.0, loss="mse")
    want = layers
    for _ in range(2):
        grads = cli_demo.loss_and_grads(want, X, y, "mse")[2]
        want = [(W - 0.7 * gW, b - 0.7 * gb) for (W, b), (gW, gb) in zip(want, grads)]
    for (W, b), (Ww, bw) in zip(out, want):
        np.testing.assert_array_equal(W, Ww)
        np.testing.assert_array_equal(b, bw)


def test_checkpoint_epochs_linear() -> None:
    assert cli_demo.checkpoint_epochs(600, 61, "linear") == list(range(0, 601, 10))
    assert cli_demo.checkpoint_epochs(5, 61, "linear") == [0, 1, 2, 3, 4, 5]
    assert cli_demo.checkpoint_epochs(0, 3, "linear") == [0]


@pytest.mark.parametrize("backend", [None, "numpy"])
def test_cli_demo_mse_bracket_contains_the_dense_lambda_max(tmp_path, torch, backend) -> None:
    """demo --loss mse on a tiny model: the printed (outward-rounded) bracket at the last checkpoint
    contains eigvalsh of the dense Hessian of torch's mse_loss of the same model, trained here with
    torch (plain gradient descent, no code of the demo but its initialisation); the plot is written.
    backend None: the default (the compiled core)."""
    pytest.importorskip("matplotlib")
    hidden, epochs, lr = 3, 6, 1.0
    path = tmp_path / "eos.png"
    proc = _cli("demo", "--loss", "mse", "--hidden", str(hidden), "--epochs", str(epochs), "--checkpoints", "3",
                "--lr", str(lr), "--plot", str(path), *(() if backend is None else ("--backend", backend)))
    assert proc.returncode == 0, proc.stderr
    assert f"backend {backend or 'cpp'}" in proc.stdout.splitlines()[0]
    assert f"plot written to {path}" in proc.stdout
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    rows = [ln.split() for ln in proc.stdout.splitlines() if ln.strip() and ln.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 3, 6]
    assert all(float(r[5]) == 2.0 / lr for r in rows)  # the 2/eta column
    lo, hi = float(rows[-1][3]), float(rows[-1][4])

    X, y = wsb.load_digits()
    sizes = (64, hidden, 10)
    layers = cli_demo.init_mlp(sizes, np.random.default_rng(0), cli_demo.SETUPS["mse"].init_scale)
    fn = _torch_mse_fn(torch, sizes, X, y)
    theta = torch.tensor(np.concatenate([a.ravel() for W, b in layers for a in (W, b)]), requires_grad=True)
    for _ in range(epochs):
        (g,) = torch.autograd.grad(fn(theta), theta)
        theta = (theta - lr * g).detach().requires_grad_(True)
    H = torch.autograd.functional.hessian(fn, theta.detach()).numpy()
    top = float(np.linalg.eigvalsh(H)[-1])
    assert lo <= top <= hi, (lo, top, hi)
    assert hi - lo <= 0.02 * top  # certify=True: about 1% wide at most
    assert float(rows[-1][1]) == pytest.approx(float(fn(theta.detach())), abs=1e-5)  # the loss column
