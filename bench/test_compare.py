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


def test_pair_flops_w1_matches_the_issue() -> None:
    """W1 full Hessian: 17,456 multiply-adds per pair, 5.64e10 flops, the C^2 h term 73 %."""
    terms = _flops.pair_multiply_adds((64, 128, 10), True, "hessian")
    per_pair = sum(terms.values())
    assert per_pair == 17456
    assert terms["<G_11> (C^2 d)"] == 10 * 10 * 128
    assert terms["<G_11> (C^2 d)"] / per_pair == pytest.approx(0.733, abs=1e-3)
    assert _flops.pair_flops((64, 128, 10), True, 1797) == pytest.approx(5.64e10, rel=1e-3)


def test_pair_flops_variants_and_pairs() -> None:
    for dims in [(64, 128, 10), (64, 256, 256, 256, 10), (784, 1024, 10), (5, 3, 4, 2)]:
        for curv in ("hessian", "ggn"):
            s = _flops.pair_flops(dims, True, 100, curv)
            d = _flops.pair_flops(dims, True, 100, curv, variant="dense")
            assert 0 < s <= d
    # no bias: the augmented inputs shrink by one
    assert (_flops.pair_multiply_adds((4, 3, 2), False)["alpha"]
            == _flops.pair_multiply_adds((4, 3, 2), True)["alpha"] - 2)
    assert _flops.n_pairs(10) == 55
    assert _flops.n_pairs(10, 1) == 55  # blocks of one sample: the sample-level triangle
    assert _flops.n_pairs(10, 10) == 100  # one block, contracted in full
    assert _flops.n_pairs(10, 3) == (9 + 9 + 9 + 1) + (3 * 9 + 3 * 3)  # blocks 3, 3, 3, 1: diagonal + I < J


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
