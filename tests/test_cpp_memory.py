"""The C++ engine stays within ``memory_limit``: the memory bound() allocates (not X, the
caller's arrays or the import-time footprint) peaks below the budget at tight budgets.

Measured in a subprocess, Linux with glibc only: the peak resident set during the call
(VmHWM, reset through /proc/self/clear_refs) less the resident set before it.  With
MALLOC_MMAP_THRESHOLD_=65536 every allocation of 64 KiB or more is its own mapping, given
back when freed, so the resident set follows the heap: against an allocation counter (peak
live bytes) it came out 1.5 MiB below to 0.5 MiB above.  The tolerance, 1 MiB + 2 %, covers
what RSS counts beside the heap: whole pages, touched thread stacks, malloc's arenas.
Before the plan counted the C++ engine's own memory (_planning.cost.cpp_*: the weight copy, each
thread's K-route operands and block intermediates), and before the one-hidden-layer Hessian
stopped building a G_{1,2} (B d_1 C values) only to drop it, bound() went up to 1.75 x over.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

#: (dims, curvature, N, memory_limit in MiB, threads, dtype): budgets at which only some
#: blocks' features are cached.  Before the plan counted the engine's memory the first three
#: went over (1.73, 1.22 and 1.10 x memory_limit).
CASES = [
    ("784-1024-10", "hessian", 240, 24, 2, "float64"),  # one hidden layer, K route
    ("784-512-10", "hessian", 300, 16, 2, "float64"),
    ("784-512-10", "hessian", 200, 12, 1, "float64"),
    ("64-512-10", "ggn", 400, 12, 2, "float64"),  # structured GGN, one hidden layer
    ("32-64-64-10", "hessian", 150, 6, 2, "float64"),  # generic path: dense and adjacent cross terms
    ("64-256-256-10", "ggn", 300, 16, 2, "float64"),  # structured GGN through T_l
    ("784-512-10", "hessian", 300, 16, 2, "float32"),  # float32 copies of the features
]

_CHILD = r"""
import json, sys
import numpy as np
import wsbound_fast as wsb
from wsbound_fast._backends import validate_for

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024

for dims, curvature, n, limit_mib, threads, dtype in json.loads(sys.argv[1]):
    d = [int(v) for v in dims.split("-")]
    rng = np.random.default_rng(0)
    layers = [(rng.normal(size=(o, i)) / np.sqrt(i), 0.1 * rng.normal(size=o)) for i, o in zip(d[:-1], d[1:])]
    X, y = rng.normal(size=(n, d[0])), rng.integers(0, d[-1], n)
    kw = dict(activation="gelu", curvature=curvature, memory_limit=limit_mib << 20, threads=threads)
    wsb.bound(layers, X[:40], y[:40], dtype=dtype, **kw)  # warm-up: lazy imports, code pages
    prob = validate_for("cpp", layers, X, y, reduction="mean", **kw)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    wsb.bound(layers, X, y, dtype=dtype, **kw)
    print(json.dumps(dict(case=[dims, curvature, n, limit_mib, threads, dtype], used=status("VmHWM") - before,
                          batch=prob.batch_size, group=prob.group_blocks, blocks=-(-n // prob.batch_size))))
"""


def _measurable() -> bool:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _measurable(), reason="needs Linux, glibc and a writable /proc/self/clear_refs")
def test_cpp_engine_stays_within_memory_limit():
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(CASES)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == len(CASES)
    over = [(r["case"], f"{r['used'] / (r['case'][3] << 20):.2f} x memory_limit", r["batch"], r["group"])
            for r in rows if r["used"] > 1.02 * (r["case"][3] << 20) + (1 << 20)]
    assert not over, over
    for r in rows:
        assert r["group"] < r["blocks"], r  # features are recomputed: the budget binds
