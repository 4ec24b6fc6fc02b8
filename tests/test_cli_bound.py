"""``wsbound-fast bound MODEL DATA``: files written here, the CLI run as a subprocess.

The JSON output is parsed and compared with bound() on the same arrays; bad files exit 2
with one line on stderr.  The long matrix of bad inputs runs in-process through
``cli_main.main`` (the process exit status is its return value), the main paths as real
subprocesses.
"""

from __future__ import annotations

import io
import json
import re
import os
import subprocess
import sys

import numpy as np
import pytest

import reference as R
import wsbound_fast as wsb
from wsbound_fast._cli import main as cli_main

TOL = 1e-12


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wsbound_fast", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def _model(seed=0, dims=(6, 5, 4, 3), bias=(True, False, True)):
    rng = np.random.default_rng(seed)
    layers = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        W = rng.normal(size=(d_out, d_in)) / np.sqrt(d_in)
        layers.append((W, rng.normal(size=d_out) * 0.3 if bias[i] else None))
    return layers


def _save_model(path, layers, **extra):
    arrays = {}
    for i, (W, b) in enumerate(layers):
        arrays[f"W{i}"] = W
        if b is not None:
            arrays[f"b{i}"] = b
    np.savez(path, **arrays, **extra)
    return path


def _data(n=11, d=6, c=3, seed=1, soft=False):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = rng.dirichlet(np.ones(c), size=n) if soft else rng.integers(0, c, size=n)
    return X, y


@pytest.fixture
def files(tmp_path):
    layers = _model()
    X, y = _data()
    model = _save_model(tmp_path / "model.npz", layers)
    data = tmp_path / "data.npz"
    np.savez(data, X=X, y=y, note=np.arange(3))  # extra arrays in DATA are ignored
    return layers, X, y, model, data


def _check(out: dict, ref) -> None:
    assert out["n_params"] == ref.n_params and out["n_samples"] == ref.n_samples
    for key in ("trace", "trace_sq", "lambda_max_lower", "lambda_max_upper", "lambda_min_lower", "lambda_min_upper"):
        assert R.rel(out[key], getattr(ref, key)) <= TOL, key
    assert out["curvature"] == ref.curvature and out["reduction"] == ref.reduction


@pytest.mark.parametrize("curvature, reduction", [("hessian", "mean"), ("ggn", "sum")])
def test_json_matches_bound(files, curvature, reduction):
    layers, X, y, model, data = files
    proc = _run("bound", model, data, "--activation", "tanh", "--curvature", curvature, "--reduction", reduction,
                "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # not a terminal: no status line
    _check(json.loads(proc.stdout), wsb.bound(layers, X, y, activation="tanh", curvature=curvature,
                                              reduction=reduction))


def test_torch_backend_and_float32(torch, files):
    layers, X, y, model, data = files
    proc = _run("bound", model, data, "--activation", "tanh", "--backend", "torch", "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["backend"] == "torch"
    _check(out, wsb.bound(layers, X, y, activation="tanh"))  # the cpp backend, float64
    for backend in ("cpp", "torch"):
        proc = _run("bound", model, data, "--activation", "tanh", "--backend", backend, "--dtype", "float32", "--json")
        assert proc.returncode == 0, proc.stderr
        out, ref = json.loads(proc.stdout), wsb.bound(layers, X, y, activation="tanh")
        assert R.rel(out["trace"], ref.trace) <= 1e-5 and R.rel(out["trace_sq"], ref.trace_sq) <= 1e-5


def test_device_needs_torch_backend(files):
    _, _, _, model, data = files
    proc = _run("bound", model, data, "--activation", "tanh", "--backend", "numpy", "--device", "cpu")
    assert proc.returncode == 2
    assert "device= applies to backend='torch' only" in proc.stderr and proc.stdout == ""


def test_table_output(files):
    layers, X, y, model, data = files
    proc = _run("bound", model, data, "--activation", "tanh,relu", "--backend", "numpy", "--batch-size", "4",
                "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    ref = wsb.bound(layers, X, y, activation=["tanh", "relu"])
    lines = dict(ln.split(None, 1) for ln in proc.stdout.splitlines() if ln.strip() and not ln.startswith(" "))
    assert "6-5-4-3" in lines["model"] and f"P = {ref.n_params}" in lines["model"]
    assert lines["activations"] == "tanh, relu"
    assert "N = 11 samples, hard labels, 3 classes" in lines["data"]
    assert "backend numpy" in lines["curvature"]
    assert R.rel(float(lines["tr(H)"]), ref.trace) <= 1e-11
    assert R.rel(float(lines["tr(H^2)"]), ref.trace_sq) <= 1e-11
    # the table leads with the certified brackets, then the loose WS interval
    first = proc.stdout.splitlines()[:2]
    assert first[0].startswith("lambda_max") and first[1].startswith("lambda_min")
    for key, want in (("lambda_max", ref.lambda_max_bracket), ("lambda_min", ref.lambda_min_bracket)):
        assert lines[key].endswith("certified")
        assert _interval(lines[key]) == pytest.approx(want, rel=1e-5)
    ws = lines["WS"]
    assert _interval(ws.split("lambda_max ")[1]) == pytest.approx((ref.lambda_max_lower, ref.lambda_max_upper), rel=1e-5)
    assert _interval(ws.split("lambda_min ")[1]) == pytest.approx((ref.lambda_min_lower, ref.lambda_min_upper), rel=1e-5)
    assert "Lanczos" not in lines and "deflated" not in lines


def _interval(text: str) -> tuple[float, float]:
    """(lo, hi) of the first "in [lo, hi]" in ``text``."""
    inner = text.split("in [", 1)[1].split("]", 1)[0]
    lo, hi = inner.split(", ")
    return float(lo), float(hi)


def test_activation_stored_in_npz_and_soft_labels(tmp_path):
    layers = _model(2, dims=(4, 6, 3), bias=(True, True))
    X, Y = _data(d=4, soft=True)
    model = _save_model(tmp_path / "m.npz", layers, activation=np.array(["leaky_relu:0.2"]))
    data = tmp_path / "d.npz"
    np.savez(data, X=X, y=Y)
    assert cli_main.main(["bound", str(model), str(data), "--json"]) == 0  # activation from the file
    proc = _run("bound", model, data, "--json")
    assert proc.returncode == 0, proc.stderr
    _check(json.loads(proc.stdout), wsb.bound(layers, X, Y, activation=("leaky_relu", 0.2)))


def test_logistic_regression_needs_no_activation(tmp_path):
    layers = _model(3, dims=(6, 3), bias=(False,))
    X, y = _data()
    model, data = _save_model(tmp_path / "m.npz", layers), tmp_path / "d.npz"
    np.savez(data, X=X.astype(np.float32), y=y)
    proc = _run("bound", model, data, "--json")
    assert proc.returncode == 0, proc.stderr
    _check(json.loads(proc.stdout), wsb.bound(layers, X.astype(np.float32), y, activation="tanh"))


def test_torch_model_file(torch, tmp_path, capsys):
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.GELU(), nn.Dropout(0.1), nn.Linear(5, 3)).double()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    X, y = _data()
    data = tmp_path / "d.npz"
    np.savez(data, X=X.reshape(11, 2, 3), y=y)  # the leading Flatten applies
    proc = _run("bound", path, data, "--json")
    assert proc.returncode == 0, proc.stderr
    _check(json.loads(proc.stdout), wsb.bound(model, X, y))
    assert cli_main.main(["bound", str(path), str(data)]) == 0  # in-process: one torch start-up is enough
    out = capsys.readouterr().out
    assert "activations  gelu" in out and "torch Sequential" in out


def _bad_one_line(code: int, err: str, match: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("wsbound-fast") and " error: " in lines[0]
    assert match in lines[0], lines[0]


def test_bad_files_as_subprocess(files, tmp_path):
    layers, X, y, model, data = files
    proc = _run("bound", tmp_path / "missing.npz", data, "--activation", "tanh")
    _bad_one_line(proc.returncode, proc.stderr, "MODEL file not found")
    assert proc.stdout == ""
    np.savez(tmp_path / "noX.npz", y=y)
    proc = _run("bound", model, tmp_path / "noX.npz", "--activation", "tanh")
    _bad_one_line(proc.returncode, proc.stderr, "missing array X")
    np.savez(tmp_path / "short.npz", X=X[:, :5], y=y)
    proc = _run("bound", model, tmp_path / "short.npz", "--activation", "tanh")
    _bad_one_line(proc.returncode, proc.stderr, "X has 5 features per sample but layers[0] expects 6")


def _bad_cases(tmp_path, model, data, X, y):
    def npz(name, **arrays):
        p = tmp_path / name
        np.savez(p, **arrays)
        return str(p)

    text = tmp_path / "text.txt"
    text.write_text("not a model\n")
    W0, W1 = np.ones((5, 6)), np.ones((4, 5))
    return [
        ("missing-data", [model, str(tmp_path / "none.npz"), "--activation", "tanh"], "DATA file not found"),
        ("model-is-dir", [str(tmp_path), data, "--activation", "tanh"], "is a directory"),
        ("data-not-npz", [model, str(text), "--activation", "tanh"], "is not an .npz"),
        ("no-y", [model, npz("noy.npz", X=X), "--activation", "tanh"], "missing array y"),
        ("y-length", [model, npz("yl.npz", X=X, y=y[:4]), "--activation", "tanh"], "one label per sample"),
        ("y-range", [model, npz("yr.npz", X=X, y=y + 5), "--activation", "tanh"], "out of range"),
        ("X-nan", [model, npz("xn.npz", X=np.full_like(X, np.nan), y=y), "--activation", "tanh"], "NaN"),
        ("X-object", [model, npz("xo.npz", X=np.array([1, "a"], dtype=object), y=y), "--activation", "tanh"],
         "holds Python objects"),
        ("model-stray-key", [npz("mk.npz", W0=W0, w1=W1), data, "--activation", "tanh"], "unexpected arrays w1"),
        ("model-gap", [npz("mg.npz", W0=W0, W2=W1), data, "--activation", "tanh"], "missing W1"),
        ("model-bias-without-W", [npz("mb.npz", W0=np.ones((3, 6)), b1=np.ones(3)), data], "b1 has no weight"),
        ("model-empty", [npz("me.npz"), data], "no weight arrays"),
        ("model-W-1d", [npz("m1.npz", W0=np.ones(6)), data], "W0 must be 2-D"),
        ("model-chain", [npz("mc.npz", W0=W0, W1=np.ones((3, 4))), data, "--activation", "tanh"], "do not chain"),
        ("model-bad-activation-array", [npz("ma.npz", W0=W0, W1=np.ones((3, 5)), activation=np.ones(1)), data],
         "'activation' must be a string"),
        ("no-activation", [model, data], "give --activation"),
        ("unknown-activation", [model, data, "--activation", "swish2"], "swish2"),
        ("activation-count", [model, data, "--activation", "tanh,relu,gelu"], "one name per hidden layer"),
        ("activation-param", [model, data, "--activation", "leaky_relu:x"], "leaky_relu:x"),
        ("batch-size-0", [model, data, "--activation", "tanh", "--batch-size", "0"], "--batch-size"),
        ("curvature", [model, data, "--activation", "tanh", "--curvature", "fisher"], "--curvature"),
    ]


BAD = ["missing-data", "model-is-dir", "data-not-npz", "no-y", "y-length", "y-range", "X-nan", "X-object",
       "model-stray-key", "model-gap", "model-bias-without-W", "model-empty", "model-W-1d", "model-chain",
       "model-bad-activation-array", "no-activation", "unknown-activation", "activation-count", "activation-param",
       "batch-size-0", "curvature"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2(files, tmp_path, capsys, case):
    layers, X, y, model, data = files
    cases = {c[0]: c[1:] for c in _bad_cases(tmp_path, str(model), str(data), X, y)}
    assert sorted(cases) == sorted(BAD)
    argv, match = cases[case]
    code = cli_main.main(["bound", *argv])
    out, err = capsys.readouterr()
    assert out == ""
    _bad_one_line(code, err, match)


def test_bad_torch_files(torch, files, tmp_path, capsys):
    layers, X, y, model, data = files
    nn = torch.nn

    def check(path, match, *extra):
        code = cli_main.main(["bound", str(path), str(data), *extra])
        out, err = capsys.readouterr()
        assert out == ""
        _bad_one_line(code, err, match)

    text = tmp_path / "garbage.bin"
    text.write_bytes(b"\x00\x01 not a pickle")
    check(text, "not a readable .npz")
    p = tmp_path / "sd.pt"
    torch.save(nn.Sequential(nn.Linear(6, 3)).state_dict(), p)
    check(p, "state_dict")
    p = tmp_path / "bn.pt"
    torch.save(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)), p)
    check(p, "BatchNorm1d")  # refused by the safe loader, before from_torch sees it
    p = tmp_path / "two.pt"
    torch.save(nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3)), p)
    check(p, "no activation in between")
    p = tmp_path / "tanh.pt"
    torch.save(nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)), p)
    check(p, "disagrees", "--activation", "relu")
    assert cli_main.main(["bound", str(p), str(data), "--activation", "tanh", "--json"]) == 0
    capsys.readouterr()


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file when unpickled


def test_torch_file_cannot_run_code(torch, files, tmp_path, capsys):
    """A malicious pickle is refused by the weights_only loader; its payload never runs."""
    layers, X, y, model, data = files
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    torch.save(_Evil(str(marker)), p)
    code = cli_main.main(["bound", str(p), str(data)])
    _, err = capsys.readouterr()
    _bad_one_line(code, err, "torch.load refused it")
    assert not marker.exists()


def test_model_file_without_torch(files, tmp_path):
    """Without torch, an .npz model works and a non-npz model gets a clear message."""
    layers, X, y, model, data = files
    other = tmp_path / "model.pt"
    other.write_bytes(b"whatever")
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from wsbound_fast._cli.main import main\n"
        f"assert main(['bound', {str(model)!r}, {str(data)!r}, '--activation', 'tanh', '--json']) == 0\n"
        f"raise SystemExit(main(['bound', {str(other)!r}, {str(data)!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert json.loads(proc.stdout)["n_params"] == wsb.bound(layers, X, y, activation="tanh").n_params
    _bad_one_line(proc.returncode, proc.stderr, "needs PyTorch, which is not installed")


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_bar_on_a_terminal(files, monkeypatch, capsys, quiet):
    layers, X, y, model, data = files
    err = _TTY()
    monkeypatch.setattr(sys, "stderr", err)
    argv = ["bound", str(model), str(data), "--activation", "tanh", "--json"] + (["--quiet"] if quiet else [])
    assert cli_main.main(argv) == 0
    json.loads(capsys.readouterr().out)  # stdout stays clean JSON
    text = err.getvalue()
    if quiet:
        assert text == ""
    else:
        assert "block pair" in text  # the progress bar of bound(progress=True)
        assert text.endswith("\n")


def test_help_lists_bound():
    assert "bound" in _run("--help").stdout
    proc = _run("bound", "--help")
    assert proc.returncode == 0 and "MODEL" in proc.stdout and "weights_only" in proc.stdout


# ------------------------------------------------------------------------------------
# --certify, --exact, --memory-limit, --output
# ------------------------------------------------------------------------------------


def test_output_json_reads_back_as_the_printed_result(files, tmp_path):
    layers, X, y, model, data = files
    out = tmp_path / "result.json"
    proc = _run("bound", model, data, "--activation", "tanh", "--certify", "2", "--output", out, "--json")
    assert proc.returncode == 0, proc.stderr
    printed = wsb.Bound.from_dict(json.loads(proc.stdout))
    saved = wsb.Bound.from_dict(json.loads(out.read_text()))
    assert saved == printed  # the same result, read back with its tuples and LayerBound objects
    assert isinstance(saved.lambda_max_bracket, tuple) and isinstance(saved.layer_bounds[0], wsb.LayerBound)
    ref = wsb.bound(layers, X, y, activation="tanh", certify=2)
    assert saved.certify_k is not None and saved.lambda_max is not None
    assert saved.lambda_max_bracket == pytest.approx(ref.lambda_max_bracket, rel=1e-9)
    assert saved.lambda_min_bracket == pytest.approx(ref.lambda_min_bracket, rel=1e-9)
    # the table, and the file beside it
    out.unlink()
    proc = _run("bound", model, data, "--activation", "tanh", "--exact", "--output", out)
    assert proc.returncode == 0, proc.stderr
    lines = dict(ln.split(None, 1) for ln in proc.stdout.splitlines() if ln.strip() and not ln.startswith(" "))
    saved = wsb.Bound.from_dict(json.loads(out.read_text()))
    assert saved.lambda_max is not None and saved.certify_k is None
    for key, bracket in (("lambda_max", saved.lambda_max_bracket), ("lambda_min", saved.lambda_min_bracket)):
        lo, hi = _interval(lines[key])
        assert (lo, hi) == pytest.approx(bracket, rel=1e-5)
        assert lo <= bracket[0] and hi >= bracket[1]  # rounded outward: the printed bounds hold
    assert "Lanczos" in lines and "deflated" not in lines
    assert f"result written to {out}" in proc.stdout


def test_certify_row_in_the_table(files, capsys):
    layers, X, y, model, data = files
    assert cli_main.main(["bound", str(model), str(data), "--activation", "tanh", "--certify", "3"]) == 0
    lines = dict(ln.split(None, 1) for ln in capsys.readouterr().out.splitlines() if ln.strip() and not ln[0] == " ")
    ref = wsb.bound(layers, X, y, activation="tanh", certify=3)
    assert "k = 3 Ritz pairs" in lines["deflated"] or f"k = {ref.certify_k} Ritz pairs" in lines["deflated"]
    assert _interval(lines["lambda_max"]) == pytest.approx(ref.lambda_max_bracket, rel=1e-5)


@pytest.mark.parametrize("text, value", [("100", 100), ("4GiB", 4 << 30), ("4G", 4 << 30), ("4gi", 4 << 30),
                                         ("4GB", 4 * 10**9), ("512MiB", 512 << 20), ("512 MB", 512 * 10**6),
                                         ("1.5GiB", 3 << 29), ("64k", 65536), ("64kB", 64000), ("2T", 2 << 40),
                                         ("7b", 7)])
def test_memory_limit_sizes(text, value):
    assert cli_main._bytes_arg(text) == value


@pytest.mark.parametrize("text", ["1.5", "0", "0k", "4x", "-1", "GiB", "4 GiBs", ""])
def test_memory_limit_bad_sizes(files, capsys, text):
    _, _, _, model, data = files
    code = cli_main.main(["bound", str(model), str(data), "--activation", "tanh", "--memory-limit", text])
    _bad_one_line(code, capsys.readouterr().err, "--memory-limit")


def test_memory_limit_applies(files, capsys):
    from wsbound_fast._problem import validate as validation

    layers, X, y, model, data = files
    code = cli_main.main(["bound", str(model), str(data), "--activation", "tanh", "--memory-limit", "1k"])
    tight = validation.min_memory_limit(layers, "hessian", "cpp")
    _bad_one_line(code, capsys.readouterr().err, f"give --memory-limit >= {tight} or None")
    assert cli_main.main(["bound", str(model), str(data), "--activation", "tanh", "--memory-limit", str(tight),
                      "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    _check(out, wsb.bound(layers, X, y, activation="tanh"))


def test_output_checked_before_any_work(files, tmp_path, capsys, monkeypatch):
    _, _, _, model, data = files

    def no_work(*a, **k):  # pragma: no cover - must not run
        raise AssertionError("a file was read before --output was checked")

    monkeypatch.setattr(cli_main, "load_model", no_work)
    monkeypatch.setattr(cli_main, "load_data", no_work)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    for target, match in ((tmp_path / "missing" / "o.json", "--output: folder does not exist"),
                          (tmp_path, "--output: " + str(tmp_path) + " is a directory"),
                          (fifo, "is not a regular file (a FIFO or a socket)"),
                          (data, "is an input file; it would be overwritten"),
                          (model, "is an input file"),
                          (locked / "o.json", "--output: folder is not writable")):
        if target == locked / "o.json" and os.access(locked, os.W_OK):  # root writes anywhere
            continue
        code = cli_main.main(["bound", str(model), str(data), "--activation", "tanh", "--output", str(target)])
        _bad_one_line(code, capsys.readouterr().err, match)


@pytest.mark.parametrize("lo, hi, text", [(0.42490206123, 0.4249021034, "in [0.42490206, 0.42490211]"),
                                          (0.42490206123, 0.42490206124, "in [0.42490206123, 0.42490206125]"),
                                          (-0.397299123, -0.000780129, "in [-0.3973, -0.000780128]"),
                                          (1.0, 1.0, "in [1, 1]")])
def test_printed_brackets_round_outward(lo, hi, text):
    """Printed bounds still hold (rounded outward) and a tight bracket keeps its digits."""
    assert cli_main._interval(lo, hi) == text
    a, b = _interval(text)
    assert a <= lo and b >= hi


def test_certify_auto_to_a_width(files, capsys):
    layers, X, y, model, data = files
    argv = ["bound", str(model), str(data), "--activation", "tanh", "--certify", "auto", "--rtol", "0.05", "--json"]
    assert cli_main.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    ref = wsb.bound(layers, X, y, activation="tanh", certify=True, rtol=0.05)
    assert out["certify_rtol"] == 0.05 and out["certify_met"] is True
    lo, hi = out["lambda_max_bracket"]
    assert lo <= hi and (hi - lo) <= 0.05 * max(abs(lo), abs(hi))
    assert (lo, hi) == pytest.approx(ref.lambda_max_bracket, rel=1e-12)


@pytest.mark.parametrize("args, message", [(["--certify", "0"], "must be >= 1"), (["--certify", "maybe"], "integer"),
                                           (["--certify", "auto", "--rtol", "0"], r"must be in \(0, 10\]")])
def test_certify_auto_bad_arguments(files, args, message):
    _, _, _, model, data = files
    proc = _run("bound", str(model), str(data), "--activation", "tanh", *args)
    assert proc.returncode == 2 and re.search(message, proc.stderr) and "Traceback" not in proc.stderr


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_loss_option(loss, tmp_path, capsys):
    """--loss passes the loss: the JSON is bound(loss=...)'s, and the table names the loss."""
    layers = _model(2, dims=(4, 6, 3), bias=(True, True))
    X, _ = _data(d=4)
    T = np.random.default_rng(3).random((X.shape[0], 3))
    model = _save_model(tmp_path / "m.npz", layers)
    data = tmp_path / "d.npz"
    np.savez(data, X=X, y=T)
    assert cli_main.main(["bound", str(model), str(data), "--activation", "tanh", "--loss", loss, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    _check(out, wsb.bound(layers, X, T, activation="tanh", loss=loss))
    assert out["loss"] == loss
    assert cli_main.main(["bound", str(model), str(data), "--activation", "tanh", "--loss", loss]) == 0
    table = capsys.readouterr().out
    assert ("squared error" if loss == "mse" else "binary cross-entropy") in table
    proc = _run("bound", model, data, "--activation", "tanh", "--loss", "hinge")
    assert proc.returncode == 2 and "--loss" in proc.stderr
