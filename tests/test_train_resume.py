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


def test_resume_after_a_crash_logs_every_scalar_once(tmp_path):
    """A run killed after its step-2 checkpoint had logged steps 3 and 4; the resumed run logs them again, so the
    stale rows are dropped: the CSV equals the uninterrupted run's, one row per (step, name)."""
    import csv

    def scalars(root):
        with (root / "tiny_msf" / "scalars.csv").open() as f:
            return [
                (r["step"], r["name"], r["value"]) for r in csv.DictReader(f) if not r["name"].endswith("img_per_s")
            ]

    common = ("run.log_every=1", "run.checkpoint_every=2", "run.keep_last=10", "run.knn_monitor=false")
    run(tmp_path / "full", "tiny_msf", *common)
    run(tmp_path / "crash", "tiny_msf", *common)
    directory = tmp_path / "crash" / "tiny_msf" / "checkpoints"
    for path in list_checkpoints(directory)[1:]:  # the "crash": only the step-2 checkpoint reached the disk
        path.unlink()
    run(tmp_path / "crash", "tiny_msf", *common, "run.resume=auto")
    resumed = scalars(tmp_path / "crash")
    assert len(resumed) == len(set((step, name) for step, name, _ in resumed))
    assert resumed == scalars(tmp_path / "full")


def test_each_state_is_checkpointed_once(tmp_path, monkeypatch):
    """An epoch end that is also a checkpoint_every step and the end of training writes one checkpoint, not three;
    the final kNN evaluation is in the last checkpoint; resuming a finished run writes and evaluates nothing."""
    import fastssl.train.trainer as trainer_module

    writes = []
    real_save = trainer_module.save_checkpoint

    def counting_save(state, directory, step, **kwargs):
        writes.append(step)
        return real_save(state, directory, step, **kwargs)

    monkeypatch.setattr(trainer_module, "save_checkpoint", counting_save)
    overrides = [f"run.out_dir={tmp_path}", "run.max_steps=4", "run.checkpoint_every=2", "run.keep_last=10"]
    overrides.append("run.knn_monitor=true")
    first = Trainer(load_config("tiny_isd", overrides)).fit()
    assert writes == [2, 4]
    assert [entry["tag"] for entry in first["knn_history"]] == ["random init", "trained"]
    last = load_checkpoint(latest_checkpoint(tmp_path / "tiny_isd" / "checkpoints"))
    assert last["knn_history"] == first["knn_history"]
    again = Trainer(load_config("tiny_isd", [*overrides, "run.resume=auto"])).fit()
    assert writes == [2, 4] and again["knn_history"] == first["knn_history"]
    # an epoch end (tiny_isd: 42 steps per epoch) that is also a checkpoint_every step is written once
    writes.clear()
    epoch_end = [f"run.out_dir={tmp_path / 'epochs'}", "run.epochs=2", "run.max_steps=50", "run.checkpoint_every=42"]
    Trainer(load_config("tiny_isd", epoch_end)).fit()
    assert writes == [42, 50]


def test_evaluation_after_the_last_checkpoint_is_checkpointed(tmp_path):
    """A finished run resumed with the kNN monitor switched on evaluates once and checkpoints that evaluation."""
    common = [f"run.out_dir={tmp_path}", "run.max_steps=2", "run.checkpoint_every=1", "run.keep_last=5"]
    Trainer(load_config("tiny_isd", common)).fit()
    resumed = Trainer(load_config("tiny_isd", [*common, "run.resume=auto", "run.knn_monitor=true"])).fit()
    assert [entry["tag"] for entry in resumed["knn_history"]] == ["trained"]
    last = load_checkpoint(latest_checkpoint(tmp_path / "tiny_isd" / "checkpoints"))
    assert last["knn_history"] == resumed["knn_history"]


def test_a_checkpoint_holds_the_evaluation_logged_at_its_step(tmp_path):
    """kNN evaluations run before the checkpoint of the same step, so a run resumed from it neither repeats nor loses
    one: its kNN history and kNN scalars equal the uninterrupted run's."""
    import csv

    common = ["run.max_steps=6", "run.checkpoint_every=2", "run.knn_every=2", "run.keep_last=9", "run.knn_monitor=true"]
    full = run(tmp_path / "full", "tiny_msf", *common)
    run(tmp_path / "crash", "tiny_msf", *common)
    directory = tmp_path / "crash" / "tiny_msf" / "checkpoints"
    for path in list_checkpoints(directory)[2:]:  # the "crash": only the step-2 and step-4 checkpoints remain
        path.unlink()
    assert [e["step"] for e in load_checkpoint(directory / "step_000000004.pt")["knn_history"]] == [0, 2, 4]
    resumed = run(tmp_path / "crash", "tiny_msf", *common, "run.resume=auto")
    assert resumed["knn_history"] == full["knn_history"]

    def knn_rows(root):
        with (root / "tiny_msf" / "scalars.csv").open() as f:
            return [(r["step"], r["name"], r["value"]) for r in csv.DictReader(f) if r["name"].startswith("knn/")]

    assert knn_rows(tmp_path / "crash") == knn_rows(tmp_path / "full")


def test_a_killed_write_leaves_no_temp_file_for_long(tmp_path):
    """A SIGKILL during a write leaves its temp file (no handler runs); the next write removes it."""
    (tmp_path / ".step_000000003.pt.x1y2.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("kept")
    save_checkpoint({"step": 4}, tmp_path, 4, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "step_000000004.pt"]


def test_compiled_backbone_keeps_the_checkpoint_layout(tmp_path):
    """model.compile compiles in place: parameter names (and so checkpoints) match the uncompiled model's."""
    plain = Trainer(load_config("tiny_isd", [f"run.out_dir={tmp_path / 'a'}"]))
    compiled = Trainer(load_config("tiny_isd", [f"run.out_dir={tmp_path / 'b'}", "model.compile=true"]))
    assert list(compiled.state_dict()["method"]) == list(plain.state_dict()["method"])
    assert list(compiled.state_dict()["backbone"]) == list(plain.state_dict()["backbone"])


def test_diverged_teacher_keys_stop_with_the_step_named(tmp_path):
    """When the teacher diverges too, its NaN keys reach the bank. The trainer's banks check their values a step late
    (no device read inside a step), with the loss: the run still stops naming the step whose keys were bad, and the
    last checkpoint holds the bank as it was before that step."""
    config = load_config("tiny_isd", [f"run.out_dir={tmp_path}", "run.checkpoint_every=1"])
    trainer = Trainer(config)
    assert trainer.banks and all(bank.value_checks == "deferred" for bank in trainer.banks)
    real_teacher = trainer.method.teacher
    bank_before = {}

    def poisoned(x):
        out = real_teacher(x)
        if trainer.global_step == 2:
            bank_before.update({k: v.clone() for k, v in trainer.method.criterion.bank.state_dict().items()})
            return out * float("nan")
        return out

    trainer.method.teacher = poisoned
    with pytest.raises(NonFiniteLossError, match=r"non-finite teacher keys at step 2 .*step_000000002.pt"):
        trainer.fit()
    last = load_checkpoint(list_checkpoints(tmp_path / "tiny_isd" / "checkpoints")[-1])["method"]
    for name, value in bank_before.items():
        assert torch.equal(last[f"criterion.bank.{name}"], value), name


def test_dali_resume_continues_with_the_same_images(tmp_path):
    """The DALI loader (CPU pipeline here) resumes mid-epoch at the same batch with the same images, in order; its
    augmentation draws restart from a reseeded stream, so only the batches' images, not the losses, match after the
    resume (trainer module docstring)."""

    def labels_seen(out_dir, *overrides):
        config = load_config(
            "tiny_msf",
            [f"run.out_dir={out_dir}", "run.deterministic=true", "run.max_steps=6", "data.backend=dali", *overrides],
        )
        trainer = Trainer(config)
        seen, real_loss = [], trainer.method.loss

        def spy(views, labels, step):
            seen.append(labels.tolist())
            return real_loss(views, labels, step)

        trainer.method.loss = spy
        return seen, trainer.fit()

    full_labels, full = labels_seen(tmp_path / "full")
    first_labels, first = labels_seen(tmp_path / "split", "run.stop_at_step=3")
    second_labels, _ = labels_seen(tmp_path / "split", "run.resume=auto")
    assert first_labels + second_labels == full_labels
    assert first["losses"] == full["losses"][:3]  # bitwise up to the stop: the same pipeline, the same draws
