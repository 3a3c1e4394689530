"""The README's main job: `fastssl train` with no arguments beats its random-init kNN baseline on the offline digits."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_embedded_default_beats_random_init(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Exactly the default recipe; only the output folder moves out of the working directory.
    cmd = [sys.executable, "-m", "fastssl.cli", "train", f"run.out_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "digits_demo" / "metrics.json").read_text())
    history = metrics["knn_history"]
    assert history[0]["tag"] == "random init" and history[-1]["tag"] == "trained"
    before, after = history[0]["student"], history[-1]["student"]
    assert after >= before + 0.15, f"kNN top-1 {before:.3f} -> {after:.3f}"
    assert "random init" in proc.stdout and "trained" in proc.stdout  # the side-by-side table is printed
    assert (tmp_path / "digits_demo" / "curves.png").is_file()
    assert (tmp_path / "digits_demo" / "scalars.csv").is_file()
