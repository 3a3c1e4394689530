"""Training configs: every shipped recipe loads; unknown keys, bad values and missing paths fail with the key named."""

from __future__ import annotations

import pytest

from fastssl.cli import main
from fastssl.train.config import ConfigError, load_config, shipped_configs


def test_every_shipped_config_loads(tmp_path):
    names = shipped_configs()
    assert {
        "digits_demo",
        "isd_r18_imagenet",
        "isd_r50_plus_imagenet",
        "msf_r50_ws_128k",
        "msf_r50_ws_1m",
        "ressl_r50_imagenet",
        "ressl_r50_multicrop",
        "sdssl_vit_s16_mocov3",
        "sdssl_vit_b16_mocov3",
        "sdssl_vit_s16_byol",
        "mocov2_r50_imagenet",
        "byol_asym_r50_imagenet",
        "nnclr_r50_imagenet",
        "isd_r18_cifar",
        "msf_r18_cifar",
        "ressl_r18_cifar",
        "mocov2_r18_cifar",
    } <= set(names)
    for name in names:
        config = load_config(name, [f"data.path={tmp_path}"])  # ignored by the digits configs
        if not name.endswith("_base"):
            assert config.run.name == name


def test_recipes_carry_the_papers_hyperparameters(tmp_path):
    isd = load_config("isd_r50_plus_imagenet", [f"data.path={tmp_path}"])
    assert (isd.method.tau_student, isd.method.tau_teacher, isd.method.bank_size, isd.method.momentum) == (
        0.1,
        0.01,
        128000,
        0.99,
    )
    assert isd.data.views == "weak_strong" and isd.model.projector == [4096, 512]
    msf = load_config("msf_r50_ws_1m_k10", [f"data.path={tmp_path}"])
    assert (msf.method.bank_size, msf.method.k, msf.optim.lr) == (1024000, 10, 0.05)
    sdssl = load_config("sdssl_vit_s16_byol", [f"data.path={tmp_path}"])
    assert (sdssl.method.sdssl_base, sdssl.optim.name, sdssl.optim.warmup_epochs, sdssl.run.epochs) == (
        "byol",
        "adamw",
        40,
        300,
    )
    for name in ("mocov2_r50_imagenet", "isd_r50_plus_imagenet", "msf_r50_ws_1m", "ressl_r50_imagenet"):  # shuffle BN
        assert load_config(name, [f"data.path={tmp_path}"]).model.shuffle_bn
    multicrop = load_config("ressl_r50_multicrop", [f"data.path={tmp_path}"])  # ReSSL journal Sec. 5.1 and 4
    assert (multicrop.data.batch_size, multicrop.model.sync_bn, multicrop.method.tau_teacher) == (1024, True, 0.03)
    r18 = load_config("isd_r18_imagenet", [f"data.path={tmp_path}"])
    assert r18.model.projector == [] and r18.optim.schedule == "step" and r18.method.tau_teacher == 0.02


def test_overrides_are_typed():
    config = load_config(
        "tiny_isd",
        [
            "optim.lr=0.3",
            "model.projector=[16,8]",
            "run.resume=none",
            "data.views=[digits_weak,digits_strong]",
            "run.deterministic=true",
        ],
    )
    assert config.optim.lr == 0.3 and config.model.projector == [16, 8] and config.run.resume is None
    assert config.data.views == ["digits_weak", "digits_strong"] and config.run.deterministic is True


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["optim.lrr=0.1"], r"unknown key 'optim.lrr'"),
        (["training.lr=0.1"], r"unknown key 'training.lr'"),
        (["optim.lr=fast"], r"optim.lr: expected a number"),
        (["run.epochs=1.5"], r"run.epochs: expected an integer"),
        (["optim.lr=-1"], r"optim.lr: must be positive"),
        (["method.name=simclr"], r"method.name: must be one of"),
        (["method.momentum=1.5"], r"method.momentum"),
        (["data.views=nonsense"], r"data.views: unknown view preset 'nonsense'"),
        (["method.k=9999"], r"method.k"),
        (["run.deterministic=maybe"], r"run.deterministic: expected true or false"),
        (["lr"], r"SECTION.KEY=VALUE"),
        # values that would otherwise fail only once training has started
        (["run.log_every=0"], r"run.log_every: must be positive"),
        (["run.checkpoint_every=-1"], r"run.checkpoint_every: must be ≥ 0"),
        (["run.knn_every=-5"], r"run.knn_every: must be ≥ 0"),
        (["optim.weight_decay=-1e-4"], r"optim.weight_decay: must be ≥ 0"),
        (["optim.warmup_steps=-1"], r"optim.warmup_steps: must be ≥ 0"),
        (["method.warmup_epochs=nan"], r"method.warmup_epochs: must be ≥ 0"),
        (["optim.gamma=0"], r"optim.gamma: must be positive"),
        (["optim.momentum=1"], r"optim.momentum: must be in \[0, 1\)"),
        (["optim.milestones=[0.8,0.6]"], r"optim.milestones"),
        (["optim.milestones=[1.5]"], r"optim.milestones"),
        (["optim.betas=[0.9]"], r"optim.betas"),
        (["model.projector=[0,32]"], r"model.projector: layer widths must be positive"),
        (["data.num_workers=-1"], r"data.num_workers: must be ≥ 0"),
        (["data.views=digits_weak"], r"data.views: isd compares at least two views"),
        (["method.bank_size=16"], r"method.bank_size: 16 rows cannot take the 32 keys enqueued per step"),
        (["model.layer_projector=[16,32]"], r"model.layer_projector: only SDSSL"),
        (["model.vit_mocov3=true"], r"model.vit_mocov3: MoCo v3's ViT stem needs a ViT"),
        (["optim.lr=inf"], r"optim.lr: must be positive and finite"),
        (["method.tau=inf"], r"method.tau: must be positive and finite"),
        (["run.resume=/nonexistent/step_000000001.pt"], r"run.resume: checkpoint '/nonexistent/step_000000001.pt'"),
    ],
)
def test_bad_overrides_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny_isd", overrides)


def test_missing_data_path_fails_before_training(tmp_path):
    with pytest.raises(ConfigError, match="data.path"):
        load_config("isd_r50_plus_imagenet")
    with pytest.raises(ConfigError, match="is not a directory"):
        load_config("isd_r50_plus_imagenet", [f"data.path={tmp_path / 'missing'}"])


def test_unknown_config_and_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config 'nope'"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'optim.learning_rate'"):
        load_config(str(bad))
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: {lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML"):
        load_config(str(broken))


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    assert main(["train", "--config", "tiny_isd", "optim.lrr=1"]) == 2
    assert "unknown key 'optim.lrr'" in capsys.readouterr().err


def test_batch_size_is_global_and_checked_against_the_launch(monkeypatch):
    """data.batch_size is the global batch: under torchrun (WORLD_SIZE) it must split evenly over the ranks, and a
    sharded bank's per-rank shard must hold one rank's share of it."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="data.batch_size: the global batch 32 does not split evenly over 3 ranks"):
        load_config("tiny_mocov2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert load_config("tiny_mocov2").data.batch_size == 32
    with pytest.raises(ConfigError, match="each rank's shard of 4 rows cannot take the 8 keys"):
        load_config("tiny_mocov2", ["method.shard_bank=true", "method.bank_size=16"])
    assert load_config("tiny_mocov2", ["method.shard_bank=true", "method.bank_size=32"]).method.bank_size == 32
    monkeypatch.delenv("WORLD_SIZE")
    for bankless in ("tiny_byol", "tiny_sdssl"):  # no bank, so no bank size to fit the batch into
        assert load_config(bankless, ["data.batch_size=8192", "method.bank_size=256"]).data.batch_size == 8192


def test_sdssl_recipes_follow_the_paper_heads_and_vit(tmp_path):
    """Jang et al. 2023, Sec. 4.1: 3-layer projectors (hidden 4096 last, 2048 intermediate), 2-layer predictors
    (hidden 4096), 256-d outputs, BN on the output layers except BYOL's, MoCo v3's ViT stem."""
    mocov3 = load_config("sdssl_vit_s16_mocov3", [f"data.path={tmp_path}"])
    model = mocov3.model
    assert (model.projector, model.layer_projector, model.predictor) == (
        [4096, 4096, 256],
        [2048, 2048, 256],
        [4096, 256],
    )
    assert model.projector_out_bn and model.vit_mocov3
    byol = load_config("sdssl_vit_s16_byol", [f"data.path={tmp_path}"])
    assert not byol.model.projector_out_bn and byol.model.layer_projector == [2048, 2048, 256]
