"""Sharded-bank training under a real 2-process torchrun (gloo): each rank keeps only its own keys in a half-size
shard, weights stay identical, and a resumed run gives every rank back its own shard (not rank 0's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ports import free_port

from fastssl.train.config import ConfigError, load_config

OVERRIDES = ["run.max_steps=3", "run.deterministic=true", "method.shard_bank=true", "run.knn_every=0"]


def worker(out_dir: str) -> None:
    """Runs under torchrun: train 3 steps, then resume from the checkpoint in a second Trainer; save both states."""
    from fastssl.train.distributed import teardown_distributed
    from fastssl.train.trainer import Trainer

    rank = int(os.environ["RANK"])
    trainer = Trainer(load_config("tiny_mocov2", [f"run.out_dir={out_dir}", *OVERRIDES]))
    trainer.fit()
    trained = {k: v.clone() for k, v in trainer.method.state_dict().items()}
    resumed = Trainer(load_config("tiny_mocov2", [f"run.out_dir={out_dir}", *OVERRIDES, "run.resume=auto"]))
    resumed.maybe_resume()
    torch.save({"trained": trained, "resumed": resumed.method.state_dict()}, Path(out_dir) / f"rank{rank}.pt")
    teardown_distributed()


def test_two_rank_sharded_bank_training_and_resume(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, __file__, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    trained = [r["trained"] for r in ranks]
    queue, ptr = "criterion.bank.queue", "criterion.bank.ptr"
    assert trained[0][queue].shape == (128, 32)  # bank_size 256 over 2 ranks
    # each shard took only its own rank's 3 batches of 16 (the global batch 32 split over 2 ranks)
    assert int(trained[0][ptr]) == int(trained[1][ptr]) == 3 * 16
    assert not torch.equal(trained[0][queue][:48], trained[1][queue][:48])  # the ranks' keys differ
    assert not torch.equal(trained[0][queue][48:], trained[1][queue][48:])  # and so do their random initial rows
    for name, value in trained[0].items():
        if (
            name.startswith(("backbone.", "projector.", "teacher_"))
            and "running" not in name
            and "num_batches" not in name
        ):
            assert torch.equal(value, trained[1][name]), name  # DDP keeps the weights identical
    for rank in range(2):
        assert torch.equal(ranks[rank]["resumed"][queue], trained[rank][queue]), f"rank {rank} resumed another shard"


def test_shard_bank_is_refused_for_top_k_methods():
    with pytest.raises(ConfigError, match="method.shard_bank"):
        load_config("tiny_msf", ["method.shard_bank=true"])


if __name__ == "__main__":
    worker(sys.argv[1])
