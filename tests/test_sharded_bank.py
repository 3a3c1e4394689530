"""Sharded-bank mode under a real 2-process gloo group against a single process holding the whole bank.

Each rank keeps its own shard (uneven batch sizes: 3 and 5 rows per step) and computes ISD, ReSSL and MoCo losses of
its own rows; the oracle is the fp64 materializing reference over the concatenated shards. The merge of the per-shard
(LSE, μ) partials is exact math, so losses and gradients must agree to fp64 rounding.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from backends import STATS_BACKENDS, device_for
from ports import free_port

from fastssl import MemoryBank
from fastssl.functional import isd_loss, moco_loss, msf_loss, ressl_loss
from fastssl.ops.soft_bank_cross_entropy import soft_bank_cross_entropy as soft_bank_cross_entropy_op

WORLD = 2
DIM = 8
STEPS = 3
LOSSES = {
    "isd": lambda s, t, bank, backend: isd_loss(s, t, bank, backend=backend),
    "ressl": lambda s, t, bank, backend: ressl_loss(s, t, bank, backend=backend),
    "moco": lambda s, t, bank, backend: moco_loss(s, t, bank, backend=backend),
}


def rank_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    n = 3 + 2 * rank
    return torch.randn(n, DIM, generator=g, dtype=torch.float64), torch.randn(n, DIM, generator=g, dtype=torch.float64)


def worker(rank: int, port: int, out_dir: str, backends: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        bank = MemoryBank(7, DIM, dtype=torch.float64, init="random", sharded=True)
        records = []
        for step in range(STEPS):
            student, teacher = rank_batch(rank, step)
            shard = bank.keys.clone()
            for name, loss_fn in LOSSES.items():
                for backend in backends:
                    s = student.clone().requires_grad_()
                    loss = loss_fn(s, teacher, bank, backend)
                    loss.backward()
                    records.append((step, name, backend, shard, loss.detach(), s.grad))
            bank.enqueue(teacher)  # official order: loss first, then this rank's keys into its own shard
        # Top-k methods need the whole bank: a clear error, on every rank.
        try:
            msf_loss(student, teacher, bank, 2)
            topk_error = ""
        except ValueError as error:
            topk_error = str(error)
        # An empty shard on one rank: every rank raises instead of waiting in a collective.
        empty = MemoryBank(4, DIM, dtype=torch.float64, init="empty", sharded=True)
        if rank == 0:
            empty.enqueue(torch.randn(2, DIM, dtype=torch.float64))
        else:
            empty.enqueue(torch.randn(0, DIM, dtype=torch.float64))
        try:
            isd_loss(student, teacher, empty, backend="streaming")
            empty_error = ""
        except ValueError as error:
            empty_error = str(error)
        # A bad input on rank 1 only (wrong key width): both ranks raise, rank 0 naming the other rank.
        try:
            moco_loss(student, teacher if rank == 0 else teacher[:, :4], bank, backend="streaming")
            bad_error = ""
        except ValueError as error:
            bad_error = str(error)
        # Row counts are agreed once for x, inv_tau and pos: inv_tau rows that do not match x's on rank 1 only make
        # every rank raise (gathering them with x's counts would return a wrong LSE, or leave a rank waiting).
        from fastssl.ops.sharded_bank_softmax_stats import sharded_bank_softmax_stats

        x = torch.nn.functional.normalize(student, dim=1)
        inv_tau = torch.full((x.shape[0] if rank == 0 else 1,), 10.0, dtype=torch.float64)
        try:
            sharded_bank_softmax_stats(x, inv_tau, bank.keys, None, backend="streaming")
            rows_error = ""
        except ValueError as error:
            rows_error = str(error)
        torch.save(
            {
                "records": records,
                "topk_error": topk_error,
                "empty_error": empty_error,
                "bad_error": bad_error,
                "rows_error": rows_error,
                "shard": bank.keys.clone(),
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_sharded_losses_equal_the_whole_bank(tmp_path):
    backends = [b for b in STATS_BACKENDS if b != "triton"]  # no fp64 kernels: test_sharded_triton_fused_path
    mp.start_processes(worker, args=(free_port(), str(tmp_path), backends), nprocs=WORLD, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    per_rank = [r["records"] for r in results]
    assert len(per_rank[0]) == len(per_rank[1]) == STEPS * len(LOSSES) * len(backends)
    for rec0, rec1 in zip(*per_rank, strict=True):
        step, name, backend = rec0[:3]
        whole = torch.cat([rec0[3], rec1[3]])  # the union of the shards the losses saw at this step
        for rank, rec in enumerate((rec0, rec1)):
            student, teacher = rank_batch(rank, step)
            s = student.clone().requires_grad_()
            expected = LOSSES[name](s, teacher, whole, "reference")
            expected.backward()
            case = f"{name} {backend} step={step} rank={rank}"
            torch.testing.assert_close(rec[4], expected.detach(), rtol=1e-12, atol=1e-12, msg=case)
            torch.testing.assert_close(rec[5], s.grad, rtol=1e-10, atol=1e-12, msg=case)
    # Each shard holds only its own rank's keys: 7 random rows overwritten by 3 steps of 3 (rank 0) / 5 (rank 1) keys.
    for rank in range(WORLD):
        latest = torch.nn.functional.normalize(torch.cat([rank_batch(rank, step)[1] for step in range(STEPS)]), dim=1)
        shard = results[rank]["shard"]
        assert all(any(torch.equal(row, key) for key in latest) for row in shard[: min(7, latest.shape[0])])
        assert "sharded" in results[rank]["topk_error"]
        assert "no valid rows" in results[rank]["empty_error"]
    assert "another rank" in results[0]["bad_error"] and "has shape" in results[1]["bad_error"]
    assert all("inv_tau or pos rows do not match" in r["rows_error"] for r in results)


def test_sharded_needs_a_merging_backend():
    s, t, bank = torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="streaming"):
        soft_bank_cross_entropy_op(s, t, bank, 0.1, 0.04, backend="reference", sharded=True)


def triton_worker(rank: int, port: int, out_dir: str) -> None:
    """Each rank: fp32 embeddings against its shard of an fp32 bank (every softmax loss) and of an fp16 bank (ISD with
    both query precisions), through the Triton backend's fused path (prologue, statistics merged across ranks,
    epilogue)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        device = device_for("triton")
        torch.manual_seed(rank)
        banks = {
            dtype: MemoryBank(9, DIM, dtype=dtype, sharded=True, device=device)
            for dtype in (torch.float32, torch.float16)
        }
        student, teacher = (t.float().to(device) for t in rank_batch(rank, 0))
        cases = [(name, torch.float32, "float32") for name in LOSSES]
        cases += [("isd", torch.float16, "float32"), ("isd", torch.float16, "bank")]
        records = []
        for name, dtype, precision in cases:
            s = student.clone().requires_grad_()
            if name == "isd":
                loss = isd_loss(s, teacher, banks[dtype], backend="triton", query_precision=precision)
            else:
                loss = LOSSES[name](s, teacher, banks[dtype], "triton")
            loss.backward()
            records.append((name, dtype, precision, loss.detach().cpu(), s.grad.cpu()))
        shards = {dtype: bank.keys.cpu() for dtype, bank in banks.items()}
        torch.save({"records": records, "shards": shards}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif("triton" not in STATS_BACKENDS, reason="needs Triton (a GPU, or the interpreter)")
def test_sharded_triton_fused_path(tmp_path):
    """The fused Triton path over a sharded bank equals the fp64 reference over the union of the shards (the reference
    sees the same stored bank values and, for query_precision="bank", the same fp16-rounded queries)."""
    from fastssl.ops.soft_bank_cross_entropy import soft_bank_cross_entropy_reference
    from fastssl.ops.unit_rows import normalized_with_autograd

    mp.start_processes(triton_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for rank, result in enumerate(results):
        student, teacher = (t.float().double() for t in rank_batch(rank, 0))
        for name, dtype, precision, loss, grad in result["records"]:
            whole = torch.cat([r["shards"][dtype] for r in results]).double()
            s = student.clone().requires_grad_()
            if precision == "bank":  # fp64 inputs are never rounded: round as the fp32 path does, in fp64
                expected = soft_bank_cross_entropy_reference(
                    normalized_with_autograd(s), normalized_with_autograd(teacher), whole, 0.1, 0.01, kl=True,
                    query_dtype=torch.float16,
                )  # fmt: skip
            else:
                expected = LOSSES[name](s, teacher, whole, "reference")
            (expected_grad,) = torch.autograd.grad(expected, s)
            case = f"{name} {dtype} {precision} rank={rank}"
            if dtype == torch.float32:  # 3xTF32 logits and fp32 weights: fp32 rounding only
                loss_atol, grad_atol = 1e-5, 1e-5
            else:
                # μ carries the fp16 rounding of the softmax weights in the P·B dot (≤ 3e-4, MU_ATOL of
                # test_kernels_bank_softmax_stats): through s·μ_p/τ_s and t·μ_p/τ_t into the KL, and through
                # (μ_q − μ_p)/(τ_s·N) and the normalization's Jacobian (norm 1/‖s‖) into the gradient.
                loss_atol = 3e-4 * (1 / 0.1 + 1 / 0.01)
                grad_atol = 2 * 3e-4 / (0.1 * student.shape[0] * float(student.norm(dim=1).min()))
            torch.testing.assert_close(loss.double(), expected.detach(), rtol=0, atol=loss_atol, msg=case)
            torch.testing.assert_close(grad.double(), expected_grad, rtol=0, atol=grad_atol, msg=case)
