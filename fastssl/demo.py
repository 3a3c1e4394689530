"""``fastssl demo``: the bank losses on random data, reference vs streaming (vs Triton on a GPU), side by side.

Shows the two things fastssl promises: the same loss and gradient as the materializing code of the official repos,
without its (N, K) logit matrices.
"""

from __future__ import annotations

import argparse
import time

import torch

from fastssl import MemoryBank
from fastssl.functional import isd_loss, moco_loss, msf_loss, ressl_loss
from fastssl.ops.backend import resolve_backend


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=256, help="queries N")
    parser.add_argument("--bank", type=int, default=65_536, help="bank rows K")
    parser.add_argument("--dim", type=int, default=128, help="embedding dim D")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)


def _run(loss_fn, student, teacher, bank, backend):
    student = student.detach().requires_grad_()
    start = time.perf_counter()
    loss = loss_fn(student, teacher, bank, backend=backend)
    loss.backward()
    if student.is_cuda:
        torch.cuda.synchronize()
    return loss.item(), student.grad, (time.perf_counter() - start) * 1e3


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    bank = MemoryBank(args.bank, args.dim, device=device)  # fp16, random unit rows
    student = torch.randn(args.batch, args.dim, device=device)
    teacher = student + 0.5 * torch.randn_like(student)
    backends = ["reference", "streaming"] + (["triton"] if resolve_backend("auto", student) == "triton" else [])
    logits_mb = 2 * args.batch * args.bank * 4 / 2**20
    print(f"fastssl demo: N={args.batch} queries, K={args.bank} fp16 bank rows, D={args.dim}, device={device}")
    print(
        f"the reference materializes two {args.batch}x{args.bank} fp32 logit matrices ({logits_mb:.0f} MB); "
        "the other backends never do\n"
    )
    header = f"{'loss':<6} {'backend':<10} {'value':>12} {'|grad - ref|max':>16} {'ms':>9}"
    print(header)
    print("-" * len(header))
    losses = {"ISD": isd_loss, "ReSSL": ressl_loss, "MoCo": moco_loss}
    for name, loss_fn in losses.items():
        results = {b: _run(loss_fn, student, teacher, bank, b) for b in backends}
        ref_grad = results["reference"][1]
        for backend, (value, grad, ms) in results.items():
            diff = (grad - ref_grad).abs().max().item()
            print(f"{name:<6} {backend:<10} {value:>12.6f} {diff:>16.2e} {ms:>9.1f}")
    bank.enqueue(teacher)  # MSF searches a bank that already holds the batch's targets
    for backend in backends:
        value, _, ms = _run(
            lambda s, t, b, backend: msf_loss(s, t, b, 5, backend=backend), student, teacher, bank, backend
        )
        print(f"{'MSF':<6} {backend:<10} {value:>12.6f} {'':>16} {ms:>9.1f}")
    return 0
