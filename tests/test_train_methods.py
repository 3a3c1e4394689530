"""Every method's tiny config: the loss on a fixed batch (bank frozen) decreases under training, nothing is NaN."""

from __future__ import annotations

import copy

import pytest
import torch

from fastssl.data import make_loader, shifted_digits
from fastssl.train.config import load_config
from fastssl.train.methods import build_method
from fastssl.train.optim import build_optimizer
from fastssl.train.trainer import _views

METHODS = ["mocov2", "isd", "msf", "ressl", "byol", "nnclr", "sdssl"]


def fixed_batch(config):
    source = shifted_digits("train").as_source()
    loader = make_loader(source, _views(config), 32, backend="torchvision", num_workers=0, verbose=False, seed=1)
    return next(iter(loader))


def probe_loss(method, frozen, views, labels, step):
    """The loss of a copy of ``method`` whose teacher and criterion state (bank, counters) are reset to ``frozen``:
    a fixed function of the student's parameters, so a decrease means the student improved, not that the bank or the
    teacher moved."""
    probe = copy.deepcopy(method)
    probe.load_state_dict({**probe.state_dict(), **frozen})
    with torch.no_grad():
        loss, _ = probe.loss(views, labels, step)
    return float(loss)


@pytest.mark.parametrize("name", METHODS)
def test_tiny_method_loss_decreases_on_a_fixed_batch(name):
    torch.manual_seed(0)
    config = load_config(f"tiny_{name}", ["optim.lr=0.05", "optim.warmup_steps=0"])
    method = build_method(config)
    optimizer = build_optimizer(method, config.optim, 32)
    batch = fixed_batch(config)
    views, labels = batch["views"], batch["label"]
    frozen = {k: v.clone() for k, v in method.state_dict().items() if k.startswith(("criterion.", "teacher_"))}
    step = 3  # fixed, so ReSSL's warm-up α and SDSSL's α are constant
    before = probe_loss(method, frozen, views, labels, step)
    # Descend the same fixed objective the probe measures: no enqueue (criterion in eval mode; MSF still enqueues
    # before its search, as it must) and no EMA step (the EMA has its own test below).
    method.criterion.eval() if hasattr(method, "criterion") else None
    for _ in range(12):
        loss, _ = method(views, labels, step)
        assert torch.isfinite(loss), f"{name}: non-finite loss"
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = probe_loss(method, frozen, views, labels, step)
    assert after < before, f"{name}: loss on a fixed batch went {before:.4f} -> {after:.4f}"


def test_teacher_is_an_ema_of_the_student():
    config = load_config("tiny_isd")
    method = build_method(config)
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    teacher_before = [p.clone() for p in method.teacher_backbone.parameters()]
    method.momentum_update(0.75)
    for t_new, t_old, s in zip(
        method.teacher_backbone.parameters(), teacher_before, method.backbone.parameters(), strict=True
    ):
        torch.testing.assert_close(t_new, 0.75 * t_old + 0.25 * s)
    assert not any(p.requires_grad for p in method.teacher_backbone.parameters())


def test_sdssl_uses_every_vit_block():
    config = load_config("tiny_sdssl")
    method = build_method(config)
    x = torch.randn(4, 3, 16, 16)
    preds, pred_only = method._layers(x)
    depth = method.backbone.depth
    assert preds.shape == (depth, 4, 32) and pred_only.shape == (depth, 4, 32)
    assert len(method.projectors) == depth and len(method.predictors) == depth
