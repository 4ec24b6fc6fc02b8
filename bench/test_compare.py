"""Smoke test of bench/compare.py and its cost model (under bench/, not part of ``pytest tests``).

    python -m pytest bench/test_compare.py

The smoke test runs ``compare.py --quick`` in a subprocess (so that the peers' warnings do
not meet this project's ``filterwarnings = error``) and checks the JSON it writes.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _flops  # noqa: E402


def test_pair_flops_are_the_cost_model() -> None:
    """bench/ counts flops with the package's cost model (one place), on the planner's path."""
    from wsbound_fast._planning.cost import choose_structured, total_pair_flops

    for dims in [(64, 128, 10), (64, 256, 256, 256, 10), (784, 1024, 10), (5, 3, 4, 2)]:
        for curv in ("hessian", "ggn"):
            hess = curv == "hessian"
            bias = [True] * (len(dims) - 1)
            for s in (False, True):
                assert _flops.pair_flops(dims, 1000, curv, structured=s) == total_pair_flops(dims, bias, hess, 1000,
                                                                                              256, s)
            assert _flops.pair_flops(dims, 100, curv) == total_pair_flops(dims, bias, hess, 100, 100,
                                                                          choose_structured(dims, bias, hess))
    # W1's Hessian: the K route does fewer GEMM flops than the generic Gram path
    assert _flops.pair_flops((64, 128, 10), 1797, structured=True) < _flops.pair_flops((64, 128, 10), 1797,
                                                                                       structured=False)


def test_gemm_rate_is_positive() -> None:
    r = _flops.gemm_rate("float64", n=64, repeats=2)
    assert r["flops_per_s"] > 0 and math.isfinite(r["flops_per_s"])


def test_quick_run(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "compare.json"
    md = tmp_path / "compare.md"
    proc = subprocess.run([sys.executable, str(HERE / "compare.py"), "--quick", "--workloads", "dense,W1",
                           "--out", str(out), "--markdown", str(md)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["quick"] is True
    assert record["gemm_rate"]["float64"]["flops_per_s"] > 0
    names = {(c["workload"], c["curvature"]) for c in record["cases"]}
    assert names == {("dense", "hessian"), ("W1", "hessian"), ("W1", "ggn")}
    for case in record["cases"]:
        methods = [r["method"] for r in case["rows"]]
        assert methods[0] == "wsbound_fast cpp"
        for r in case["rows"]:
            # every row is a timing, or says why it was skipped or failed
            assert ("time_s" in r) or r.get("skipped") or r.get("failed"), r
        cpp = case["rows"][0]
        assert cpp["ratio_to_cpp"] == 1.0
        assert cpp["lambda_max_lower"] <= cpp["lambda_max_upper"]
        assert case["gemm"] and case["gemm"][0]["flops"] == case["pair_flops"]
    assert record["checks"] and all(c["passed"] for c in record["checks"])
    text = md.read_text()
    assert "| workload |" in text and "Checks:" in text
