"""What a run logs: the CSV and the TensorBoard scalars agree, and a crash-resume leaves one value per step in both."""

from __future__ import annotations

import csv

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fastssl.train.checkpoint import list_checkpoints
from fastssl.train.config import load_config
from fastssl.train.trainer import Trainer

COMMON = ["run.deterministic=true", "run.max_steps=6", "run.log_every=1", "run.checkpoint_every=2", "run.keep_last=9"]
COMMON.append("run.tensorboard=true")


def run(out_dir, *overrides):
    return Trainer(load_config("tiny_msf", [f"run.out_dir={out_dir}", *COMMON, *overrides])).fit()


def tensorboard_losses(run_dir):
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")]


def csv_losses(run_dir):
    with (run_dir / "scalars.csv").open() as f:
        return [(int(r["step"]), float(r["value"])) for r in csv.DictReader(f) if r["name"] == "train/loss"]


def test_tensorboard_and_csv_agree_after_a_crash_and_resume(tmp_path):
    run(tmp_path / "full")
    full = tmp_path / "full" / "tiny_msf"
    assert [s for s, _ in tensorboard_losses(full)] == [1, 2, 3, 4, 5, 6]
    for (s_tb, v_tb), (s_csv, v_csv) in zip(tensorboard_losses(full), csv_losses(full), strict=True):
        assert s_tb == s_csv and abs(v_tb - v_csv) <= 1e-6 * max(1.0, abs(v_csv))

    run(tmp_path / "crash")
    crashed = tmp_path / "crash" / "tiny_msf"
    for path in list_checkpoints(crashed / "checkpoints")[1:]:  # only the step-2 checkpoint reached the disk
        path.unlink()
    run(tmp_path / "crash", "run.resume=auto")
    # the interrupted run's steps 3-6 were purged from both logs and logged again by the resumed run
    assert [s for s, _ in tensorboard_losses(crashed)] == [1, 2, 3, 4, 5, 6]
    assert csv_losses(crashed) == csv_losses(full)
    assert [v for _, v in tensorboard_losses(crashed)] == [v for _, v in tensorboard_losses(full)]
