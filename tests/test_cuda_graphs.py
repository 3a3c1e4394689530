"""CUDA-graph capture: the Triton-backend losses (forward and backward) and the top-k search replay like eager calls.

A training loop that captures its step in a CUDA graph (to drop Python and launch overhead) needs every op in it to be
capturable: no device-to-host read, no host-side value baked into the graph. The oracle is the eager call: after the
capture the inputs are overwritten in place, and each replay must reproduce, bit for bit, the eager call on the new
values (same kernels, same launch configs, deterministic split merges). ``MemoryBank.enqueue`` keeps its ring pointer
on the host, so it refuses to be captured instead of silently writing the same rows on every replay.

GPU only; ``benchmarks/gpu_check.py`` runs this file.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from fastssl import MemoryBank
from fastssl.functional import bank_topk, isd_loss, moco_loss, ressl_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

N, K, D = 64, 5000, 128
LOSSES = {
    "moco": lambda s, t, bank, qp: moco_loss(s, t, bank, 0.2, backend="triton", query_precision=qp),
    "isd": lambda s, t, bank, qp: isd_loss(s, t, bank, backend="triton", query_precision=qp),
    "ressl": lambda s, t, bank, qp: ressl_loss(s, t, bank, backend="triton", query_precision=qp),
}


def capture(step: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
    """Warm ``step`` up on a side stream (compilation and caches must precede a capture), then capture it once."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def unit_bank(gen: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(K, D, generator=gen, device="cuda"), dim=1).half()


@pytest.mark.parametrize("query_precision", ["float32", "bank"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_loss_forward_and_backward_replay_equals_eager(loss: str, query_precision: str) -> None:
    fn = LOSSES[loss]
    gen = torch.Generator(device="cuda").manual_seed(0)
    bank = unit_bank(gen)
    student = torch.randn(N, D, generator=gen, device="cuda", requires_grad=True)
    teacher = torch.randn(N, D, generator=gen, device="cuda")

    def step() -> torch.Tensor:
        student.grad = None
        value = fn(student, teacher, bank, query_precision)
        value.backward()
        return value

    graph, value = capture(step)
    for _ in range(2):  # new values in the captured input buffers; the replay must follow them
        with torch.no_grad():
            student.copy_(torch.randn(N, D, generator=gen, device="cuda"))
            teacher.copy_(torch.randn(N, D, generator=gen, device="cuda"))
            bank.copy_(unit_bank(gen))
        graph.replay()
        torch.cuda.synchronize()
        eager_student = student.detach().clone().requires_grad_()
        eager = fn(eager_student, teacher, bank, query_precision)
        eager.backward()
        assert torch.equal(value, eager.detach())
        assert torch.equal(student.grad, eager_student.grad)


@pytest.mark.parametrize("k", [1, 10, 64])
@pytest.mark.parametrize("algorithm", ["one_pass", "two_pass"])
def test_topk_replay_equals_eager(algorithm: str, k: int) -> None:
    from fastssl.kernels.bank_topk import bank_topk as launch

    gen = torch.Generator(device="cuda").manual_seed(1)
    bank = unit_bank(gen)
    query = F.normalize(torch.randn(N, D, generator=gen, device="cuda"), dim=1)
    graph, (values, indices) = capture(lambda: launch(query, bank, k, algorithm=algorithm))
    for _ in range(2):
        query.copy_(F.normalize(torch.randn(N, D, generator=gen, device="cuda"), dim=1))
        bank.copy_(unit_bank(gen))
        graph.replay()
        torch.cuda.synchronize()
        eager_values, eager_indices = launch(query, bank, k, algorithm=algorithm)
        assert torch.equal(values, eager_values)
        assert torch.equal(indices, eager_indices)


def test_functional_topk_replay_equals_eager() -> None:
    gen = torch.Generator(device="cuda").manual_seed(2)
    bank = unit_bank(gen)
    query = torch.randn(N, D, generator=gen, device="cuda")
    graph, (values, indices) = capture(lambda: bank_topk(query, bank, 5, backend="triton"))
    query.copy_(torch.randn(N, D, generator=gen, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    eager_values, eager_indices = bank_topk(query, bank, 5, backend="triton")
    assert torch.equal(values, eager_values)
    assert torch.equal(indices, eager_indices)


def test_enqueue_refuses_capture_and_leaves_the_bank_unchanged() -> None:
    bank = MemoryBank(32, 8, device="cuda")
    keys = torch.randn(4, 8, device="cuda")
    before = {name: buf.clone() for name, buf in bank.state_dict().items()}
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            bank.enqueue(keys)
    torch.cuda.synchronize()
    for name, buf in bank.state_dict().items():
        assert torch.equal(buf, before[name]), name
    bank.enqueue(keys)  # outside a capture it still works
    assert len(bank) == 32 and int(bank.ptr) == 4
