"""benchmarks/bench_methods_digits.py --smoke: a row per method, finite losses, internally consistent kNN columns."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_methods_digits.py"
METHODS = ["mocov2", "isd", "msf", "ressl", "sdssl"]


def test_smoke_run_writes_a_consistent_row_per_method(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((tmp_path / "bench_methods_digits.json").read_text())
    rows = payload["rows"]
    assert [r["method"] for r in rows] == METHODS
    for row in rows:
        assert row["steps"] == 3 and row["stop_reason"] == "finished"
        assert row["losses_finite"] and math.isfinite(row["first_loss"]) and math.isfinite(row["last_loss"])
        before, after = row["knn_random_init"], row["knn_trained"]
        assert 0.0 <= before <= 1.0 and 0.0 <= after <= 1.0
        assert math.isclose(row["gain"], after - before, abs_tol=1e-12)
        assert row["beats_random_init"] == (row["gain"] > 0)
        # the curve starts at the random init (step 0) and ends at the trained backbone (step 3)
        curve = [point.split(":") for point in row["knn_curve"].split()]
        assert curve[0] == ["0", f"{before:.3f}"] and curve[-1] == ["3", f"{after:.3f}"]
        assert row["total_s"] >= row["train_s"] > 0
    assert {r["method"]: r["arch"] for r in rows}["sdssl"] == "vit_tiny_digits"
    assert {r["method"]: r["recipe"] for r in rows}["mocov2"] == "digits_demo"  # the embedded default itself
    table = (tmp_path / "bench_methods_digits.md").read_text()
    assert all(f"| {m} | digits_" in table for m in METHODS)


def test_unknown_method_is_rejected_before_training(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--methods", "mocov2,simclr", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert "simclr" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written
