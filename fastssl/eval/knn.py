"""k-nearest-neighbour classification of frozen features: the standard SSL evaluation.

Two vote rules over the k exact cosine neighbours (:func:`fastssl.eval.neighbors.nearest_neighbors`):

- weighted (DINO, Caron et al. 2021, arXiv:2104.14294; InstDisc, Wu et al. 2018): class score
  ``score_c = Σ_{j ∈ top-k, y_j = c} exp(s_j / T)`` with T = 0.07; ties between classes go to the lower class id.
- majority (ISD, Tejankar et al. 2021, arXiv:2104.08894; MSF, Koohpayegani et al. 2021, arXiv:2105.07269, which use
  k ∈ {1, 20}): class score = neighbour count; ties between classes are broken uniformly at random by a seeded
  generator, so a given seed always gives the same predictions.

Scores are accumulated in fp64 one neighbour rank at a time (no atomics), so predictions are identical on every device
and backend.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from fastssl.eval.neighbors import DEFAULT_CHUNK_SIZE, as_tensor, nearest_neighbors

_VOTE_ROWS = 4096  # rows of the (rows × classes) score matrix built at a time


@dataclass(frozen=True)
class KNNAccuracy:
    """Top-1 / top-5 kNN accuracy (fractions in [0, 1]) and how it was computed."""

    top1: float
    top5: float
    k: int
    weighted: bool
    temperature: float
    backend: str
    num_test: int

    def as_dict(self) -> dict:
        return asdict(self)


def _validate_labels(labels: torch.Tensor, n: int, name: str, features_name: str) -> torch.Tensor:
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise ValueError(f"{name} has {labels.shape[0]} entries but {features_name} has {n} rows")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"{name} contains negative labels; unknown labels are not allowed in kNN evaluation")
    return labels.long()


def rank_classes(
    similarities: torch.Tensor,
    neighbor_labels: torch.Tensor,
    num_classes: int,
    *,
    weighted: bool = True,
    temperature: float = 0.07,
    seed: int = 0,
    top: int = 5,
) -> torch.Tensor:
    """Vote and rank classes for each query row.

    Args:
        similarities: (N, k) neighbour similarities, descending.
        neighbor_labels: (N, k) int64 labels of the neighbours.
        num_classes: C.
        weighted: exp(s/T)-weighted vote if True, else majority vote with seeded random tie-breaking.
        temperature: T of the weighted vote.
        seed: seed of the majority-vote tie-breaking generator (unused when weighted).
        top: how many ranked classes to return.

    Returns:
        (N, min(top, C)) int64 class ids, best first; -1 in the slots past the classes that got a vote (with k < top
        or neighbours from fewer than ``top`` classes), so a top-5 count never credits an unvoted class.
    """
    n, k = neighbor_labels.shape
    top = min(top, num_classes)
    device = neighbor_labels.device
    ranked = torch.empty(n, top, dtype=torch.long, device=device)
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, n, _VOTE_ROWS):
        labels = neighbor_labels[start : start + _VOTE_ROWS]
        rows = torch.arange(labels.shape[0], device=device)
        scores = torch.zeros(labels.shape[0], num_classes, dtype=torch.float64, device=device)
        votes = torch.zeros(labels.shape[0], num_classes, dtype=torch.int32, device=device)
        votes.scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.int32))
        if weighted:
            s = similarities[start : start + _VOTE_ROWS].double()
            # exp((s - s_1)/T) = exp(s/T)·const per row: same ranking, no overflow for small T.
            weights = torch.exp((s - s[:, :1]) / temperature)
        else:
            weights = torch.ones(labels.shape, dtype=torch.float64, device=device)
        for j in range(k):  # one rank at a time: a fixed summation order on every device
            scores[rows, labels[:, j]] += weights[:, j]
        if not weighted:
            # Counts are integers; a uniform key in [0, 1) only reorders classes with equal counts.
            keys = torch.rand(scores.shape, generator=generator, dtype=torch.float64)
            scores += keys.to(device)
        # Stable descending sort: equal weighted scores keep the lower class id first.
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top]
        ranked[start : start + _VOTE_ROWS] = torch.where(votes.gather(1, order) > 0, order, -1)
    return ranked


def _prepare(train_features, train_labels, test_features, num_classes):
    train = as_tensor(train_features, "train_features")
    test = as_tensor(test_features, "test_features")
    labels = _validate_labels(as_tensor(train_labels, "train_labels"), train.shape[0], "train_labels", "train_features")
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.numel() else 0
    elif labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(f"train_labels contains class {int(labels.max())} but num_classes={num_classes}")
    return train, labels, test, num_classes


def _knn_rank(
    train_features,
    train_labels,
    test_features,
    *,
    k,
    weighted,
    temperature,
    num_classes,
    backend,
    chunk_size,
    seed,
    top,
):
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    train, labels, test, num_classes = _prepare(train_features, train_labels, test_features, num_classes)
    neighbors = nearest_neighbors(train, test, k, backend=backend, chunk_size=chunk_size)
    neighbor_labels = labels.to(neighbors.indices.device)[neighbors.indices]
    ranked = rank_classes(
        neighbors.similarities,
        neighbor_labels,
        num_classes,
        weighted=weighted,
        temperature=temperature,
        seed=seed,
        top=top,
    )
    return ranked, neighbors.backend


def knn_classify(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    *,
    k: int = 20,
    weighted: bool = True,
    temperature: float = 0.07,
    num_classes: int | None = None,
    backend: str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    seed: int = 0,
) -> torch.Tensor:
    """Predict a class for each test row from its k nearest train rows (cosine similarity).

    Args:
        train_features: (N_train, D) float features; normalization not required (cosine is computed).
        train_labels: (N_train,) non-negative integer labels.
        test_features: (N_test, D) float features, same dtype and device as the train features.
        k: neighbours per query, 1 ≤ k ≤ N_train (20 in DINO/SDSSL, 1 and 20 in ISD/MSF).
        weighted: ``Σ exp(s/T)`` vote (DINO/InstDisc) if True, else majority vote with seeded random tie-breaking
            (ISD/MSF).
        temperature: T of the weighted vote.
        num_classes: number of classes; defaults to max(train_labels) + 1.
        backend: ``"auto"``, ``"faiss-gpu"``, ``"faiss-cpu"``, ``"torch"`` or ``"triton"``; all give identical
            predictions. ``"auto"`` logs (logger ``fastssl.eval.neighbors``) which one it picked.
        chunk_size: train rows per score block (memory knob of the torch backend).
        seed: majority-vote tie-breaking seed.

    Returns:
        (N_test,) int64 predicted labels on the features' device.

    Raises:
        TypeError: non-float features, mismatched feature dtypes, non-integer labels.
        ValueError: shape mismatches, k out of range, NaN/inf or all-zero feature rows, negative labels.
    """
    ranked, _ = _knn_rank(
        train_features,
        train_labels,
        test_features,
        k=k,
        weighted=weighted,
        temperature=temperature,
        num_classes=num_classes,
        backend=backend,
        chunk_size=chunk_size,
        seed=seed,
        top=1,
    )
    return ranked[:, 0]


def knn_accuracy(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    *,
    k: int = 20,
    weighted: bool = True,
    temperature: float = 0.07,
    num_classes: int | None = None,
    backend: str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    seed: int = 0,
) -> KNNAccuracy:
    """Top-1 and top-5 kNN accuracy of the test rows; arguments as :func:`knn_classify`.

    Top-5 counts a row correct when its label is among the five best-voted classes (all classes if C < 5).

    Returns:
        :class:`KNNAccuracy`.
    """
    test = as_tensor(test_features, "test_features")
    truth = _validate_labels(as_tensor(test_labels, "test_labels"), test.shape[0], "test_labels", "test_features")
    ranked, backend_used = _knn_rank(
        train_features,
        train_labels,
        test,
        k=k,
        weighted=weighted,
        temperature=temperature,
        num_classes=num_classes,
        backend=backend,
        chunk_size=chunk_size,
        seed=seed,
        top=5,
    )
    truth = truth.to(ranked.device)
    n = max(truth.shape[0], 1)
    top1 = float((ranked[:, 0] == truth).sum()) / n
    top5 = float((ranked == truth[:, None]).any(dim=1).sum()) / n
    return KNNAccuracy(
        top1=top1,
        top5=top5,
        k=k,
        weighted=weighted,
        temperature=temperature,
        backend=backend_used,
        num_test=int(truth.shape[0]),
    )
