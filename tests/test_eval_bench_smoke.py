"""benchmarks/bench_knn.py --smoke: every available backend runs and all give identical predictions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fastssl.eval.neighbors import _faiss

REPO = Path(__file__).resolve().parents[1]


def test_bench_knn_smoke(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")  # lets the Triton row run in the interpreter when the kernel exists
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_knn.py"), "--smoke", "--out-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_knn_smoke.json").read_text())
    rows = result["rows"]
    backends = [r["backend"] for r in rows]
    expected = {"torch"} | ({"faiss-cpu"} if _faiss() is not None else set())
    if (REPO / "kernels" / "bank_topk.py").exists():
        expected.add("triton")
    assert set(backends) == expected and backends[0] == "torch"
    assert all(r["agree"] for r in rows)  # identical predictions on every backend
    assert all(r["ms"] > 0 and (r["n_test"], r["n_train"], r["dim"], r["k"]) == (64, 1024, 32, 20) for r in rows)
    assert rows[0]["speedup_vs_torch"] == 1.0
    assert result["environment"]["triton_interpret"] is True
    assert (tmp_path / "bench_knn_smoke.md").exists()
