"""Ctrl-C stops a long computation of the compiled backend within about a second."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

SCRIPT = r"""
import numpy as np, sys, wsbound_fast as wsb
rng = np.random.default_rng(0)
layers = [(rng.normal(size=(384, 64)) / 8, rng.normal(size=384)), (rng.normal(size=(10, 384)) / 20, None)]
X = rng.normal(size=(6000, 64))
y = rng.integers(0, 10, size=6000)
print("started", flush=True)
wsb.bound(layers, X, y, activation="tanh", threads=2)   # minutes of work
print("finished", flush=True)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT delivery differs on Windows")
def test_ctrl_c_interrupts_cpp_backend() -> None:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "started"
        time.sleep(1.5)  # well inside the C++ engine by now
        assert proc.poll() is None, "the computation finished before it could be interrupted"
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        waited = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "finished" not in out
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err
    # Generous margin for a loaded machine; the engine polls every 0.1 s and a block pair is
    # sized to a few GFLOP.
    assert waited < 10.0, f"took {waited:.1f} s to stop after Ctrl-C"


HVP_SCRIPT = r"""
import numpy as np, sys, wsbound_fast as wsb
rng = np.random.default_rng(0)
layers = [(rng.normal(size=(384, 64)) / 8, rng.normal(size=384)), (rng.normal(size=(10, 384)) / 20, None)]
X = rng.normal(size=(6000, 64))
y = rng.integers(0, 10, size=6000)
V = rng.normal(size=(sum(W.size + (0 if b is None else b.size) for W, b in layers), 200))
print("started", flush=True)
wsb.hvp(layers, X, y, V, activation="tanh", threads=2)   # minutes of work
print("finished", flush=True)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT delivery differs on Windows")
def test_ctrl_c_interrupts_hvp() -> None:
    proc = subprocess.Popen([sys.executable, "-c", HVP_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "started"
        time.sleep(1.5)
        assert proc.poll() is None, "the computation finished before it could be interrupted"
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        waited = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "finished" not in out
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err
    assert waited < 10.0, f"took {waited:.1f} s to stop after Ctrl-C"
