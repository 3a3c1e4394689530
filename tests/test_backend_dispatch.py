"""Backend selection and torch.compile compatibility of the bank ops."""

from __future__ import annotations

import pytest
import torch

import fastssl.ops.backend as backend_module
from fastssl.functional import isd_loss, moco_loss
from fastssl.ops.backend import resolve_backend


def test_auto_picks_streaming_on_cpu():
    assert resolve_backend("auto", torch.zeros(1)) == "streaming"


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("fast", torch.zeros(1))


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(backend_module, "triton_available", lambda: True)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.zeros(1))


def test_triton_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backend_module, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"fastssl\[triton\]|\.\[triton\]"):
        resolve_backend("triton", torch.zeros(1))


def test_triton_rejects_fp64(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backend_module, "triton_available", lambda: True)
    with pytest.raises(TypeError, match="float64"):
        resolve_backend("triton", torch.zeros(1, dtype=torch.float64))


@pytest.mark.parametrize("loss_fn", [isd_loss, moco_loss], ids=["isd", "moco"])
def test_compiled_training_step_matches_eager(loss_fn):
    """A user's torch.compile'd step traces through the autograd.Function and the registered custom op."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 8)
    x, teacher = torch.randn(5, 8), torch.randn(5, 8)
    bank = torch.nn.functional.normalize(torch.randn(30, 8), dim=1)

    def step(inp):
        loss = loss_fn(head(inp), teacher, bank, backend="streaming")
        loss.backward()
        return loss

    eager = step(x)
    eager_grad = head.weight.grad.clone()
    head.weight.grad = None
    compiled = torch.compile(step, backend="aot_eager", fullgraph=False)(x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(head.weight.grad, eager_grad)


def test_auto_falls_back_to_streaming_where_the_kernels_do_not_serve(monkeypatch):
    from fastssl.ops import backend as b

    monkeypatch.setattr(b, "triton_available", lambda: True)

    class FakeCuda(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    wide_fp32 = torch.zeros(4, 256).as_subclass(FakeCuda)
    narrow_fp16 = torch.zeros(4, 256, dtype=torch.float16).as_subclass(FakeCuda)
    assert not b.triton_serves(wide_fp32) and b.triton_serves(narrow_fp16)
    assert not b.triton_serves(narrow_fp16, k=257) and b.triton_serves(narrow_fp16, k=256)
    assert resolve_backend("auto", narrow_fp16, triton_ok=b.triton_serves(narrow_fp16)) == "triton"
    assert resolve_backend("auto", wide_fp32, triton_ok=b.triton_serves(wide_fp32)) == "streaming"


def test_compiled_msf_step_matches_eager():
    """MSF's top-k is a registered custom op too, so a compiled step with a bank search traces."""
    from fastssl.functional import msf_loss

    torch.manual_seed(1)
    head = torch.nn.Linear(8, 8)
    x, target = torch.randn(5, 8), torch.randn(5, 8)
    bank = torch.cat([torch.nn.functional.normalize(target, dim=1), torch.randn(20, 8)])

    def step(inp):
        loss = msf_loss(head(inp), target, bank, k=3, backend="streaming")
        loss.backward()
        return loss

    eager = step(x)
    eager_grad = head.weight.grad.clone()
    head.weight.grad = None
    compiled = torch.compile(step, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(head.weight.grad, eager_grad)


@pytest.mark.parametrize("op", ["isd", "moco", "topk"])
def test_triton_on_cpu_refuses_a_bf16_bank_instead_of_returning_wrong_values(monkeypatch, op):
    """Triton's interpreter computes bf16 tl.dot wrongly (triton#11584): a CPU call with a bf16 bank would return
    garbage silently (losses off by 1e11, wrong neighbours), so it is refused; fp16 banks still run."""
    from fastssl.functional import bank_topk

    if torch.cuda.is_available():
        pytest.skip("CPU-interpreter behaviour; on a GPU bf16 banks run compiled")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backend_module, "triton_available", lambda: True)
    s, t = torch.randn(4, 16), torch.randn(4, 16)
    bank = torch.nn.functional.normalize(torch.randn(32, 16), dim=1).bfloat16()
    calls = {
        "isd": lambda: isd_loss(s, t, bank, backend="triton"),
        "moco": lambda: moco_loss(s, t, bank, backend="triton"),
        "topk": lambda: bank_topk(t, bank, 3, backend="triton"),
    }
    with pytest.raises(TypeError, match=r"bf16 bank.*triton#11584"):
        calls[op]()
