"""BYOL regression loss: "Bootstrap Your Own Latent" (Grill et al., NeurIPS 2020, arXiv:2006.07733)."""

from __future__ import annotations

import torch

from fastssl.functional.inputs import check_embeddings, normalized


def cosine_distance(online: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """2 − 2·cos between already-normalized rows, reduced over the last dim: (..., D) → (...)."""
    return 2 - 2 * (online * target).sum(dim=-1)


def byol_loss(online: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean(2 − 2·cos(online, target)) over the batch; the target is detached.

    Args:
        online: (N, D) online predictions (normalized here); receives the gradient.
        target: (N, D) target projections (normalized here; detached).

    Returns:
        fp32 scalar (fp64 for fp64 inputs).
    """
    check_embeddings("online", online)
    check_embeddings("target", target, like=online, like_name="online")
    acc_dtype = torch.float64 if online.dtype == torch.float64 else torch.float32
    q = normalized(online).to(acc_dtype)
    t = normalized(target.detach()).to(acc_dtype)
    return cosine_distance(q, t).mean()
