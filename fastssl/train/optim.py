"""Optimizers (SGD, LARS from timm, AdamW) with optional BN/bias exclusion, and the lr / EMA-momentum schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastssl.train.config import MethodConfig, OptimConfig


def parameter_groups(model: nn.Module, exclude_bn_bias: bool, weight_decay: float) -> list[dict]:
    """Trainable parameters, split so that BN weights and biases (all 1-D tensors) get no weight decay if asked.

    timm's LARS adapts a group only when its weight decay is non-zero (``always_adapt=False``), so the excluded group
    also skips the trust ratio, as in BYOL / SimCLR.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if exclude_bn_bias and param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def scaled_lr(optim: OptimConfig, global_batch: int) -> float:
    """Linear scaling rule: lr · global_batch / base_batch."""
    return optim.lr * global_batch / optim.base_batch


def build_optimizer(
    model: nn.Module, optim: OptimConfig, global_batch: int, *, fused: bool = False
) -> torch.optim.Optimizer:
    """SGD (momentum), LARS (timm) or AdamW at the linearly scaled learning rate.

    Args:
        fused: AdamW uses PyTorch's fused kernel (the trainer asks for it under fp16 AMP). A fused optimizer takes
            the GradScaler's ``found_inf`` as a device tensor and skips the update on the device, so
            ``GradScaler.step`` does not read its inf check back. SGD is never fused: PyTorch's fused SGD allocates
            its momentum buffers uninitialized on the first step and leaves them so when the scaler skips that step
            (the usual fp16 overflow at the start of training), then treats them as valid (reproduced in
            ``tests/test_train_amp.py``). timm's LARS has no fused form. Under fp16 both read the inf check once
            per step.
    """
    lr = scaled_lr(optim, global_batch)
    groups = parameter_groups(model, optim.exclude_bn_bias, optim.weight_decay)
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum)
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim.betas), fused=fused or None)
    from timm.optim import Lars

    return Lars(groups, lr=lr, momentum=optim.momentum)


def lr_at(step: int, total_steps: int, base_lr: float, optim: OptimConfig) -> float:
    """Per-iteration learning rate: linear warm-up, then cosine to 0, steps ×gamma at milestones, or constant."""
    if step < optim.warmup_steps:
        return base_lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return base_lr
    if optim.schedule == "step":
        passed = sum(step >= m * total_steps for m in optim.milestones)
        return base_lr * optim.gamma**passed
    progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def momentum_at(step: int, total_steps: int, method: MethodConfig) -> float:
    """EMA momentum m: constant, or BYOL's cosine increase m_t = 1 − (1 − m)(cos(πt/T) + 1)/2."""
    if method.momentum_schedule == "constant":
        return method.momentum
    progress = min(step / max(1, total_steps), 1.0)
    return 1 - (1 - method.momentum) * (math.cos(math.pi * progress) + 1) / 2
