"""Linear probes on frozen features: the ISD/MSF SGD protocol, an L-BFGS logistic regression with a regularization
sweep (transfer protocol), and the 1%/10% label-subset protocol.

SGD protocol (MSF §4, Koohpayegani et al. 2021, arXiv:2105.07269; ISD, Tejankar et al. 2021, arXiv:2104.08894, both
following CompRess): features are L2-normalized, then standardized per dimension with train statistics; one linear
layer is trained with SGD (lr 0.01, momentum 0.9, weight decay 1e-4, batch 256) for 40 epochs, lr × 0.1 at epochs 15
and 30. Here it runs on cached features, without train-time augmentation.

Transfer protocol (BYOL/SimCLR appendix, used by ISD/MSF Table 2/4): multinomial logistic regression fitted to
convergence with L-BFGS, L2 penalty λ chosen on a held-out part of the train set, then refitted on all of it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastssl.eval.neighbors import as_tensor

DEFAULT_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


@dataclass(frozen=True)
class LinearProbeResult:
    """Test accuracy of a linear probe (fractions in [0, 1]) and how it was obtained.

    Attributes:
        top1, top5: test accuracies.
        protocol: ``"sgd"`` or ``"lbfgs"``.
        num_train, num_test: rows used.
        weight_decay: the L2 penalty used (the sweep's choice for L-BFGS).
        history: per-epoch ``{"epoch", "lr", "loss"}`` (SGD) or per-λ ``{"weight_decay", "val_top1"}`` (L-BFGS).
    """

    top1: float
    top5: float
    protocol: str
    num_train: int
    num_test: int
    weight_decay: float
    history: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


class Standardizer:
    """L2-normalize rows, then shift/scale each dimension to zero mean and unit variance with train statistics.

    Statistics are accumulated in fp64 over row blocks, and :meth:`__call__` transforms one batch at a time, so an
    fp16 ImageNet feature matrix is never copied to fp32 whole.
    """

    def __init__(self, train_features: torch.Tensor, eps: float = 1e-6, block: int = 65536) -> None:
        n, d = train_features.shape
        total = torch.zeros(d, dtype=torch.float64, device=train_features.device)
        total_sq = torch.zeros_like(total)
        for start in range(0, n, block):
            x = F.normalize(train_features[start : start + block].float(), dim=1).double()
            total += x.sum(0)
            total_sq += (x * x).sum(0)
        mean = total / n
        var = (total_sq / n - mean * mean).clamp_min(0)
        self.mean = mean.float()
        self.std = (var.sqrt() + eps).float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) any float dtype -> (B, D) fp32 standardized."""
        return (F.normalize(x.float(), dim=1) - self.mean.to(x.device)) / self.std.to(x.device)


def label_subset(
    features: torch.Tensor, labels: torch.Tensor, indices: Sequence[int] | np.ndarray | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a labelled subset (the 1% / 10% ImageNet protocol), validated.

    Raises:
        ValueError: empty, out-of-range or duplicated indices.
    """
    idx = torch.as_tensor(np.asarray(indices), dtype=torch.long).reshape(-1)
    if idx.numel() == 0:
        raise ValueError("the label subset is empty")
    if int(idx.min()) < 0 or int(idx.max()) >= features.shape[0]:
        raise ValueError(
            f"subset indices must lie in [0, {features.shape[0]}), got [{int(idx.min())}, {int(idx.max())}]"
        )
    if torch.unique(idx).numel() != idx.numel():
        raise ValueError("the label subset contains duplicate indices")
    idx = idx.to(features.device)
    return features[idx], labels.to(features.device)[idx]


def load_subset_indices(path: str | os.PathLike, sample_paths: Sequence[str] | None = None) -> np.ndarray:
    """Read a label-subset file: one integer index per line, or one image file name per line (the SimCLR
    ``1percent.txt`` / ``10percent.txt`` format), matched by base name against ``sample_paths`` (dataset order).

    Raises:
        ValueError: unknown names, or names given without ``sample_paths``.
    """
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if all(ln.lstrip("-").isdigit() for ln in lines):
        return np.array([int(ln) for ln in lines], dtype=np.int64)
    if sample_paths is None:
        raise ValueError(f"{path} lists file names; the dataset's sample paths are needed to map them to indices")
    position = {os.path.basename(p): i for i, p in enumerate(sample_paths)}
    missing = [ln for ln in lines if os.path.basename(ln) not in position]
    if missing:
        raise ValueError(f"{len(missing)} names in {path} are not in the dataset, e.g. {missing[:3]}")
    return np.array([position[os.path.basename(ln)] for ln in lines], dtype=np.int64)


def _validate(features, labels, name):
    x = as_tensor(features, f"{name}_features")
    y = as_tensor(labels, f"{name}_labels")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name}_features must be a 2-D float tensor, got {x.dtype} {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{name}_labels has shape {tuple(y.shape)} but {name}_features has {x.shape[0]} rows")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise TypeError(f"{name}_labels must be an integer tensor, got {y.dtype}")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{name}_labels contains negative labels")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}_features contains NaN or inf")
    return x, y.long().to(x.device)


def _prepare(train_features, train_labels, test_features, test_labels, subset, num_classes, device):
    xtr, ytr = _validate(train_features, train_labels, "train")
    xte, yte = _validate(test_features, test_labels, "test")
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"feature dimensions differ: train D={xtr.shape[1]}, test D={xte.shape[1]}")
    if subset is not None:
        xtr, ytr = label_subset(xtr, ytr, subset)
    if num_classes is None:
        num_classes = int(max(int(ytr.max()), int(yte.max()) if yte.numel() else 0)) + 1
    device = torch.device(device) if device is not None else xtr.device
    return xtr.to(device), ytr.to(device), xte.to(device), yte.to(device), num_classes


@torch.no_grad()
def _accuracy(
    weight: torch.Tensor, bias: torch.Tensor, std: Standardizer, x: torch.Tensor, y: torch.Tensor, block: int = 65536
) -> tuple[float, float]:
    top = min(5, weight.shape[0])
    hit1 = hit5 = 0
    for start in range(0, x.shape[0], block):
        logits = std(x[start : start + block]) @ weight.T + bias
        ranked = logits.topk(top, dim=1).indices
        target = y[start : start + block, None]
        hit1 += int((ranked[:, :1] == target).sum())
        hit5 += int((ranked == target).any(1).sum())
    n = max(x.shape[0], 1)
    return hit1 / n, hit5 / n


def linear_probe_sgd(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    *,
    num_classes: int | None = None,
    subset: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    epochs: int = 40,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    milestones: Sequence[int] = (15, 30),
    batch_size: int = 256,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> LinearProbeResult:
    """The ISD/MSF linear evaluation on frozen features.

    Args:
        train_features: (N_train, D) features (any float dtype; L2-normalized and standardized here).
        train_labels: (N_train,) integer labels.
        test_features: (N_test, D) features.
        test_labels: (N_test,) labels.
        num_classes: C; defaults to the largest label + 1.
        subset: train indices of a label subset (1% / 10% protocol); None uses all train rows.
        epochs, lr, momentum, weight_decay, milestones, batch_size: the protocol (defaults are the papers').
        device: where to train; defaults to the features' device.
        seed: initialization and shuffling seed.
        progress: tqdm bar over epochs.

    Returns:
        :class:`LinearProbeResult` with per-epoch history.
    """
    xtr, ytr, xte, yte, num_classes = _prepare(
        train_features, train_labels, test_features, test_labels, subset, num_classes, device
    )
    from tqdm.auto import tqdm

    std = Standardizer(xtr)
    generator = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(xtr.shape[1], num_classes)
    with torch.no_grad():  # seeded init independent of the global RNG
        bound = 1.0 / xtr.shape[1] ** 0.5
        layer.weight.copy_(torch.empty_like(layer.weight).uniform_(-bound, bound, generator=generator))
        layer.bias.zero_()
    layer = layer.to(xtr.device)
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=0.1)
    history = []
    for epoch in tqdm(range(epochs), desc="linear probe", unit="epoch", disable=not progress):
        order = torch.randperm(xtr.shape[0], generator=generator).to(xtr.device)
        total, seen = 0.0, 0
        epoch_lr = optimizer.param_groups[0]["lr"]
        for start in range(0, xtr.shape[0], batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(layer(std(xtr[idx])), ytr[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * idx.numel()
            seen += idx.numel()
        scheduler.step()
        history.append({"epoch": epoch, "lr": epoch_lr, "loss": total / max(seen, 1)})
    top1, top5 = _accuracy(layer.weight.detach(), layer.bias.detach(), std, xte, yte)
    return LinearProbeResult(top1, top5, "sgd", int(xtr.shape[0]), int(xte.shape[0]), weight_decay, history)


def _fit_lbfgs(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    init: tuple[torch.Tensor, torch.Tensor] | None,
    max_iter: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimize mean cross-entropy + λ/2 ‖W‖² (bias unpenalized) with full-batch L-BFGS (strong Wolfe)."""
    d = x.shape[1]
    weight = torch.zeros(num_classes, d, device=x.device) if init is None else init[0].clone()
    bias = torch.zeros(num_classes, device=x.device) if init is None else init[1].clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def logistic_regression_lbfgs(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    *,
    num_classes: int | None = None,
    subset: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    val_fraction: float = 0.2,
    max_iter: int = 500,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> LinearProbeResult:
    """Multinomial logistic regression on standardized features, λ swept on a held-out split (transfer protocol).

    Each λ in ``weight_decays`` is fitted on (1 - val_fraction) of the train rows (warm-started from the previous,
    larger λ) and scored on the rest; the best λ (the larger one on ties) is refitted on all train rows and evaluated
    on the test set. Full-batch: meant for transfer-size datasets whose standardized features fit in memory.

    Args:
        train_features, train_labels, test_features, test_labels, num_classes, subset, device: as
            :func:`linear_probe_sgd`.
        weight_decays: λ grid.
        val_fraction: fraction of train rows held out for the sweep (a seeded random split).
        max_iter: L-BFGS iterations per fit.
        seed: split seed.

    Returns:
        :class:`LinearProbeResult`; ``history`` lists the validation accuracy of every λ.
    """
    if not weight_decays:
        raise ValueError("weight_decays must list at least one value")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    xtr, ytr, xte, yte, num_classes = _prepare(
        train_features, train_labels, test_features, test_labels, subset, num_classes, device
    )
    order = torch.randperm(xtr.shape[0], generator=torch.Generator().manual_seed(seed)).to(xtr.device)
    n_val = max(1, int(round(val_fraction * xtr.shape[0])))
    if n_val >= xtr.shape[0]:
        raise ValueError(f"{xtr.shape[0]} train rows are too few to hold out a validation split")
    fit_idx, val_idx = order[n_val:], order[:n_val]
    std_fit = Standardizer(xtr[fit_idx])
    x_fit = std_fit(xtr[fit_idx])
    history, init = [], None
    for wd in sorted(weight_decays, reverse=True):
        init = _fit_lbfgs(x_fit, ytr[fit_idx], num_classes, wd, init, max_iter)
        val_top1, _ = _accuracy(init[0], init[1], std_fit, xtr[val_idx], ytr[val_idx])
        history.append({"weight_decay": wd, "val_top1": val_top1})
    best = max(history, key=lambda h: (h["val_top1"], h["weight_decay"]))["weight_decay"]
    std = Standardizer(xtr)
    weight, bias = _fit_lbfgs(std(xtr), ytr, num_classes, best, None, max_iter)
    top1, top5 = _accuracy(weight, bias, std, xte, yte)
    return LinearProbeResult(top1, top5, "lbfgs", int(xtr.shape[0]), int(xte.shape[0]), best, history)
