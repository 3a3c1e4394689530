"""Mixed precision in the trainer: the forward runs under autocast in the configured dtype, fp16 scales the loss with a
GradScaler whose state is checkpointed, and both train with finite losses."""

from __future__ import annotations

import pytest
import torch

from fastssl.train.checkpoint import latest_checkpoint, load_checkpoint
from fastssl.train.config import load_config
from fastssl.train.trainer import Trainer


@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_runs_the_forward_under_autocast(tmp_path, amp, dtype):
    trainer = Trainer(load_config("tiny_isd", [f"run.out_dir={tmp_path}", "run.max_steps=3", f"run.amp={amp}"]))
    seen = []
    real_loss = trainer.method.loss

    device = trainer.ctx.device.type  # cuda on a GPU machine

    def spy(views, labels, step):
        seen.append((torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)))
        return real_loss(views, labels, step)

    trainer.method.loss = spy
    result = trainer.fit()
    assert seen == [(True, dtype)] * 3
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    scaler = load_checkpoint(latest_checkpoint(tmp_path / "tiny_isd" / "checkpoints"))["scaler"]
    assert bool(scaler) == (amp == "fp16")  # fp16 checkpoints the loss scale, bf16 needs none
    if amp == "fp16":
        assert scaler["scale"] > 0


def test_no_amp_runs_in_fp32(tmp_path):
    trainer = Trainer(load_config("tiny_isd", [f"run.out_dir={tmp_path}", "run.max_steps=1"]))
    seen = []
    real_loss = trainer.method.loss

    device = trainer.ctx.device.type

    def spy(views, labels, step):
        seen.append(torch.is_autocast_enabled(device))
        return real_loss(views, labels, step)

    trainer.method.loss = spy
    trainer.fit()
    assert seen == [False]


@pytest.mark.parametrize("name,optimizer,reads", [("sdssl", "adamw", 0), ("mocov2", "sgd", 1), ("mocov2", "lars", 1)])
def test_fp16_step_reads_its_inf_check_only_without_a_fused_optimizer(tmp_path, name, optimizer, reads):
    """Under fp16 AMP the trainer's AdamW is fused: GradScaler hands it ``found_inf`` as a device tensor, so a step
    reads nothing back. SGD (never fused, see the next test) and timm's LARS read the inf check once per step."""
    from device_reads import DeviceReads

    overrides = [f"run.out_dir={tmp_path}", "run.amp=fp16", f"optim.name={optimizer}"]
    trainer = Trainer(load_config(f"tiny_{name}", overrides))
    assert getattr(trainer.optimizer, "_step_supports_amp_scaling", False) == (reads == 0)
    batches = iter(trainer.loader)
    counted = []
    for _ in range(3):
        batch = next(batches)
        host = tuple(state["step"] for state in trainer.optimizer.state.values() if "step" in state)
        with DeviceReads(host) as device_reads:
            readback = trainer.train_step(batch)
        trainer.global_step += 1
        counted.append(device_reads.scalars + device_reads.tolist)
        assert torch.isfinite(torch.tensor(trainer.finish(readback).loss))
    assert counted[1:] == [reads, reads]


def _scaled_step(scaler: torch.amp.GradScaler, optimizer, weight: torch.nn.Parameter, g: torch.Tensor) -> None:
    """One optimizer step under the scaler whose gradient is g (times the scale, a power of two: exact)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale((weight * g).sum()).backward()
    scaler.step(optimizer)
    scaler.update()


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_an_overflow_step_leaves_no_trace_in_the_trainers_optimizers(name):
    """fp16's usual first-step overflow is skipped without a trace: the optimizer state holds nothing from it, and one
    finite step after it gives the closed-form first update (fp64 oracle). SGD with weight decay λ: w ← w − η(g + λw).
    AdamW: m̂ = g, v̂ = g², w ← w(1 − ηλ) − η·g/(|g| + ε). Fused SGD fails this: it leaves an uninitialized momentum
    buffer behind the skipped step and uses it in the next, which is why the trainer never fuses SGD."""
    from fastssl.train.config import OptimConfig
    from fastssl.train.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3, bias=False)
    optim = OptimConfig(name=name, lr=0.1, momentum=0.9, weight_decay=1e-2, exclude_bn_bias=False, base_batch=256)
    optimizer = build_optimizer(model, optim, 256, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    w0 = model.weight.detach().double().clone()

    _scaled_step(scaler, optimizer, model.weight, torch.full((3, 5), float("inf")))
    assert scaler.get_scale() == 512.0
    assert torch.equal(model.weight.detach().double(), w0)
    state = optimizer.state[model.weight]
    if name == "sgd":
        assert "momentum_buffer" not in state
    else:  # a fused AdamW creates its state before the kernel skips the step: it must be the initial state
        assert float(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()

    g = torch.randn(3, 5)
    _scaled_step(scaler, optimizer, model.weight, g)
    g64 = g.double()
    if name == "sgd":
        expected = w0 - 0.1 * (g64 + 1e-2 * w0)
    else:
        expected = w0 * (1 - 0.1 * 1e-2) - 0.1 * g64 / (g64.abs() + 1e-8)
    torch.testing.assert_close(model.weight.detach().double(), expected, rtol=0, atol=1e-6)
