"""Linear probes: known accuracies on separable synthetic data, the SGD protocol's schedule, label subsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastssl.eval.linear_probe import (
    Standardizer,
    label_subset,
    linear_probe_sgd,
    load_subset_indices,
    logistic_regression_lbfgs,
)


def _blobs(n_train=600, n_test=400, dim=32, classes=6, flip=0.2, seed=0):
    """Well-separated Gaussian blobs (a perfect linear classifier exists) and test labels of which exactly
    ``flip`` are replaced by a wrong class: a perfect probe then scores exactly 1 - flip."""
    g = torch.Generator().manual_seed(seed)
    centers = 4.0 * torch.randn(classes, dim, generator=g)
    ytr = torch.arange(n_train) % classes
    yte = torch.arange(n_test) % classes
    xtr = centers[ytr] + 0.3 * torch.randn(n_train, dim, generator=g)
    xte = centers[yte] + 0.3 * torch.randn(n_test, dim, generator=g)
    noisy = yte.clone()
    flipped = torch.randperm(n_test, generator=g)[: int(flip * n_test)]
    noisy[flipped] = (noisy[flipped] + 1 + torch.randint(0, classes - 1, (len(flipped),), generator=g)) % classes
    return xtr.half(), ytr, xte.half(), noisy


def test_standardizer_matches_direct_formula():
    x = torch.randn(300, 7, dtype=torch.float64) * torch.arange(1, 8) + 3
    std = Standardizer(x.float(), block=64)
    xn = x / x.norm(dim=1, keepdim=True)
    expected = (xn - xn.mean(0)) / (xn.std(0, unbiased=False) + 1e-6)
    torch.testing.assert_close(std(x.float()).double(), expected, atol=1e-5, rtol=1e-5)


def test_sgd_protocol_reaches_known_accuracy_with_paper_schedule():
    xtr, ytr, xte, yte = _blobs()
    res = linear_probe_sgd(xtr, ytr, xte, yte, progress=False)
    assert res.top1 == pytest.approx(0.8, abs=0)  # perfect on the clean 80%, wrong on the flipped 20%
    assert res.protocol == "sgd" and res.num_train == 600 and res.num_test == 400
    lrs = [h["lr"] for h in res.history]
    assert len(lrs) == 40
    np.testing.assert_allclose(lrs[:15], 0.01)
    np.testing.assert_allclose(lrs[15:30], 0.001)
    np.testing.assert_allclose(lrs[30:], 0.0001)
    assert res.history[-1]["loss"] < res.history[0]["loss"]


def test_lbfgs_sweep_reaches_known_accuracy_and_reports_sweep():
    xtr, ytr, xte, yte = _blobs(flip=0.25, seed=1)
    res = logistic_regression_lbfgs(xtr, ytr, xte, yte, weight_decays=(1e-4, 1e-2), max_iter=100)
    assert res.top1 == pytest.approx(0.75, abs=0)
    assert [h["weight_decay"] for h in res.history] == [1e-2, 1e-4]
    assert [h["val_top1"] for h in res.history] == [1.0, 1.0]
    assert res.weight_decay == 1e-2  # ties go to the stronger penalty


def test_lbfgs_fits_argmax_labels_of_a_random_linear_map():
    # Labels argmax(W* x): linearly separable through the origin, invariant to L2 normalization; the standardization
    # is affine, so a linear layer with bias can represent it exactly.
    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 12, generator=g)
    x = torch.randn(3000, 12, generator=g)
    y = (x @ w.T).argmax(1)
    res = logistic_regression_lbfgs(x[:2000], y[:2000], x[2000:], y[2000:], weight_decays=(1e-6,), max_iter=300)
    assert res.top1 >= 0.97


def test_label_subset_protocol(tmp_path):
    xtr, ytr, xte, yte = _blobs(flip=0.0, seed=2)
    subset = np.arange(0, 600, 7)  # ~14 % of the train rows; 7 is coprime with 6 classes, so all are present
    res = linear_probe_sgd(xtr, ytr, xte, yte, subset=subset, epochs=20, progress=False)
    assert res.num_train == 86 and res.top1 == 1.0 and res.top5 == 1.0
    f, y = label_subset(xtr, ytr, subset)
    assert torch.equal(f, xtr[subset]) and torch.equal(y, ytr[subset])
    with pytest.raises(ValueError, match="duplicate"):
        label_subset(xtr, ytr, [1, 1])
    with pytest.raises(ValueError, match=r"must lie in \[0, 600\)"):
        label_subset(xtr, ytr, [600])
    (tmp_path / "idx.txt").write_text("3\n1\n\n2\n")
    np.testing.assert_array_equal(load_subset_indices(tmp_path / "idx.txt"), [3, 1, 2])
    (tmp_path / "names.txt").write_text("n01_2.JPEG\nn01_0.JPEG\n")
    paths = ["/data/train/n01/n01_0.JPEG", "/data/train/n01/n01_1.JPEG", "/data/train/n01/n01_2.JPEG"]
    np.testing.assert_array_equal(load_subset_indices(tmp_path / "names.txt", paths), [2, 0])
    with pytest.raises(ValueError, match="not in the dataset"):
        load_subset_indices(tmp_path / "names.txt", paths[:1])


def test_bad_inputs():
    xtr, ytr, xte, yte = _blobs()
    with pytest.raises(ValueError, match="train_labels has shape"):
        linear_probe_sgd(xtr, ytr[:-1], xte, yte, progress=False)
    bad = xte.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="test_features contains NaN"):
        logistic_regression_lbfgs(xtr, ytr, bad, yte)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        linear_probe_sgd(xtr, ytr, xte[:, :5], yte, progress=False)
