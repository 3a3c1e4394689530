"""A training checkpoint is what `fastssl eval` loads: its kNN equals the trainer's own monitor, number for number."""

from __future__ import annotations

import json

from fastssl.cli import main
from fastssl.train.checkpoint import latest_checkpoint
from fastssl.train.config import load_config
from fastssl.train.trainer import Trainer


def test_eval_cli_reproduces_the_trainers_final_knn(tmp_path):
    config = load_config("tiny_isd", [f"run.out_dir={tmp_path}", "run.knn_monitor=true"])
    result = Trainer(config).fit()
    trained = result["knn_history"][-1]
    assert trained["tag"] == "trained"
    checkpoint = latest_checkpoint(tmp_path / "tiny_isd" / "checkpoints")  # loads with weights_only=True
    out = tmp_path / "results" / "new" / "eval.json"  # missing folders are created
    argv = ["eval", "knn", "--checkpoint", str(checkpoint), "--data", "digits"]  # the arch is the one it records
    assert main([*argv, "--k", "20", "--quiet", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["arch"] == "digits_cnn_small"
    evaluated = json.loads(out.read_text())["results"][0]
    assert (evaluated["k"], evaluated["vote"]) == (20, "weighted")
    assert evaluated["top1"] == trained["student"]
