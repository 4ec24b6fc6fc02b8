"""Tracking during training (issue 16): wsb.Tracker records bound() every k steps, wsb.History
saves to JSON / CSV and loads back equal, wsb.plot_history draws a PNG."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import wsbound_fast as wsb

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Fields of a Bound that are wall times, not results.
TIMES = ("elapsed_s", "lanczos_s")


def _results(res: wsb.Bound) -> dict:
    return {k: v for k, v in res.to_dict().items() if k not in TIMES}


def _data(n=24, d=4, c=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.integers(0, c, n)


def _torch_run(torch, every=3, steps=7, lr=0.5, **options):
    """A short torch training loop tracked every ``every`` steps; returns the tracker and, per
    recorded step, bound() called directly on the same weights (and the same options)."""
    X, y = _data()
    Xt, yt = torch.tensor(X), torch.tensor(y)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = wsb.Tracker(Xt, yt, every=every, lr=lr, **options)
    direct = {}
    for i in range(steps):
        loss = torch.nn.functional.cross_entropy(model(Xt), yt)
        rec = tracker.step(model, train_loss=loss.item(), accuracy=0.25 * i)
        assert (rec is not None) == (i % every == 0)
        if rec is not None:
            assert rec is tracker.history[-1]
            direct[i] = wsb.bound(model, Xt, yt, **{"certify": True, **options})
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tracker, direct


def test_tracked_torch_loop_records_what_bound_gives():
    torch = pytest.importorskip("torch")
    tracker, direct = _torch_run(torch)
    history = tracker.history
    assert history.column("step") == [0, 3, 6] == sorted(direct)
    assert history.lr == 0.5 and history.curvature == "hessian" and history.loss == "cross_entropy"
    for rec in history:
        res = direct[rec.step]
        assert _results(rec.bound) == _results(res)  # the same weights: bitwise the same numbers
        assert rec.trace == res.trace and rec.trace_sq == res.trace_sq
        assert rec.lambda_max_bracket == res.lambda_max_bracket and rec.lambda_min_bracket == res.lambda_min_bracket
        assert rec.lambda_max == res.lambda_max and rec.certify_met is True
        assert rec.seconds > 0 and rec.metrics == {"accuracy": 0.25 * rec.step}
        lo, hi = rec.lambda_max_bracket
        assert lo <= rec.lambda_max <= hi and hi / lo - 1 <= 1e-2  # certify=True: to rtol
    # the weights were read at each step: training moved them
    assert len({r.trace for r in history}) == 3
    losses = history.column("train_loss")
    assert losses == sorted(losses, reverse=True)


def test_tracked_numpy_layers_at_chosen_steps():
    """A list of (W, b) arrays updated in place, recorded at a collection of steps, certify=None."""
    X, y = _data(seed=1)
    rng = np.random.default_rng(2)
    layers = [(0.5 * rng.standard_normal((5, 4)), np.zeros(5)), (0.5 * rng.standard_normal((3, 5)), np.zeros(3))]
    tracker = wsb.Tracker(X, y, every=[0, 2, 3], activation="tanh", certify=None)
    assert [tracker.due(s) for s in range(5)] == [True, False, True, True, False]
    for i in range(5):
        rec = tracker.step(layers, step=i)
        if rec is not None:
            res = wsb.bound(layers, X, y, activation="tanh")
            assert _results(rec.bound) == _results(res)
            assert rec.lambda_max is None and rec.certify_met is None and rec.train_loss is None
        for W, _ in layers:
            W *= 1.1  # in place: the tracker must see it
    assert tracker.history.column("step") == [0, 2, 3]
    tr = tracker.history.column("trace")
    assert tr[0] != tr[1] != tr[2]


def test_history_json_and_csv_round_trips(tmp_path):
    torch = pytest.importorskip("torch")
    tracker, _ = _torch_run(torch, every=2, steps=5)
    history = tracker.history
    # a record without a loss, a metric missing from some records, certify_met None
    res = wsb.bound([(np.ones((3, 4)), None)], *_data(seed=3))
    history.append(wsb.Record.from_bound(res, 10, seconds=0.125, metrics={"grad_norm": 1e-300}))

    for name in ("h.json", "H.CSV"):
        path = history.save(tmp_path / name)
        assert path == tmp_path / name
        back = wsb.History.load(str(path))
        assert back == history
        assert [r.metrics for r in back] == [r.metrics for r in history]
        assert back.lr == 0.5 and back.curvature == "hessian" and back.loss == "cross_entropy"
        if name.endswith("json"):  # JSON keeps each record's whole Bound
            assert [r.bound for r in back] == [r.bound for r in history]
        else:
            assert all(r.bound is None for r in back)
    doc = json.loads((tmp_path / "h.json").read_text())
    assert doc["format"] == "wsbound_fast.history" and len(doc["records"]) == 4
    text = (tmp_path / "H.CSV").read_text().splitlines()
    assert text[0].startswith("# wsbound_fast.history {")
    assert text[1].split(",") == [*wsb._api.tracking.CSV_COLUMNS, "accuracy", "grad_norm"]
    assert text[-1].split(",")[1] == ""  # no train_loss
    # an empty history round-trips too, and a CSV without the comment line still loads
    for name in ("e.json", "e.csv"):
        empty = wsb.History(lr=0.1)
        assert wsb.History.load(empty.save(tmp_path / name)) == empty
    bare = tmp_path / "bare.csv"
    bare.write_text("\n".join(text[1:]) + "\n")
    loaded = wsb.History.load(bare)
    assert loaded.records == history.records and loaded.lr is None


def test_plan_of_a_record():
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    X, y = _data()
    tracker = wsb.Tracker(torch.tensor(X), torch.tensor(y), every=5, threads=1)
    p = tracker.plan(model)
    assert isinstance(p, wsb.Plan) and p.n_samples == 24 and p.n_params == 4 * 5 + 5 + 5 * 3 + 3
    assert p.predicted_seconds > 0


def test_plot_history_png(tmp_path):
    pytest.importorskip("matplotlib")
    matplotlib_image = pytest.importorskip("matplotlib.image")
    from matplotlib.figure import Figure

    torch = pytest.importorskip("torch")
    tracker, _ = _torch_run(torch, every=2, steps=5)
    path = tmp_path / "sharpness.png"
    fig = wsb.plot_history(tracker.history, path, title="tiny")
    assert isinstance(fig, Figure)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = matplotlib_image.imread(str(path))
    assert img.ndim == 3 and img.shape[1] >= 7 * 150 and float(np.std(img)) > 0.01  # print resolution, not blank
    # no path: nothing written; an ax of the caller's figure: drawn there; no lr: no 2/eta line
    own = Figure()
    ax = own.add_subplot()
    no_lr = wsb.History(tracker.history.records)
    assert wsb.plot_history(no_lr, ax=ax) is own
    assert not any("2/η" in str(t.get_text()) for t in ax.get_legend().get_texts())
    ax2 = Figure().add_subplot()
    wsb.plot_history(no_lr, ax=ax2, lr=0.5)
    assert any("2/η = 4" in str(t.get_text()) for t in ax2.get_legend().get_texts())


def test_bad_arguments_name_themselves(tmp_path):
    X, y = _data()
    for every, exc in ((0, ValueError), (-3, ValueError), (True, TypeError), ("10", TypeError), ([], ValueError),
                       ([1, -1], ValueError), (2.5, TypeError)):
        with pytest.raises(exc, match="every"):
            wsb.Tracker(X, y, every=every)
    for lr in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="lr"):
            wsb.Tracker(X, y, lr=lr)
    with pytest.raises(TypeError, match="lr"):
        wsb.Tracker(X, y, lr="fast")
    with pytest.raises(TypeError, match="'sharpness'"):
        wsb.Tracker(X, y, sharpness=True)

    layers = [(np.ones((3, 4)), None)]
    tracker = wsb.Tracker(X, y, every=1, certify=None)
    tracker.step(layers, step=4)
    with pytest.raises(ValueError, match="step must increase"):
        tracker.step(layers, step=4)
    with pytest.raises(ValueError, match="step must be >= 0"):
        tracker.step(layers, step=-1)
    with pytest.raises(TypeError, match="train_loss"):
        tracker.step(layers, step=5, train_loss="low")
    with pytest.raises(ValueError, match="'trace' is taken"):
        tracker.step(layers, step=5, trace=1.0)
    assert tracker.history.column("step") == [4]  # a refused step records nothing
    with pytest.raises(ValueError, match="name must be a record field or a metric"):
        tracker.history.column("sharpness")

    history = tracker.history
    for bad in ("h.txt", "h", "h.json.gz"):
        with pytest.raises(ValueError, match=r"path must end in \.json or \.csv"):
            history.save(tmp_path / bad)
        with pytest.raises(ValueError, match=r"path must end in \.json or \.csv"):
            wsb.History.load(tmp_path / bad)
    (tmp_path / "other.json").write_text('{"n_params": 3}')
    with pytest.raises(ValueError, match="not a saved history"):
        wsb.History.load(tmp_path / "other.json")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="header lacks"):
        wsb.History.load(tmp_path / "other.csv")
    with pytest.raises(TypeError, match="history must be a wsbound_fast.History"):
        wsb.plot_history(history.records)
    with pytest.raises(ValueError, match="no records"):
        wsb.plot_history(wsb.History())
    if _has_matplotlib():
        with pytest.raises(ValueError, match="path: cannot tell the image format"):
            wsb.plot_history(history, tmp_path / "x.foo")
        with pytest.raises(ValueError, match="lr"):
            wsb.plot_history(history, lr=0.0)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_plot_history_without_matplotlib():
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "import wsbound_fast as wsb\n"
        "h = wsb.History([wsb.Record(step=0, trace=1.0, trace_sq=1.0, lambda_max_bracket=(1.0, 1.0),"
        " lambda_min_bracket=(0.0, 0.0))])\n"
        "try:\n    wsb.plot_history(h, 'x.png')\nexcept ImportError as exc:\n    print(exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "needs matplotlib" in proc.stdout and "wsbound_fast[plot]" in proc.stdout


def test_tracker_takes_a_loader_once(torch):
    """A loader of (X, y) batches is collected once: a generator works, and the records equal
    the arrays' (and Tracker.plan counts its samples)."""
    rng = np.random.default_rng(4)
    layers = [(rng.standard_normal((5, 4)), np.zeros(5)), (rng.standard_normal((3, 5)), np.zeros(3))]
    X, y = rng.standard_normal((12, 4)), rng.integers(0, 3, 12)
    a = wsb.Tracker(((X[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)), activation="tanh", certify=None)
    b = wsb.Tracker(X, y, activation="tanh", certify=None)
    for step in range(2):
        ra, rb = a.step(layers), b.step(layers)
        assert (ra.trace, ra.trace_sq) == (rb.trace, rb.trace_sq)
    assert a.plan(layers).n_samples == 12
    with pytest.raises(TypeError, match="y is required"):
        wsb.Tracker(X)
