"""Ctrl-C stops a long computation of the compiled backend within about a second."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

SETUP = r"""
import signal
# A process started in the background by a non-interactive shell inherits SIGINT as ignored,
# and Python then leaves it ignored: restore the default KeyboardInterrupt handler.
signal.signal(signal.SIGINT, signal.default_int_handler)
import numpy as np, sys, wsbound_fast as wsb
rng = np.random.default_rng(0)
layers = [(rng.normal(size=(384, 64)) / 8, rng.normal(size=384)), (rng.normal(size=(10, 384)) / 20, None)]
X = rng.normal(size=(6000, 64))
y = rng.integers(0, 10, size=6000)
V = rng.normal(size=(sum(W.size + (0 if b is None else b.size) for W, b in layers), 200))
print("started", flush=True)
"""

#: Each call is minutes of work on two cores.
CALLS = {
    "bound": 'wsb.bound(layers, X, y, activation="tanh", threads=2)',
    "hvp": 'wsb.hvp(layers, X, y, V, activation="tanh", threads=2)',
}


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT delivery differs on Windows")
@pytest.mark.parametrize("call", sorted(CALLS))
def test_ctrl_c_interrupts_cpp_backend(call: str) -> None:
    script = SETUP + CALLS[call] + '\nprint("finished", flush=True)\n'
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
    # sized to well under a second of work.
    assert waited < 10.0, f"took {waited:.1f} s to stop after Ctrl-C"
