"""``fastssl eval knn|linear`` end to end on a generated ImageFolder and on the offline digits."""

from __future__ import annotations

import json

import pytest
import torch

from fastssl.cli import main
from fastssl.data import make_synthetic_image_folder
from fastssl.eval import build_backbone, eval_transform, extract_features, knn_accuracy, load_backbone


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    make_synthetic_image_folder(root / "train", num_classes=3, images_per_class=8, min_size=40, max_size=56, seed=0)
    make_synthetic_image_folder(root / "val", num_classes=3, images_per_class=4, min_size=40, max_size=56, seed=1)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    torch.save({"backbone": build_backbone("resnet18").state_dict(), "epoch": 3}, path)
    return path


def test_knn_cli_writes_json_matching_the_library_and_reuses_cache(image_folder, checkpoint, tmp_path, capsys):
    out = tmp_path / "knn.json"
    argv = ["eval", "knn", "--checkpoint", str(checkpoint), "--arch", "resnet18", "--data", str(image_folder)]
    argv += ["--image-size", "32", "--workers", "0", "--quiet", "--k", "1", "5", "--vote", "both"]
    argv += ["--backend", "torch", "--cache-dir", str(tmp_path / "cache"), "--output", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "top-1 %" in printed and str(out) in printed
    result = json.loads(out.read_text())
    assert result["task"] == "knn" and result["arch"] == "resnet18" and result["backend"] == "torch"
    assert (result["num_train"], result["num_test"], result["feature_dim"]) == (24, 12, 512)
    assert not result["features_from_cache"]
    assert [(r["k"], r["vote"]) for r in result["results"]] == [
        (1, "weighted"),
        (1, "majority"),
        (5, "weighted"),
        (5, "majority"),
    ]
    # Oracle: the same numbers from the library on independently extracted features.
    from torchvision.datasets import ImageFolder

    model = load_backbone(checkpoint, "resnet18")
    tf = eval_transform(32)
    train = extract_features(model, ImageFolder(str(image_folder / "train"), tf), progress=False)
    val = extract_features(model, ImageFolder(str(image_folder / "val"), tf), progress=False)
    for r in result["results"]:
        acc = knn_accuracy(
            train.features, train.labels, val.features, val.labels, k=r["k"], weighted=r["vote"] == "weighted"
        )
        assert (r["top1"], r["top5"]) == (acc.top1, acc.top5)
    # Second run: features come from the cache, results are identical.
    assert main(argv) == 0
    again = json.loads(out.read_text())
    assert again["features_from_cache"] and again["results"] == result["results"]


def test_linear_cli_and_clear_errors(image_folder, checkpoint, tmp_path, capsys):
    out = tmp_path / "lin.json"
    argv = ["eval", "linear", "--checkpoint", str(checkpoint), "--arch", "resnet18", "--data", str(image_folder)]
    argv += ["--image-size", "32", "--workers", "0", "--quiet", "--protocol", "lbfgs", "--weight-decays", "1e-3"]
    assert main([*argv, "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "linear" and result["protocol"] == "lbfgs" and result["weight_decay"] == 1e-3
    assert result["num_train"] == 24 and result["num_test"] == 12 and 0.0 <= result["top1"] <= result["top5"] <= 1.0
    # Label subset file (indices).
    (tmp_path / "sub.txt").write_text("\n".join(str(i) for i in range(0, 24, 2)))
    assert main([*argv, "--subset", str(tmp_path / "sub.txt"), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["num_train"] == 12
    capsys.readouterr()
    # Errors: one line on stderr, exit status 2, no result written.
    bad_out = tmp_path / "never.json"
    argv_missing = [*argv, "--output", str(bad_out)]
    argv_missing[argv_missing.index("--checkpoint") + 1] = str(tmp_path / "missing.pt")
    assert main(argv_missing) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    argv_arch = [*argv, "--output", str(bad_out)]
    argv_arch[argv_arch.index("--arch") + 1] = "resnet50"
    assert main(argv_arch) == 2
    assert "does not fit arch 'resnet50'" in capsys.readouterr().err
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("hello")
    argv_file = [*argv, "--output", str(bad_out)]
    argv_file[argv_file.index("--checkpoint") + 1] = str(not_a_checkpoint)
    assert main(argv_file) == 2
    assert "is not a loadable checkpoint" in capsys.readouterr().err
    argv_no_arch = [a for i, a in enumerate(argv) if a != "--arch" and argv[i - 1] != "--arch"]
    assert main([*argv_no_arch, "--output", str(bad_out)]) == 2  # a bare state_dict records no architecture
    assert "pass --arch" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main([*argv, "--output", str(blocker / "sub" / "r.json")]) == 2  # refused before any feature
    assert "cannot write" in capsys.readouterr().err
    assert not bad_out.exists()


def test_knn_cli_on_offline_digits_with_the_training_codes_cnn(tmp_path):
    from fastssl.backbones import build_backbone as build_trained

    torch.manual_seed(0)
    checkpoint = tmp_path / "digits.pt"
    torch.save({"backbone": build_trained("digits_cnn").state_dict()}, checkpoint)
    out = tmp_path / "digits.json"
    argv = ["eval", "knn", "--checkpoint", str(checkpoint), "--arch", "digits_cnn", "--data", "digits"]
    argv += ["--workers", "0", "--quiet", "--output", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["num_train"] + result["num_test"] == 1797
    assert result["feature_dim"] == 128
    # A random-init CNN is far above chance (0.1) on the shifted digits with 20-NN (~0.47 per fastssl.data.digits).
    assert result["results"][0]["top1"] > 0.3
