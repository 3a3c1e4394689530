"""A 2-D t-SNE picture of the features of a few random classes (as MSF Table 2-right), saved as PNG."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastssl.eval.neighbors import as_tensor


@dataclass(frozen=True)
class EmbeddingPlot:
    """Result of :func:`plot_embedding`.

    Attributes:
        path: the written PNG.
        coords: (M, 2) t-SNE coordinates of the plotted points.
        labels: (M,) their labels.
        classes: the classes drawn, in legend order.
    """

    path: Path
    coords: np.ndarray
    labels: np.ndarray
    classes: list[int]


def plot_embedding(
    features: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    path: str | os.PathLike,
    *,
    num_classes: int = 10,
    per_class: int = 100,
    seed: int = 0,
    perplexity: float = 30.0,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> EmbeddingPlot:
    """t-SNE (scikit-learn) of up to ``per_class`` L2-normalized features from ``num_classes`` random classes.

    Args:
        features: (N, D) features.
        labels: (N,) integer labels.
        path: PNG to write (parent folders are created).
        num_classes: classes drawn at random (all if fewer exist).
        per_class: points drawn at random per class.
        seed: class/point sampling and t-SNE seed.
        perplexity: t-SNE perplexity (capped below the number of points).
        class_names: legend names indexed by label.
        title: figure title.

    Returns:
        :class:`EmbeddingPlot`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    x = as_tensor(features, "features").float()
    y = as_tensor(labels, "labels").long().cpu().numpy()
    if x.dim() != 2 or x.shape[0] != len(y):
        raise ValueError(f"features {tuple(x.shape)} and labels ({len(y)},) do not match")
    rng = np.random.default_rng(seed)
    present = np.unique(y)
    classes = sorted(rng.choice(present, size=min(num_classes, len(present)), replace=False).tolist())
    rows = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in classes])
    if len(rows) < 3:
        raise ValueError("t-SNE needs at least 3 points")
    points = torch.nn.functional.normalize(x[torch.as_tensor(rows)], dim=1).cpu().numpy()
    tsne = TSNE(n_components=2, perplexity=min(perplexity, (len(rows) - 1) / 3), init="pca", random_state=seed)
    coords = tsne.fit_transform(points)

    fig, ax = plt.subplots(figsize=(6, 6))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for i, c in enumerate(classes):
        mask = y[rows] == c
        name = class_names[c] if class_names is not None else str(c)
        ax.scatter(coords[mask, 0], coords[mask, 1], s=8, color=cmap(i % cmap.N), label=name)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"t-SNE of {len(classes)} classes")
    ax.legend(markerscale=2, fontsize=7, loc="best")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return EmbeddingPlot(path, coords, y[rows], [int(c) for c in classes])
