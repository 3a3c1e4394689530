"""benchmarks/bench_data.py --smoke runs every available provider and writes consistent results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fastssl.data import dali_import_error

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_data.py"


def test_bench_data_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out-dir", str(tmp_path), "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((tmp_path / "bench_data.json").read_text())
    rows = {r["provider"]: r for r in payload["rows"]}
    expected = {"torchvision"} | ({"dali-cpu"} if dali_import_error() is None else set())
    assert set(rows) == expected
    for row in rows.values():
        assert row["images"] == 16  # one timed epoch over the 16-image folder, batch 8, nothing dropped or repeated
        assert row["views"] == "[(3, 224, 224), (3, 224, 224)]"
        assert abs(row["images_per_s"] - row["images"] / row["seconds"]) < 1e-6 * row["images_per_s"]
        assert abs(row["speedup_vs_torchvision"] - row["images_per_s"] / rows["torchvision"]["images_per_s"]) < 1e-9
    assert rows["torchvision"]["speedup_vs_torchvision"] == 1.0
    assert (tmp_path / "bench_data.md").read_text().count("|") > 10
