"""A real 2-process torchrun (gloo) training run: every rank ends with identical banks and weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from ports import free_port


def worker(out_dir: str) -> None:
    """Runs under torchrun: train, then save this rank's final state for the test to compare."""
    from fastssl.train.config import load_config
    from fastssl.train.distributed import teardown_distributed
    from fastssl.train.trainer import Trainer

    overrides = [f"run.out_dir={out_dir}", "run.max_steps=4", "run.deterministic=true", "model.shuffle_bn=true"]
    config = load_config("tiny_msf", overrides)  # the teacher also runs on the batch shuffled across the ranks
    trainer = Trainer(config)
    result = trainer.fit()
    rank = int(os.environ["RANK"])
    stopped = poisoned_run(out_dir, rank)
    budget = budget_run(out_dir, rank)
    torch.save(
        {"method": trainer.method.state_dict(), "losses": result["losses"], "stopped": stopped, "budget": budget},
        Path(out_dir) / f"rank{rank}.pt",
    )
    teardown_distributed()


def budget_run(out_dir: str, rank: int) -> tuple[int, str]:
    """A third run in which only rank 1 has a (tiny) time budget: clocks differ between ranks, so the budget is a vote
    carried by the step readbacks, and both ranks stop at the same step instead of rank 1 stopping alone."""
    from fastssl.train.config import load_config
    from fastssl.train.trainer import Trainer

    overrides = [f"run.out_dir={out_dir}/budget", "run.max_steps=6", "run.knn_monitor=false"]
    overrides += ["run.time_budget_s=0.000001"] if rank == 1 else []
    result = Trainer(load_config("tiny_mocov2", overrides)).fit()
    return result["steps"], result["stop_reason"]


def poisoned_run(out_dir: str, rank: int) -> str:
    """A second run in which only rank 1's loss turns NaN at step 2: the step's checks are all-reduced, so both ranks
    stop at that step (neither waits alone in the next collective); returns this rank's stop message."""
    from fastssl.train.config import load_config
    from fastssl.train.trainer import NonFiniteLossError, Trainer

    overrides = [f"run.out_dir={out_dir}/poisoned", "run.max_steps=4", "run.knn_monitor=false"]
    trainer = Trainer(load_config("tiny_mocov2", overrides))
    real_loss = trainer.method.loss

    def poisoned(views, labels, step):
        loss, metrics = real_loss(views, labels, step)
        return (loss * float("nan") if step == 2 and rank == 1 else loss), metrics

    trainer.method.loss = poisoned
    try:
        trainer.fit()
    except NonFiniteLossError as error:
        return str(error)
    return ""


def test_two_rank_torchrun_keeps_banks_and_weights_identical(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        __file__,
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    states = [r["method"] for r in ranks]
    bank = "criterion.bank.queue"
    assert torch.equal(states[0][bank], states[1][bank])
    assert torch.equal(states[0]["criterion.bank.label_queue"], states[1]["criterion.bank.label_queue"])
    # data.batch_size=32 is the global batch: 16 images per rank, both ranks' keys gathered into every bank
    assert int(states[0]["criterion.bank.ptr"]) == (4 * 32) % 256
    for name, value in states[0].items():
        if (
            name.startswith(("backbone.", "projector.", "predictor.", "teacher_"))
            and "running" not in name
            and "num_batches" not in name
        ):
            assert torch.equal(value, states[1][name]), name
    assert (tmp_path / "tiny_msf" / "checkpoints").is_dir()  # rank 0 wrote the checkpoints
    assert ranks[1]["stopped"].startswith("non-finite loss (nan) at step 2 ")
    assert ranks[0]["stopped"].startswith("non-finite loss on another rank at step 2 ")
    (steps0, reason0), (steps1, reason1) = ranks[0]["budget"], ranks[1]["budget"]
    assert steps0 == steps1 < 6 and "time budget" in reason0 and "time budget" in reason1


if __name__ == "__main__":
    worker(sys.argv[1])
