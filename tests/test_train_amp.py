"""Mixed precision in the trainer: the forward runs under autocast in the configured dtype, fp16 scales the loss with a
GradScaler whose state is checkpointed, and both train with finite losses."""

from __future__ import annotations

import pytest
import torch

from fastssl.train.checkpoint import latest_checkpoint, load_checkpoint
from fastssl.train.config import load_config
from fastssl.train.trainer import Trainer


@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_runs_the_forward_under_autocast(tmp_path, amp, dtype):
    trainer = Trainer(load_config("tiny_isd", [f"run.out_dir={tmp_path}", "run.max_steps=3", f"run.amp={amp}"]))
    seen = []
    real_loss = trainer.method.loss

    def spy(views, labels, step):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real_loss(views, labels, step)

    trainer.method.loss = spy
    result = trainer.fit()
    assert seen == [(True, dtype)] * 3
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    scaler = load_checkpoint(latest_checkpoint(tmp_path / "tiny_isd" / "checkpoints"))["scaler"]
    assert bool(scaler) == (amp == "fp16")  # fp16 checkpoints the loss scale, bf16 needs none
    if amp == "fp16":
        assert scaler["scale"] > 0


def test_no_amp_runs_in_fp32(tmp_path):
    trainer = Trainer(load_config("tiny_isd", [f"run.out_dir={tmp_path}", "run.max_steps=1"]))
    seen = []
    real_loss = trainer.method.loss

    def spy(views, labels, step):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real_loss(views, labels, step)

    trainer.method.loss = spy
    trainer.fit()
    assert seen == [False]
