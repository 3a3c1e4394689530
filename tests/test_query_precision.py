"""query_precision="bank": queries rounded to the 16-bit bank dtype before the fused ops, against an fp64 oracle that
rounds the normalized queries the same way (and the default "float32" against one that does not)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from backends import STATS_BACKENDS, TOPK_BACKENDS, device_for

import fastssl.losses.msf as msf_module
from fastssl.functional import bank_topk, isd_loss, moco_loss, msf_loss, ressl_loss
from fastssl.losses import ISDLoss, MSFLoss
from fastssl.train.config import ConfigError, load_config


def rounded_oracle(s, t, bank, tau_s, tau_t, kl, query_dtype):
    """fp64 −Σ p log q (+ Σ p log p) with both normalized rows rounded to ``query_dtype`` first."""
    b = bank.double().cpu()
    q_s = F.normalize(s.double().cpu(), dim=1).to(query_dtype).double()
    q_t = F.normalize(t.double().cpu(), dim=1).to(query_dtype).double()
    log_q = torch.log_softmax(q_s @ b.T / tau_s, dim=1)
    log_p = torch.log_softmax(q_t @ b.T / tau_t, dim=1)
    rows = -(log_p.exp() * log_q).sum(1) + (kl * (log_p.exp() * log_p).sum(1) if kl else 0)
    return rows.mean()


def moco_oracle(q, k, bank, tau, query_dtype):
    qn = F.normalize(q.double().cpu(), dim=1).to(query_dtype).double()
    kn = F.normalize(k.double().cpu(), dim=1).to(query_dtype).double()
    logits = torch.cat([(qn * kn).sum(1, keepdim=True), qn @ bank.double().cpu().T], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))


@pytest.mark.parametrize("backend", ["reference", *STATS_BACKENDS])
@pytest.mark.parametrize("bank_dtype", [torch.float16, torch.float32], ids=str)
def test_bank_precision_queries_match_a_rounded_oracle(backend, bank_dtype):
    device = device_for(backend)
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(6, 128, generator=g), torch.randn(6, 128, generator=g)
    bank = F.normalize(torch.randn(50, 128, generator=g), dim=1).to(bank_dtype)
    # An fp32 bank keeps fp32 queries: "bank" rounds to 16-bit banks only.
    query_dtype = bank_dtype if bank_dtype != torch.float32 else torch.float32
    s_dev, t_dev, bank_dev = s.to(device).requires_grad_(), t.to(device), bank.to(device)
    cases = [
        (isd_loss, 0.1, 0.01, True),
        (ressl_loss, 0.1, 0.04, False),
    ]
    # The Triton kernel also rounds the softmax weights P to a 16-bit bank's dtype for the P·B dot (the bound derived
    # in test_soft_bank_cross_entropy.test_matches_fp64_oracle): u = 2^-11 per weight moves the loss by at most
    # u/τ_s (+ u/τ_t for the KL's entropy term); InfoNCE by u/τ.
    u = 2.0**-11 if backend == "triton" and bank_dtype == torch.float16 else 0.0
    for loss_fn, tau_s, tau_t, kl in cases:
        got = loss_fn(s_dev, t_dev, bank_dev, tau_s, tau_t, backend=backend, query_precision="bank")
        expected = rounded_oracle(s, t, bank, tau_s, tau_t, kl, query_dtype)
        # fp32 accumulation alone (u = 0) stays near 1e-6 here, so the fp16 rounding of the queries, which moves
        # these losses by 5.7e-5 and 2.3e-4 on these inputs, is resolved.
        atol = 5e-6 + u * (1 / tau_s + (1 / tau_t if kl else 0.0))
        torch.testing.assert_close(got.double().cpu(), expected, rtol=0, atol=atol)
    # InfoNCE's loss needs only the LSE (the rounded P enters μ, i.e. the gradient), so the kernel's fp16-query path
    # is checked at the same 5e-6 that resolves the 1.3e-4 the query rounding moves it by.
    got = moco_loss(s_dev, t_dev, bank_dev, 0.2, backend=backend, query_precision="bank")
    expected = moco_oracle(s, t, bank, 0.2, query_dtype)
    torch.testing.assert_close(got.double().cpu(), expected, rtol=0, atol=5e-6)


@pytest.mark.parametrize("backend", ["reference", *STATS_BACKENDS])
def test_bank_precision_gradient_is_not_rounded(backend):
    """Only the forward values are rounded: the gradient is the fp64 oracle's with a straight-through rounding, in
    the student's own fp32, not passed through fp16."""
    device = device_for(backend)
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(6, 128, generator=g), torch.randn(6, 128, generator=g)
    bank = F.normalize(torch.randn(50, 128, generator=g), dim=1).half()
    s_dev = s.to(device).requires_grad_()
    loss = isd_loss(s_dev, t.to(device), bank.to(device), backend=backend, query_precision="bank")
    (grad,) = torch.autograd.grad(loss, s_dev)
    assert grad.dtype == torch.float32
    s64 = s.double().requires_grad_()
    q = F.normalize(s64, dim=1)
    q = q + (q.detach().half().double() - q.detach())  # values rounded, gradient straight through
    b = bank.double()
    log_q = torch.log_softmax(q @ b.T / 0.1, dim=1)
    log_p = torch.log_softmax(F.normalize(t.double(), dim=1).half().double() @ b.T / 0.01, dim=1)
    (grad64,) = torch.autograd.grad((log_p.exp() * (log_p - log_q)).sum(1).mean(), s64)
    # Triton also rounds the softmax weights P to fp16 for the P·B dot: each gradient row moves by at most 2u/τ_s/N.
    u = 2.0**-11 if backend == "triton" else 0.0
    torch.testing.assert_close(grad.double().cpu(), grad64, rtol=1e-4, atol=1e-7 + 2 * u / 0.1 / 6)


def test_fp64_inputs_are_never_rounded():
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(4, 16, generator=g, dtype=torch.float64), torch.randn(4, 16, generator=g, dtype=torch.float64)
    bank = F.normalize(torch.randn(30, 16, generator=g), dim=1).half()
    fast = isd_loss(s, t, bank, backend="streaming", query_precision="bank")
    assert fast.dtype == torch.float64
    assert torch.equal(fast, isd_loss(s, t, bank, backend="streaming"))


def test_rounding_changes_the_loss_only_by_the_query_rounding():
    """fp16-rounded queries at τ_t = 0.01 move the ISD loss, but the default keeps fp32 queries (the unrounded
    oracle), and the two differ by much less than the loss itself."""
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(8, 64, generator=g), torch.randn(8, 64, generator=g)
    bank = F.normalize(torch.randn(200, 64, generator=g), dim=1).half()
    exact = rounded_oracle(s, t, bank, 0.1, 0.01, True, torch.float64)
    default = isd_loss(s, t, bank, backend="streaming")
    fast = isd_loss(s, t, bank, backend="streaming", query_precision="bank")
    torch.testing.assert_close(default.double(), exact, rtol=1e-5, atol=1e-5)
    assert not torch.equal(fast, default)
    assert abs(float(fast) - float(default)) < 0.05 * abs(float(default))


def test_bad_query_precision_is_named():
    s, t, bank = torch.randn(2, 8), torch.randn(2, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="query_precision"):
        isd_loss(s, t, bank, query_precision="half")
    with pytest.raises(ValueError, match="query_precision"):
        ISDLoss(8, 16, query_precision="half")
    with pytest.raises(ConfigError, match="method.query_precision"):
        load_config("tiny_isd", ["method.query_precision=fp16"])
    module = ISDLoss(8, 16, query_precision="bank", backend="streaming")
    bank_before = module.bank.keys.clone()  # the module enqueues t after its loss
    expected = isd_loss(s, t, bank_before, backend="streaming", query_precision="bank")
    torch.testing.assert_close(module(s, t), expected)


@pytest.mark.parametrize("backend", ["reference", *TOPK_BACKENDS])
@pytest.mark.parametrize("bank_dtype", [torch.float16, torch.float32], ids=str)
def test_bank_precision_search_matches_a_rounded_oracle(backend, bank_dtype):
    """bank_topk(query_precision="bank") ranks by the similarities of the normalized queries rounded to a 16-bit
    bank's dtype (fp32 banks: unrounded), on every backend."""
    device = device_for(backend)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(5, 64, generator=g)
    bank = F.normalize(torch.randn(60, 64, generator=g), dim=1).to(bank_dtype)
    values, index = bank_topk(q.to(device), bank.to(device), 7, backend=backend, query_precision="bank")
    rounding = torch.float16 if bank_dtype == torch.float16 else torch.float64
    sims = F.normalize(q.double(), dim=1).to(rounding).double() @ bank.double().T
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :7]
    torch.testing.assert_close(values.double().cpu(), sims.gather(1, order), rtol=0, atol=2e-6)
    assert torch.equal(index.cpu(), order)


def test_msf_search_precision_reaches_the_search(monkeypatch):
    """MSF's loss module and functional pass query_precision to their one neighbour search; the loss itself uses the
    unrounded query."""
    g = torch.Generator().manual_seed(7)
    q, t = torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g)
    bank = F.normalize(torch.randn(40, 32, generator=g), dim=1).half()
    _, index = bank_topk(t, bank, 3, backend="streaming", query_precision="bank")
    expected = msf_loss(q, t, bank, 3, index=index)
    torch.testing.assert_close(msf_loss(q, t, bank, 3, backend="streaming", query_precision="bank"), expected)
    module = MSFLoss(32, 40, k=3, backend="streaming", query_precision="bank")
    module.bank.enqueue(torch.randn(40, 32, generator=g))
    searched = []
    search = msf_module.bank_topk

    def spy(*args, **kwargs):
        searched.append(kwargs.get("query_precision"))
        return search(*args, **kwargs)

    monkeypatch.setattr(msf_module, "bank_topk", spy)
    module(q, t)
    assert searched == ["bank"]
    with pytest.raises(ValueError, match="query_precision"):
        MSFLoss(32, 40, query_precision="half")


def test_query_precision_config_only_for_methods_that_use_it():
    assert load_config("tiny_msf", ["method.query_precision=bank"]).method.query_precision == "bank"
    with pytest.raises(ConfigError, match="method.query_precision: only .*byol would ignore it"):
        load_config("tiny_byol", ["method.query_precision=bank"])
