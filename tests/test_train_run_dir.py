"""A run's directory: problems only the built data or model can reveal fail as config errors before anything is
written; a fresh run refuses an earlier run's directory unless told to overwrite it; a resume names a bad checkpoint."""

from __future__ import annotations

import pytest

from fastssl.cli import main
from fastssl.train.checkpoint import list_checkpoints
from fastssl.train.config import ConfigError, load_config
from fastssl.train.trainer import Trainer


def trainer(tmp_path, *overrides, name="tiny_isd"):
    return Trainer(load_config(name, [f"run.out_dir={tmp_path}", "run.max_steps=2", *overrides]))


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model.arch=resnet_nope"], r"model.arch: torchvision has no 'resnet_nope'"),
        (["data.batch_size=5000", "method.bank_size=8192"], r"batch"),
    ],
)
def test_build_errors_are_config_errors_and_write_nothing(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        trainer(tmp_path, *overrides)
    assert not (tmp_path / "tiny_isd").exists()


def test_fresh_run_refuses_an_earlier_runs_directory(tmp_path, capsys):
    first = trainer(tmp_path, "run.checkpoint_every=1").fit()
    directory = tmp_path / "tiny_isd"
    before = sorted(p.name for p in (directory / "checkpoints").iterdir())
    csv_before = (directory / "scalars.csv").read_text()
    with pytest.raises(ConfigError, match=r"holds an earlier run .*--resume auto.*run.overwrite=true"):
        trainer(tmp_path, "run.max_steps=1")
    assert sorted(p.name for p in (directory / "checkpoints").iterdir()) == before  # untouched
    assert (directory / "scalars.csv").read_text() == csv_before
    # overwrite: the earlier run's outputs go, the new run's checkpoints stay (they were pruned by the old ones')
    second = trainer(tmp_path, "run.max_steps=1", "run.overwrite=true").fit()
    assert [p.name for p in list_checkpoints(directory / "checkpoints")] == ["step_000000001.pt"]
    steps = {line.split(",")[0] for line in (directory / "scalars.csv").read_text().splitlines()[1:]}
    assert steps == {"1"}
    assert first["steps"] == 2 and second["steps"] == 1
    # the CLI reports the refusal as a config error
    assert main(["train", "--config", "tiny_isd", f"run.out_dir={tmp_path}", "run.max_steps=1"]) == 2
    assert "holds an earlier run" in capsys.readouterr().err


def test_resume_auto_without_a_checkpoint_starts_clean(tmp_path, capsys):
    directory = tmp_path / "tiny_isd"
    directory.mkdir()
    (directory / "scalars.csv").write_text("step,name,value\n7,train/loss,1.0\n")  # a run that never checkpointed
    result = trainer(tmp_path, "run.resume=auto").fit()
    assert "no checkpoint" in capsys.readouterr().out
    assert result["steps"] == 2
    assert "7,train/loss" not in (directory / "scalars.csv").read_text()


def test_resume_names_a_file_that_is_not_a_matching_checkpoint(tmp_path):
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("hello")
    with pytest.raises(ConfigError, match=r"run.resume: .*notes.pt' is not a fastssl checkpoint"):
        trainer(tmp_path / "a", f"run.resume={not_a_checkpoint}").fit()
    trainer(tmp_path / "b", "run.checkpoint_every=1").fit()
    mismatch = r"does not fit this config \(was the model or method changed\?\): .*size mismatch"
    with pytest.raises(ConfigError, match=mismatch):
        trainer(tmp_path / "b", "run.resume=auto", "model.projector=[48,32]").fit()


def test_synthetic_and_image_folder_runs_get_a_knn_monitor(tmp_path):
    """The kNN monitor of ImageFolder data (data.eval_path) and of the synthetic dataset builds its eval transform
    from the views' (height, width) size and evaluates the backbone before and after training."""
    from fastssl.data import make_synthetic_image_folder

    images = make_synthetic_image_folder(tmp_path / "images", seed=0)
    common = ["run.knn_monitor=true", "data.views=[digits_crop,digits_crop]"]
    synthetic = trainer(tmp_path / "s", "data.dataset=synthetic", f"data.path={images}", *common).fit()
    folder = trainer(
        tmp_path / "f", "data.dataset=imagefolder", f"data.path={images}", f"data.eval_path={images}", *common
    ).fit()
    for result in (synthetic, folder):
        assert [entry["tag"] for entry in result["knn_history"]] == ["random init", "trained"]
        assert all(0.0 <= entry["student"] <= 1.0 for entry in result["knn_history"])


def test_unbalanced_protocol_trains_on_the_subset_and_monitors_its_classes_balanced():
    """ISD Table 4 on the digits: 2 large classes with all images, 3 small ones capped at 5, the other 5 classes
    dropped; the kNN monitor uses every image of exactly those 5 classes, in both splits."""
    import numpy as np

    from fastssl.data import shifted_digits
    from fastssl.train.datasets import monitor_classes, monitor_splits, training_source

    config = load_config("tiny_isd", ["data.unbalanced_large=2", "data.unbalanced_small=3", "data.unbalanced_cap=5"])
    source = training_source(config.data, seed=0)
    counts = dict(zip(*np.unique(source.labels, return_counts=True), strict=True))
    full = dict(zip(*np.unique(shifted_digits("train").labels, return_counts=True), strict=True))
    assert len(counts) == 5 and sorted(counts.values())[:3] == [5, 5, 5]
    assert sum(counts[c] == full[c] for c in counts) == 2  # the two large classes keep all their images
    classes = monitor_classes(config.data, source)
    assert classes == sorted(counts)
    train, test = monitor_splits(config.data, seed=0, mean=(0.5,) * 3, std=(0.5,) * 3, image_size=16, classes=classes)
    assert len(train) == sum(full[c] for c in classes)  # balanced: every image of the chosen classes
    assert {int(test[i][1]) for i in range(len(test))} == set(classes)
    with pytest.raises(ConfigError, match="data.unbalanced_small: needs data.unbalanced_large"):
        load_config("tiny_isd", ["data.unbalanced_small=3"])


def test_a_programming_error_in_the_build_is_not_reported_as_a_config_error(tmp_path, monkeypatch):
    """Only the model's own setting checks (messages naming a model./method. key) become config errors."""
    import fastssl.train.trainer as trainer_module

    def broken(config):
        x, y = (1, 2, 3)  # noqa: F841 - a bug, not a bad setting

    monkeypatch.setattr(trainer_module, "build_method", broken)
    with pytest.raises(ValueError, match="too many values to unpack") as info:
        trainer(tmp_path)
    assert not isinstance(info.value, ConfigError)


def test_resuming_an_older_checkpoint_refuses_newer_ones_unless_overwrite(tmp_path):
    """Going back to step 2 of a run that reached step 6 would leave steps 4 and 6 to outlive the new run's own
    checkpoints under keep_last: refused, or with run.overwrite the newer ones are deleted and the run goes on."""
    trainer(tmp_path, "run.max_steps=6", "run.checkpoint_every=2", "run.keep_last=9").fit()
    directory = tmp_path / "tiny_isd" / "checkpoints"
    older = directory / "step_000000002.pt"
    with pytest.raises(ConfigError, match=r"holds newer checkpoints \(step_000000004.pt, step_000000006.pt\)"):
        trainer(tmp_path, "run.max_steps=5", f"run.resume={older}").fit()
    assert [p.name for p in list_checkpoints(directory)] == [f"step_00000000{s}.pt" for s in (2, 4, 6)]
    result = trainer(tmp_path, "run.max_steps=5", "run.keep_last=1", f"run.resume={older}", "run.overwrite=true").fit()
    assert result["steps"] == 5
    assert [p.name for p in list_checkpoints(directory)] == ["step_000000005.pt"]
