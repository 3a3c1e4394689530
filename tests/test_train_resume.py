"""Checkpoints: exact resume, crash-safe writes, keep-last pruning, and the non-finite-loss stop."""

from __future__ import annotations

import pytest
import torch

import fastssl.train.checkpoint as checkpoint_module
from fastssl.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from fastssl.train.config import load_config
from fastssl.train.trainer import NonFiniteLossError, Trainer


def run(tmp_path, name, *overrides):
    config = load_config(name, [f"run.out_dir={tmp_path}", "run.deterministic=true", "run.max_steps=6", *overrides])
    return Trainer(config).fit()


@pytest.mark.parametrize("name", ["tiny_msf", "tiny_ressl"])
def test_resumed_run_reproduces_the_uninterrupted_losses_exactly(tmp_path, name):
    """MSF exercises the bank with labels and the EMA teacher, ReSSL the loss module's warm-up step counter."""
    full = run(tmp_path / "full", name)
    first = run(tmp_path / "split", name, "run.stop_at_step=3")
    assert first["steps"] == 3 and "stop_at_step" in first["stop_reason"]
    second = run(tmp_path / "split", name, "run.resume=auto")
    assert second["steps"] == 6
    assert first["losses"] + second["losses"] == full["losses"]  # bitwise, not approximately


def test_resume_restores_every_component(tmp_path):
    run(tmp_path, "tiny_msf", "run.stop_at_step=2")
    path = latest_checkpoint(tmp_path / "tiny_msf" / "checkpoints")
    state = load_checkpoint(path)
    assert state["global_step"] == 2 and state["step_in_epoch"] == 2
    assert {"criterion.bank.queue", "criterion.bank.ptr", "criterion.bank.label_queue"} <= set(state["method"])
    assert any(k.startswith("teacher_backbone.") for k in state["method"])
    assert {"optimizer", "scaler", "rng", "backbone", "config"} <= set(state)


def test_resume_from_a_missing_path_is_a_config_error(tmp_path):
    from fastssl.train.config import ConfigError

    with pytest.raises(ConfigError, match="does not exist"):
        run(tmp_path, "tiny_msf", f"run.resume={tmp_path / 'nope.pt'}")


def test_a_crash_mid_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    save_checkpoint({"step": 1, "payload": torch.arange(10)}, tmp_path, 1, keep_last=3)

    def dying_save(obj, f):
        f.write(b"\x80\x02partial")  # some bytes of a pickle, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2}, tmp_path, 2, keep_last=3)
    monkeypatch.undo()
    assert list_checkpoints(tmp_path) == [tmp_path / "step_000000001.pt"]
    assert [p.name for p in tmp_path.iterdir()] == ["step_000000001.pt"]  # no temp file left behind
    assert torch.equal(load_checkpoint(latest_checkpoint(tmp_path))["payload"], torch.arange(10))


def test_keep_last_prunes_old_checkpoints(tmp_path):
    for step in range(1, 6):
        save_checkpoint({"step": step}, tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000004.pt", "step_000000005.pt"]


def test_non_finite_loss_stops_with_the_step_named_and_keeps_the_last_good_checkpoint(tmp_path):
    config = load_config("tiny_isd", [f"run.out_dir={tmp_path}", "run.checkpoint_every=1"])
    trainer = Trainer(config)
    real_loss = trainer.method.loss

    def poisoned(views, labels, step):
        loss, metrics = real_loss(views, labels, step)
        return (loss * float("nan") if step == 2 else loss), metrics

    trainer.method.loss = poisoned
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 2") as info:
        trainer.fit()
    checkpoints = list_checkpoints(tmp_path / "tiny_isd" / "checkpoints")
    assert [p.name for p in checkpoints][-1] == "step_000000002.pt"  # steps 1 and 2 completed; step 3 (index 2) died
    assert str(checkpoints[-1]) in str(info.value)
    assert torch.isfinite(load_checkpoint(checkpoints[-1])["method"]["backbone.body.0.weight"]).all()
