"""benchmarks/bench_train_step.py --smoke: one row per recipe, internally consistent numbers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_writes_consistent_rows(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_train_step.py"),
        "--smoke",
        "--configs",
        "tiny_msf:method.query_precision=bank,tiny_isd",
        "--warmup",
        "1",
        "--rep",
        "5",
        "--out-dir",
        str(tmp_path),
        "--profile",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "bench_train_step.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["tiny_msf:method.query_precision=bank", "tiny_isd"]
    assert [r["query_precision"] for r in rows] == ["bank", "float32"]  # the override reached the recipe
    for row in rows:
        assert row["step_ms"] > 0 and row["loss_ms"] > 0
        assert math.isclose(row["images_per_s"], row["batch"] / row["step_ms"] * 1e3, rel_tol=1e-9)
        assert math.isclose(row["loss_share_pct"], 100 * row["loss_ms"] / row["step_ms"], rel_tol=1e-9)
        assert row["step_no_bank_ms"] > 0
        expected = 100 * (row["step_ms"] - row["step_no_bank_ms"]) / row["step_ms"]
        assert math.isclose(row["marginal_share_pct"], expected, rel_tol=1e-9)
        assert row["bank"] == 256 and row["dim"] == 32
    # The profile of the loss step names the fused loss op (ISD) and the top-k search (MSF).
    assert "SoftBankCrossEntropyFunction" in (tmp_path / "bench_train_step_profile_tiny_isd.txt").read_text()
    assert "topk" in (tmp_path / "bench_train_step_profile_tiny_msf__method.query_precision-bank.txt").read_text()
