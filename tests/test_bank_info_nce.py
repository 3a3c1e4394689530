"""MoCo InfoNCE against the bank: backends vs the fp64 oracle, gradcheck, closed form log(K+1), official formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from backends import STATS_BACKENDS
from conftest import DEVICE

import fastssl.ops.bank_softmax_stats as stats_module
from fastssl import MemoryBank
from fastssl.functional import moco_loss


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(stats_module, "DEFAULT_CHUNK", 7)


def make(n, k, d, *, dtype=torch.float32, bank_dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()
    key = torch.randn(n, d, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    bank = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1).to(DEVICE, bank_dtype)
    return q, key, bank


def official_moco(q, key, bank, tau):
    """MoCo builder.py in fp64: logits = cat([q·k, q·queue]) / T, CrossEntropy with label 0 (per row)."""
    qn, kn = F.normalize(q.double().cpu(), dim=1), F.normalize(key.detach().double().cpu(), dim=1)
    l_pos = torch.einsum("nc,nc->n", qn, kn)[:, None]
    l_neg = torch.einsum("nc,kc->nk", qn, bank.double().cpu())
    logits = torch.cat([l_pos, l_neg], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long), reduction="none")


@pytest.mark.parametrize("backend", ["reference", "streaming"])
def test_gradcheck_fp64(backend, small_chunks):
    q, key, bank = make(5, 23, 8, dtype=torch.float64, bank_dtype=torch.float64)
    torch.autograd.gradcheck(lambda x: moco_loss(x, key, bank, 0.2, backend=backend), (q,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", STATS_BACKENDS)
@pytest.mark.parametrize("n,k,d", [(1, 1, 16), (5, 23, 16), (13, 50, 64), (9, 31, 128)])
@pytest.mark.parametrize("dtype,bank_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16)])
@pytest.mark.parametrize("tau", [0.2, 0.05])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_official_moco_in_fp64(backend, n, k, d, dtype, bank_dtype, tau, reduction, small_chunks):
    q, key, bank = make(n, k, d, dtype=dtype, bank_dtype=bank_dtype, seed=n + k + d)
    loss = moco_loss(q, key, bank, tau, reduction=reduction, backend=backend)
    rows = official_moco(q.detach(), key, bank, tau)
    torch.testing.assert_close(loss.double().cpu(), rows.mean() if reduction == "mean" else rows, rtol=2e-4, atol=1e-4)
    grad_out = torch.tensor(0.7, dtype=torch.float64) if reduction == "mean" else torch.linspace(-1, 2, n).double()
    (g,) = torch.autograd.grad(loss, q, grad_out.to(loss.device, loss.dtype))
    q64 = q.detach().double().cpu().requires_grad_()
    rows64 = official_moco(q64, key, bank, tau)
    (g64,) = torch.autograd.grad(rows64.mean() if reduction == "mean" else rows64, q64, grad_out)
    tol = 2e-3 if dtype == torch.float16 else 2e-4
    torch.testing.assert_close(g.double().cpu(), g64, rtol=tol, atol=tol / 10)


@pytest.mark.parametrize("backend", ["reference", *STATS_BACKENDS])
def test_equal_similarities_give_log_k_plus_one(backend):
    """q orthogonal to its key and every negative: all K+1 logits are 0, so InfoNCE = log(K+1)."""
    d, k = 16, 41
    q = torch.zeros(4, d, device=DEVICE)
    q[:, 0] = 1
    key = torch.randn(4, d, device=DEVICE)
    key[:, 0] = 0
    bank = torch.randn(k, d, device=DEVICE)
    bank[:, 0] = 0
    loss = moco_loss(q, key, F.normalize(bank, dim=1), 0.2, backend=backend)
    torch.testing.assert_close(loss.item(), math.log(k + 1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", *STATS_BACKENDS])
def test_key_and_bank_get_no_gradient_and_enqueue_before_backward_is_safe(backend):
    if backend == "triton" and not torch.cuda.is_available():
        pass  # the interpreter runs it too
    torch.manual_seed(0)
    bank = MemoryBank(30, 8, dtype=torch.float32, device=DEVICE)
    q = torch.randn(5, 8, device=DEVICE, requires_grad=True)
    key = torch.randn(5, 8, device=DEVICE, requires_grad=True)
    loss = moco_loss(q, key, bank, backend=backend)
    expected = torch.autograd.grad(moco_loss(q, key, bank, backend=backend), q)[0]
    bank.enqueue(key.detach())
    gq, gk = torch.autograd.grad(loss, (q, key), allow_unused=True)
    assert gk is None
    torch.testing.assert_close(gq, expected)
