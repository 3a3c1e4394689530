"""The training source and the kNN monitor's labelled splits for each ``data.dataset``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastssl.data import ArraySource, FileSource, image_folder, make_synthetic_image_folder, shifted_digits
from fastssl.data import unbalanced_subset as build_unbalanced_subset
from fastssl.train.config import DataConfig


def training_source(data: DataConfig, *, seed: int) -> ArraySource | FileSource:
    """The pretraining images (labels are used only for monitoring: bank purity)."""
    if data.dataset == "digits":
        source: ArraySource | FileSource = shifted_digits("train").as_source()
    elif data.dataset == "synthetic":
        root = Path(data.path or "runs/synthetic_images")
        if not root.is_dir():  # written once (atomically: an existing folder is complete), then reused
            make_synthetic_image_folder(root, seed=seed)
        source = image_folder(root)
    else:
        source = image_folder(data.path)
    if data.unbalanced_large is not None:
        # ISD Table 4: n_large random classes keep all their images, n_small others (by default every other class)
        # keep `cap` each; the kNN monitor then uses all images of exactly these classes (monitor_classes).
        n_classes = len(np.unique(source.labels[source.labels >= 0]))
        n_small = data.unbalanced_small if data.unbalanced_small is not None else n_classes - data.unbalanced_large
        subset = build_unbalanced_subset(
            source.labels, n_large=data.unbalanced_large, n_small=n_small, cap=data.unbalanced_cap, seed=seed
        )
        source = source.subset(subset.indices)
    return source


def monitor_classes(data: DataConfig, source: ArraySource | FileSource) -> list[int] | None:
    """The classes the kNN monitor evaluates: those of an unbalanced training subset (ISD evaluates on them,
    balanced), else None for all."""
    if data.unbalanced_large is None:
        return None
    return sorted(int(c) for c in np.unique(source.labels[source.labels >= 0]))


def _only(dataset, labels, classes: list[int] | None):
    """``dataset`` restricted to the samples whose label is in ``classes`` (all of them when None)."""
    if classes is None:
        return dataset
    keep = np.flatnonzero(np.isin(np.asarray(labels), classes))
    return torch.utils.data.Subset(dataset, keep.tolist())


def _array_dataset(source: ArraySource, mean: tuple[float, ...], std: tuple[float, ...]):
    images = torch.from_numpy(source.images).permute(0, 3, 1, 2).float().div_(255)
    mean_t, std_t = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    return torch.utils.data.TensorDataset((images - mean_t) / std_t, torch.from_numpy(source.labels))


def monitor_splits(
    data: DataConfig,
    *,
    seed: int,
    mean,
    std,
    image_size: int | tuple[int, int],
    classes: list[int] | None = None,
):
    """(train, test) map-style datasets of (image, label) for the kNN monitor, or None when there is no test split.

    Digits: the train and test splits (disjoint base images). ImageFolder: ``data.path`` and ``data.eval_path``
    with the papers' resize + center-crop transform. ``classes``: only these classes, every image of each (the
    balanced evaluation of ISD's unbalanced protocol).
    """
    if data.dataset == "digits":
        train, test = shifted_digits("train").as_source(), shifted_digits("test").as_source()
        return (
            _only(_array_dataset(train, mean, std), train.labels, classes),
            _only(_array_dataset(test, mean, std), test.labels, classes),
        )
    if data.dataset == "imagefolder" and data.eval_path:
        import torchvision

        from fastssl.eval import eval_transform

        transform = eval_transform(image_size, mean=mean, std=std)
        train_folder = torchvision.datasets.ImageFolder(data.path, transform=transform)
        eval_folder = torchvision.datasets.ImageFolder(data.eval_path, transform=transform)
        return _only(train_folder, train_folder.targets, classes), _only(eval_folder, eval_folder.targets, classes)
    if data.dataset == "synthetic":
        import torchvision

        from fastssl.eval import eval_transform

        root = Path(data.path or "runs/synthetic_images")
        full = torchvision.datasets.ImageFolder(root, transform=eval_transform(image_size, mean=mean, std=std))
        order = np.random.default_rng(seed).permutation(len(full))
        half = len(full) // 2
        return torch.utils.data.Subset(full, order[:half]), torch.utils.data.Subset(full, order[half:])
    return None
