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


def test_sincos_position_embedding_closed_form():
    from fastssl.backbones import sincos_position_embedding_2d

    table = sincos_position_embedding_2d(3, 4, 8)  # 2 frequencies: 1 and 10000^(-1/2)
    assert table.shape == (1, 12, 8)
    i, j = 2, 3  # patch (row 2, column 3) is token 2·4 + 3
    omega = torch.tensor([1.0, 0.01])
    expected = torch.cat([(i * omega).sin(), (i * omega).cos(), (j * omega).sin(), (j * omega).cos()])
    torch.testing.assert_close(table[0, 11], expected)


def test_sdssl_mocov3_heads_and_vit_stem():
    """SDSSL Sec. 4.1 on the tiny ViT: 3-layer projectors, narrower for the intermediate blocks, with an affine-free
    output BN; 2-layer predictors; a fixed sin-cos position embedding and a frozen patch projection that the optimizer
    never sees and a training step leaves unchanged."""
    from torch import nn

    from fastssl.backbones import sincos_position_embedding_2d

    config = load_config(
        "tiny_sdssl",
        [
            "model.projector=[64,64,32]",
            "model.layer_projector=[48,48,32]",
            "model.projector_out_bn=true",
            "model.vit_mocov3=true",
        ],
    )
    method = build_method(config)

    def widths(head):
        return [m.out_features for m in head if isinstance(m, nn.Linear)]

    assert widths(method.projectors[0]) == [64, 64, 32]
    assert all(widths(p) == [48, 48, 32] for p in method.projectors[1:])
    assert all(widths(p) == [64, 32] for p in method.predictors)
    for head in method.projectors:
        assert isinstance(head[-1], nn.BatchNorm1d) and not head[-1].affine and head[-2].bias is None
    vit = method.backbone.vit
    table = sincos_position_embedding_2d(4, 4, 64)
    torch.testing.assert_close(vit.pos_embed, torch.cat([torch.zeros(1, 1, 64), table], dim=1))
    frozen = [vit.pos_embed, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias]
    assert not any(p.requires_grad for p in frozen)
    bound = (6 / (3 * 4 * 4 + 64)) ** 0.5
    assert vit.patch_embed.proj.weight.abs().max() <= bound and vit.patch_embed.proj.weight.std() > bound / 3
    optimizer = build_optimizer(method, config.optim, 32)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in in_optimizer for p in frozen)
    before = [p.clone() for p in frozen]
    batch = fixed_batch(config)
    loss, _ = method.loss(batch["views"], batch["label"], 0)
    loss.backward()
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(frozen, before, strict=True))


def test_lr_and_momentum_schedules_closed_form():
    """Warm-up is linear to the base lr, cosine halves it at mid-run and ends at 0, the step schedule multiplies by
    γ at each milestone; the lr scales linearly with the global batch; BYOL's momentum rises from m to 1."""
    from fastssl.train.config import MethodConfig, OptimConfig
    from fastssl.train.optim import lr_at, momentum_at, parameter_groups, scaled_lr

    assert scaled_lr(OptimConfig(lr=0.6, base_batch=256), 1024) == pytest.approx(2.4)
    cosine = OptimConfig(warmup_steps=10, schedule="cosine")
    assert [lr_at(s, 110, 1.0, cosine) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(60, 110, 1.0, cosine) == pytest.approx(0.5) and lr_at(110, 110, 1.0, cosine) == pytest.approx(0.0)
    step = OptimConfig(schedule="step", milestones=[0.5, 0.75], gamma=0.2)
    assert [lr_at(s, 100, 1.0, step) for s in (49, 50, 74, 75, 99)] == pytest.approx([1, 0.2, 0.2, 0.04, 0.04])
    cos_m = MethodConfig(momentum=0.996, momentum_schedule="cosine")
    assert [momentum_at(s, 100, cos_m) for s in (0, 50, 100)] == pytest.approx([0.996, 0.998, 1.0])
    assert momentum_at(70, 100, MethodConfig(momentum=0.99)) == 0.99
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    decay, no_decay = parameter_groups(model, exclude_bn_bias=True, weight_decay=1e-4)
    assert [p.shape for p in decay["params"]] == [(3, 4)] and decay["weight_decay"] == 1e-4
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
