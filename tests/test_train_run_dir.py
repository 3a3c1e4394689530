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
