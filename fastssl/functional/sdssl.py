"""SDSSL: "Self-Distilled Self-Supervised Representation Learning" (Jang et al., WACV 2023, arXiv:2111.12958).

Intermediate layers are distilled toward the teacher's final-layer output (Alg. 1 of the paper; official
``pl_train_moco.py`` of hagiss/SDSSL). For one direction (student view 1 against teacher view 2):

    L = ctr(q_L, z) + α · ctr(q_{1..L-1}, z) + L · ctr(pred(sg(h_{1..L})), z)

with ``ctr(q, z) = 2τ · CE(q·zᵀ/τ, diagonal)`` for SD-MoCo v3 (q, z L2-normalized, the other rows of the batch are the
negatives, each layer's N rows against the same N targets) and ``ctr = mean(2 − 2·cos)`` for SD-BYOL. The factor L on
the predictor-only term turns its per-layer mean into the sum over layers of Eq. (5) (β = 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastssl.functional.byol import cosine_distance
from fastssl.functional.inputs import check_temperature, normalized

SDSSL_METHODS = ("mocov3", "byol")


def _ctr(q: torch.Tensor, z: torch.Tensor, tau: float, method: str) -> torch.Tensor:
    """Per-layer SSL term averaged over layers: q (L, N, D) against z (N, D), z detached and normalized."""
    layers, n, dim = q.shape
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q = normalized(q.reshape(layers * n, dim)).to(acc_dtype)
    z = z.to(acc_dtype)
    if method == "byol":
        return cosine_distance(q, z.repeat(layers, 1)).mean()
    logits = q @ z.T / tau  # (L·N, N): each layer's rows against the batch of targets
    labels = torch.arange(n, device=q.device).repeat(layers)
    return 2 * tau * F.cross_entropy(logits, labels)


def sdssl_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    predictor_only: torch.Tensor | None = None,
    *,
    alpha: float,
    tau: float = 0.2,
    method: str = "mocov3",
) -> torch.Tensor:
    """SDSSL loss for one view pair (call twice, swapping views, for the symmetric loss of Alg. 1).

    Args:
        student: (L, N, D) per-layer student outputs q_l = pred(proj_l(h_l)) of view 1, layer L last.
        teacher: (N, D) teacher final-layer projection z_L of view 2 (normalized here; detached, sg(z_L)).
        predictor_only: optional (L, N, D) predictor outputs on DETACHED projections, pred(sg(h_l)), for the
            predictor-only term L_pred; omit for predictor-free variants.
        alpha: intermediate self-distillation weight α (see :func:`sdssl_alpha`).
        tau: contrastive temperature τ (0.2, MoCo v3).
        method: ``"mocov3"`` (contrastive, scaled by 2τ) or ``"byol"`` (2 − 2cos).

    Returns:
        fp32 scalar (fp64 for fp64 inputs).
    """
    if method not in SDSSL_METHODS:
        raise ValueError(f"method must be one of {SDSSL_METHODS}, got {method!r}")
    for name, value in (("student", student), ("teacher", teacher)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not 0 <= float(alpha) < float("inf"):
        raise ValueError(f"alpha must be a finite weight ≥ 0, got {alpha}")
    if student.dim() != 3 or 0 in student.shape:
        raise ValueError(f"student must have shape (L, N, D) with L, N, D ≥ 1, got {tuple(student.shape)}")
    for name, value in (("student", student), ("teacher", teacher)):
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {value.dtype}")
    if teacher.shape != student.shape[1:]:
        raise ValueError(f"teacher must have shape {tuple(student.shape[1:])} (N, D), got {tuple(teacher.shape)}")
    if predictor_only is not None and predictor_only.shape != student.shape:
        raise ValueError(f"predictor_only must have shape {tuple(student.shape)}, got {tuple(predictor_only.shape)}")
    tau = check_temperature("tau", tau)
    layers = student.shape[0]
    z = normalized(teacher.detach())
    loss = _ctr(student[-1:], z, tau, method)
    if layers > 1:
        loss = loss + alpha * _ctr(student[:-1], z, tau, method)
    if predictor_only is not None:
        loss = loss + layers * _ctr(predictor_only, z, tau, method)
    return loss


def sdssl_alpha(step: int, total_steps: int, ratio: float) -> float:
    """Per-iteration cosine schedule of α from 0 at step 0 to ``ratio`` at ``total_steps``.

    α(step) = ratio · (1 − cos(π · step / total_steps)) / 2. SDSSL anneals α so that distillation starts once some
    training has been done (Tab. 5: without it accuracy drops).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    progress = min(max(step / total_steps, 0.0), 1.0)
    return ratio * (1 - math.cos(math.pi * progress)) / 2
