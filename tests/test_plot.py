"""demo --plot and plot_sharpness(): a valid PNG that matplotlib reads back.

Tests that draw skip without matplotlib (an optional extra); the message for its absence
is tested with matplotlib blocked, so it runs everywhere.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from wsbound_fast._cli import main as cli_main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read_png(path):
    matplotlib_image = pytest.importorskip("matplotlib.image")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = matplotlib_image.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert float(np.std(img)) > 0.01  # not a blank canvas
    return img


def test_plot_sharpness_png(tmp_path):
    pytest.importorskip("matplotlib")
    from wsbound_fast._cli.plot import plot_sharpness

    steps = [0, 1, 3, 10, 30, 100, 300]
    trace = [14.6, 21.5, 30.8, 19.3, 6.9, 4.5, 2.0]
    hi = [6.9, 6.3, 6.9, 4.0, 1.7, 1.0, 0.48]
    lo = [0.009, 0.012, 0.016, 0.0097, 0.0035, 0.0023, 0.001]
    loss = [2.46, 2.24, 1.70, 0.38, 0.086, 0.02, 0.005]
    lmax = [None, 1.0, 2.0, None, 0.5, 0.3, 0.1]  # the λ_max hook: partial series allowed
    path = tmp_path / "s.png"
    plot_sharpness(str(path), steps, trace, hi, loss, ws_lower=lo, lambda_max=lmax, title="t")
    _read_png(path)
    path2 = tmp_path / "bare.png"
    plot_sharpness(str(path2), [0, 1, 2], [1.0, 2.0, 3.0], [0.5, 0.6, 0.7], curvature="ggn")
    _read_png(path2)


def test_plot_sharpness_rejects_ragged_series(tmp_path):
    pytest.importorskip("matplotlib")
    from wsbound_fast._cli.plot import plot_sharpness

    with pytest.raises(ValueError, match="ws_upper must have one value per step"):
        plot_sharpness(str(tmp_path / "x.png"), [0, 1], [1.0, 2.0], [1.0])


def test_cli_demo_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "sharpness.png"
    proc = subprocess.run([sys.executable, "-m", "wsbound_fast", "demo", "--hidden", "4", "--epochs", "8",
                           "--checkpoints", "3", "--plot", str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"plot written to {path}" in proc.stdout
    _read_png(path)


def test_cli_demo_plot_missing_folder(tmp_path, capsys):
    code = cli_main.main(["demo", "--epochs", "1", "--plot", str(tmp_path / "no" / "such" / "x.png")])
    out, err = capsys.readouterr()
    if "matplotlib" in err:  # without the extra, that is reported first
        pytest.skip("matplotlib not installed")
    assert code == 2 and out == ""  # refused before training
    assert len(err.strip().splitlines()) == 1 and "folder does not exist" in err


def test_cli_demo_plot_unknown_format(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code = cli_main.main(["demo", "--epochs", "1", "--plot", str(tmp_path / "x.xyz")])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""  # refused before training
    assert len(err.strip().splitlines()) == 1 and "image format" in err and ".png" in err


def test_cli_demo_plot_without_matplotlib(tmp_path):
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from wsbound_fast._cli.main import main\n"
        f"raise SystemExit(main(['demo', '--epochs', '1', '--plot', {str(tmp_path / 'x.png')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""  # refused before training
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs matplotlib" in lines[0] and "wsbound_fast[plot]" in lines[0]
    assert not (tmp_path / "x.png").exists()


def _history(steps, lower, upper, lr=None):
    import wsbound_fast as wsb

    return wsb.History([wsb.Record(step=int(s), trace=1.0, trace_sq=1.0, lambda_max_bracket=(lo, hi),
                                   lambda_min_bracket=(-hi, -lo)) for s, lo, hi in zip(steps, lower, upper)], lr=lr)


def test_plot_edge_of_stability_png(tmp_path):
    """Print resolution (7 in at >= 150 dpi), with and without a crossing of 2/eta."""
    pytest.importorskip("matplotlib")
    from wsbound_fast._cli.plot import plot_edge_of_stability

    steps = np.arange(0, 101, 10)
    lam = np.minimum(1.0 + 0.02 * steps, 2.1)
    loss = 0.1 * np.exp(-np.arange(101) / 50) + 0.01 * (np.arange(101) % 7 == 0)
    for name, lr in (("cross.png", 1.0), ("below.png", 0.4)):
        path = tmp_path / name
        plot_edge_of_stability(str(path), _history(steps, lam * 0.999, lam * 1.001, lr), np.arange(101), loss,
                               title="t", loss_label="training loss (MSE)")
        img = _read_png(path)
        assert img.shape[1] >= 7 * 150
    with pytest.raises(ValueError, match="lr"):
        plot_edge_of_stability(str(tmp_path / "x.png"), _history(steps, lam, lam), np.arange(101), loss)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        plot_edge_of_stability(str(tmp_path / "x.png"), _history(steps, lam, lam), np.arange(101), loss, lr=0.0)
    with pytest.raises(ValueError, match="loss must have one value per step"):
        plot_edge_of_stability(str(tmp_path / "x.png"), _history(steps, lam, lam, 1.0), np.arange(101), loss[:3])
