"""ISD Table 4 unbalanced subsets: a few large classes with all their images, the rest capped per class.

ISD (Tejankar et al., 2021), Sec. 3.2: 38 random ImageNet categories, 8 "large" ones with all (~1300) images and 30
"small" ones with 100 images each, drawn 10 times with different seeds; the kNN evaluation then uses the balanced
training data of the same 38 classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class UnbalancedSubset:
    """Result of :func:`unbalanced_subset`.

    Attributes:
        indices: (M,) int64 sorted indices into the full dataset (the unbalanced SSL training set).
        balanced_indices: (M',) int64 sorted indices of ALL images of the chosen classes (the balanced kNN train set).
        large_classes: label ids kept in full.
        small_classes: label ids capped at ``cap`` images.
    """

    indices: np.ndarray
    balanced_indices: np.ndarray
    large_classes: tuple[int, ...]
    small_classes: tuple[int, ...]


def unbalanced_subset(
    labels: Sequence[int] | np.ndarray,
    *,
    n_large: int = 8,
    n_small: int = 30,
    cap: int = 100,
    seed: int = 0,
    classes: Sequence[int] | None = None,
) -> UnbalancedSubset:
    """Draw an ISD-style unbalanced subset.

    Args:
        labels: (N,) class id of every image of the full dataset.
        n_large: classes kept with all their images.
        n_small: classes capped at ``cap`` images.
        cap: images kept per small class (a class with fewer keeps all).
        seed: selects the classes (when ``classes`` is None) and the capped images; ISD repeats with 10 seeds.
        classes: optional explicit pool of n_large + n_small class ids, the first n_large being the large ones.

    Returns:
        An UnbalancedSubset.
    """
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng([seed, 4])
    present = np.unique(labels[labels >= 0])
    if classes is None:
        if n_large + n_small > len(present):
            raise ValueError(f"need {n_large + n_small} classes but the labels contain only {len(present)}")
        chosen = rng.choice(present, size=n_large + n_small, replace=False)
    else:
        chosen = np.asarray(classes, dtype=np.int64)
        if len(chosen) != n_large + n_small or len(np.unique(chosen)) != len(chosen):
            raise ValueError(f"classes must list {n_large + n_small} distinct ids, got {list(chosen)}")
        missing = sorted(set(chosen.tolist()) - set(present.tolist()))
        if missing:
            raise ValueError(f"classes {missing} have no images")
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    large, small = chosen[:n_large], chosen[n_large:]
    keep = [np.flatnonzero(labels == c) for c in large]
    for c in small:
        members = np.flatnonzero(labels == c)
        keep.append(np.sort(rng.choice(members, size=min(cap, len(members)), replace=False)))
    balanced = np.flatnonzero(np.isin(labels, chosen))
    return UnbalancedSubset(
        indices=np.sort(np.concatenate(keep)).astype(np.int64),
        balanced_indices=balanced.astype(np.int64),
        large_classes=tuple(int(c) for c in large),
        small_classes=tuple(int(c) for c in small),
    )
