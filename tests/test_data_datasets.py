"""Offline datasets: shifted digits, synthetic JPEG ImageFolder, ISD unbalanced subsets."""

from __future__ import annotations

import numpy as np
import pytest

from fastssl.data import image_folder, make_synthetic_image_folder, shifted_digits, unbalanced_subset

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits():
    return shifted_digits("train"), shifted_digits("test")


def test_shifted_digits_split_by_base_image(digits):
    from sklearn.datasets import load_digits

    train, test = digits
    assert len(train) + len(test) == 1797
    assert not set(train.base_index.tolist()) & set(test.base_index.tolist())
    assert train.images.shape[1:] == (16, 16, 3) and train.images.dtype == np.uint8
    base = load_digits()
    assert np.array_equal(train.labels, base.target[train.base_index])
    # stratified: every class is ~25% test
    for c in range(10):
        frac = (test.labels == c).sum() / ((train.labels == c).sum() + (test.labels == c).sum())
        assert abs(frac - 0.25) < 0.02


def test_shifted_digits_content_is_one_resized_digit(digits):
    train, _ = digits
    gray = train.images[..., 0].astype(np.int64)
    assert (train.images[..., 0] == train.images[..., 2]).all()
    ink = gray > 0
    rows, cols = ink.any(2), ink.any(1)
    height = rows.shape[1] - np.argmax(rows[:, ::-1], 1) - np.argmax(rows, 1)
    width = cols.shape[1] - np.argmax(cols[:, ::-1], 1) - np.argmax(cols, 1)
    assert height.max() <= 12 and width.max() <= 12  # bounding box within the resized digit
    assert gray.sum((1, 2)).min() > 0
    # positions vary: the ink centroid spreads over the canvas
    ys = (gray * np.arange(16)[None, :, None]).sum((1, 2)) / gray.sum((1, 2))
    assert ys.std() > 1.0
    again = shifted_digits("train")
    assert np.array_equal(again.images, train.images)
    assert not np.array_equal(shifted_digits("train", seed=1).images, train.images)


def test_synthetic_folder_layout_and_atomic_overwrite(tmp_path):
    root = make_synthetic_image_folder(tmp_path / "ds", num_classes=3, images_per_class=4, min_size=20, max_size=30)
    src = image_folder(root)
    assert len(src) == 12 and src.classes == ("class_00", "class_01", "class_02")
    assert np.array_equal(np.bincount(src.labels), [4, 4, 4])
    with pytest.raises(FileExistsError):
        make_synthetic_image_folder(root)
    make_synthetic_image_folder(root, num_classes=2, images_per_class=1, min_size=20, max_size=30, overwrite=True)
    assert len(image_folder(root)) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary folder left behind


def test_unbalanced_subset_isd_protocol():
    labels = np.repeat(np.arange(50), 130)
    sub = unbalanced_subset(labels, n_large=8, n_small=30, cap=100, seed=3)
    counts = np.bincount(labels[sub.indices], minlength=50)
    assert all(counts[c] == 130 for c in sub.large_classes)
    assert all(counts[c] == 100 for c in sub.small_classes)
    assert counts.sum() == 8 * 130 + 30 * 100 and len(set(sub.large_classes) | set(sub.small_classes)) == 38
    assert np.array_equal(np.bincount(labels[sub.balanced_indices], minlength=50)[counts > 0], np.full(38, 130))
    again = unbalanced_subset(labels, n_large=8, n_small=30, cap=100, seed=3)
    assert np.array_equal(again.indices, sub.indices)
    assert not np.array_equal(unbalanced_subset(labels, seed=4).indices, sub.indices)
    with pytest.raises(ValueError, match="classes"):
        unbalanced_subset(labels, n_large=40, n_small=30)
