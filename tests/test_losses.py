"""Loss modules: each equals its functional form on the bank as it was, and enqueues in the official order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from device_reads import DeviceReads

from fastssl import MemoryBank
from fastssl.functional import byol_loss, isd_loss, moco_loss, msf_loss, nnclr_loss, ressl_loss, sdssl_loss
from fastssl.losses import BYOLLoss, ISDLoss, MoCoLoss, MSFLoss, NNCLRLoss, ReSSLLoss, SDSSLLoss


def batch(seed, n=6, d=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, requires_grad=True), torch.randn(n, d, generator=g)


@pytest.mark.parametrize(
    "module_cls,functional,enqueued",
    [(ISDLoss, isd_loss, 1), (MoCoLoss, moco_loss, 1), (NNCLRLoss, nnclr_loss, 0)],
    ids=["isd-teacher", "moco-key", "nnclr-query"],
)
def test_loss_then_enqueue(module_cls, functional, enqueued):
    torch.manual_seed(0)
    module = module_cls(16, 40, bank_dtype=torch.float32)
    for step in range(3):
        student, teacher = batch(step)
        teacher.requires_grad_()  # NNCLR's gradient flows to its second input; the others detach it
        bank_before = module.bank.keys.clone()
        loss = module(student, teacher)
        torch.testing.assert_close(loss, functional(student, teacher, bank_before))
        ptr = (6 * step) % 40
        written = (student, teacher)[enqueued].detach()
        torch.testing.assert_close(module.bank.queue[ptr : ptr + 6], F.normalize(written, dim=1))
        loss.backward()  # the in-place enqueue does not break backward


def test_eval_mode_does_not_enqueue():
    module = ISDLoss(16, 40).eval()
    before = module.bank.queue.clone()
    module(*batch(0))
    assert torch.equal(module.bank.queue, before)


def test_msf_enqueues_before_search_and_records_purity():
    module = MSFLoss(16, 30, k=1, bank_dtype=torch.float32, store_labels=True)
    query, target = batch(1)
    labels = torch.arange(6)
    loss = module(query, target, labels)
    torch.testing.assert_close(loss, byol_loss(query, target))  # k=1 finds the target itself
    assert module.last_purity.item() == 1.0  # its own label
    module.k = 3
    query, target = batch(2)
    bank_after = module.bank.keys.clone()
    bank_after[6:12] = F.normalize(target, dim=1)
    torch.testing.assert_close(module(query, target), msf_loss(query, target, bank_after, 3))


def test_msf_loss_and_purity_share_one_search(monkeypatch):
    """The loss module searches the bank once per step (the official code reuses its nn_index for purity); the loss
    and purity equal the functional versions that each search on their own."""
    import fastssl.losses.msf as msf_module
    from fastssl.functional import mean_shift_purity

    calls = []
    search = msf_module.bank_topk
    monkeypatch.setattr(msf_module, "bank_topk", lambda *a, **kw: calls.append(1) or search(*a, **kw))
    module = MSFLoss(16, 30, k=3, bank_dtype=torch.float32, store_labels=True)
    module.bank.enqueue(torch.randn(24, 16), torch.randint(0, 4, (24,)))
    query, target = batch(4)
    labels = torch.randint(0, 4, (6,), generator=torch.Generator().manual_seed(1))
    loss = module(query, target, labels)
    assert len(calls) == 1
    torch.testing.assert_close(loss, msf_loss(query, target, module.bank, 3))
    torch.testing.assert_close(module.last_purity, mean_shift_purity(target, labels, module.bank, 3))
    with pytest.raises(ValueError, match="index must be int64"):
        msf_loss(query, target, module.bank, 3, index=torch.zeros(6, 2, dtype=torch.int64))


def test_ressl_warmup_mixes_infonce_and_relation():
    torch.manual_seed(3)
    module = ReSSLLoss(16, 50, warmup_steps=4, bank_dtype=torch.float32)
    for step in range(6):
        student, teacher = batch(10 + step)
        bank_before = module.bank.keys.clone()
        alpha = min(step / 4, 1.0)
        expected = alpha * ressl_loss(student, teacher, bank_before) + (1 - alpha) * moco_loss(
            student, teacher, bank_before
        )
        torch.testing.assert_close(module(student, teacher), expected)
    assert int(module.step) == 6
    assert "step" in module.state_dict() and "bank.queue" in module.state_dict()


def test_byol_module():
    online, target = batch(4)
    assert torch.equal(BYOLLoss()(online, target), byol_loss(online, target))


def test_module_accepts_a_shared_bank():
    bank = MemoryBank(20, 16)
    module = MoCoLoss(bank=bank)
    assert module.bank is bank
    with pytest.raises(ValueError, match="dim"):
        MoCoLoss(8, bank=bank)
    with pytest.raises(ValueError, match="either dim"):
        MoCoLoss()


def test_nnclr_closed_form():
    """Support set = the queries themselves: NN(z) = z, so the loss is plain InfoNCE between z and p."""
    torch.manual_seed(5)
    z, p = torch.randn(5, 8), torch.randn(5, 8, requires_grad=True)
    loss = nnclr_loss(z, p, F.normalize(z, dim=1), tau=0.1)
    logits = F.normalize(z, dim=1) @ F.normalize(p, dim=1).T / 0.1
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.arange(5)))
    (g,) = torch.autograd.grad(loss, p)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_ressl_multicrop_averages_crops_and_enqueues_once():
    torch.manual_seed(6)
    module = ReSSLLoss(16, 50, bank_dtype=torch.float32)
    crops = [batch(20 + i)[0] for i in range(3)]
    teacher = batch(30)[1]
    bank_before = module.bank.keys.clone()
    loss = module(crops, teacher)
    expected = sum(ressl_loss(c, teacher, bank_before) for c in crops) / 3
    torch.testing.assert_close(loss, expected)
    assert int(module.bank.ptr) == 6 and int(module.step) == 1


def test_nnclr_symmetric_enqueues_the_first_view_once():
    torch.manual_seed(7)
    module = NNCLRLoss(16, 40, bank_dtype=torch.float32)
    (z1, p2), (z2, p1) = batch(40), batch(41)
    support = module.bank.keys.clone()
    loss = module(z1, p2, z2, p1)
    torch.testing.assert_close(loss, nnclr_loss(z1, p2, support) + nnclr_loss(z2, p1, support))
    assert int(module.bank.ptr) == 6
    torch.testing.assert_close(module.bank.queue[:6], F.normalize(z1.detach(), dim=1))


@pytest.mark.parametrize("value_checks", ["immediate", "deferred"])
@pytest.mark.parametrize("module_cls", [MoCoLoss, ISDLoss, MSFLoss, ReSSLLoss])
def test_loss_step_reads_no_scalars_from_the_device(module_cls, value_checks):
    """Loss, backward and enqueue never read a scalar back (the bank keeps host copies of its pointer and count). The
    enqueue's value validation is one batched tolist per call in the immediate mode and none in the deferred mode
    the trainer uses (it reads the checks a step later)."""
    module = module_cls(16, 64, bank_dtype=torch.float32, backend="streaming")
    module.bank.value_checks = value_checks
    query, target = batch(7)
    with DeviceReads() as reads:
        for _ in range(2):
            module(query, target).backward()
    assert (reads.scalars, reads.tolist) == (0, 2 if value_checks == "immediate" else 0)
    assert len(module.bank) == 64 and int(module.bank.ptr) == (64 * 0 + 12) % 64  # host copies match the buffers


@pytest.mark.parametrize(
    "query,target,match",
    [
        (torch.randn(4, 4), torch.randn(4, 8), r"target has shape \(4, 8\) but query has shape \(4, 4\)"),
        (torch.randn(4, 8), torch.randn(5, 8), r"target has shape \(5, 8\)"),
        (torch.randn(4, 8), torch.full((4, 8), float("nan")), r"keys contain NaN or inf"),
    ],
)
def test_msf_rejected_call_leaves_the_bank_unchanged(query, target, match):
    """MSF enqueues its targets before the search, so a bad call must be refused before the write."""
    module = MSFLoss(8, 16, k=3, backend="streaming")
    before = {name: buf.clone() for name, buf in module.bank.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        module(query, target)
    for name, buf in module.bank.state_dict().items():
        assert torch.equal(buf, before[name]), name


@pytest.mark.parametrize("kwargs,match", [({"k": 17}, r"k must be an int in \[1, 16\]"), ({"backend": "x"}, "backend")])
def test_msf_module_checks_its_settings_when_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MSFLoss(8, 16, **kwargs)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: ISDLoss(8, 16, tau_teacher=0.0), "tau_teacher must be a positive finite temperature"),
        (lambda: ISDLoss(8, 16, backend="cuda"), "backend must be one of"),
        (lambda: MoCoLoss(8, 16, tau=float("nan")), "tau must be a positive finite temperature"),
        (lambda: ReSSLLoss(8, 16, tau_infonce=-1.0), "tau_infonce must be a positive finite temperature"),
        (lambda: ReSSLLoss(8, 16, warmup_steps=-3), "warmup_steps must be >= 0"),
        (lambda: NNCLRLoss(8, 16, backend="fast"), "backend must be one of"),
        (lambda: SDSSLLoss(10, 1.0, method="simclr"), "method must be one of"),
        (lambda: SDSSLLoss(10, float("nan")), "ratio"),
        (lambda: SDSSLLoss(0, 0.5), r"total_steps .* must be a positive int, got 0"),
    ],
)
def test_modules_check_their_settings_when_built(build, match):
    """A bad temperature, backend or schedule fails when the module is built, not at its first forward."""
    with pytest.raises(ValueError, match=match):
        build()


def test_msf_refuses_k_beyond_the_rows_the_bank_would_hold_before_writing():
    """An init='empty' bank with fewer valid rows after this batch's enqueue than k: refused before the enqueue,
    so the bank stays empty (it used to keep the batch while the search refused)."""
    module = MSFLoss(bank=MemoryBank(16, 4, init="empty"), k=5, backend="streaming")
    with pytest.raises(ValueError, match=r"k=5 neighbours, but the bank would hold only 2 valid rows .* unchanged"):
        module(torch.randn(2, 4), torch.randn(2, 4))
    assert len(module.bank) == 0 and int(module.bank.ptr) == 0
    module(torch.randn(5, 4), torch.randn(5, 4))  # five rows after the enqueue: k = 5 is fine
    assert len(module.bank) == 5


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: isd_loss(torch.randn(4, 0), torch.randn(4, 0), torch.randn(10, 0)), ValueError, r"D = 0"),
        (lambda: byol_loss(torch.randn(4, 0), torch.randn(4, 0)), ValueError, r"D = 0"),
        (lambda: moco_loss(*batch(4), torch.randn(10, 16), tau="0.1"), TypeError, r"tau must be a number, got str"),
        (lambda: isd_loss(*batch(4), torch.randn(10, 16), tau_teacher=True), TypeError, r"tau_teacher must be a num"),
        (lambda: sdssl_loss(torch.randn(0, 4, 8), torch.randn(4, 8), alpha=0.5), ValueError, r"L, N, D ≥ 1"),
        (
            lambda: sdssl_loss(torch.randn(2, 4, 8), torch.ones(4, 8, dtype=torch.int64), alpha=0.5),
            TypeError,
            "teacher",
        ),
        (lambda: ReSSLLoss(8, 16, backend="streaming")([], torch.randn(4, 8)), ValueError, "no crops given"),
    ],
)
def test_degenerate_inputs_are_refused_instead_of_giving_a_number(call, error, match):
    """Inputs that used to return 0, 2 or NaN silently (no features, no layers), or a ZeroDivisionError (no crops),
    and temperatures given as strings or bools, now raise a clear error."""
    with pytest.raises(error, match=match):
        call()


def test_memory_bank_takes_any_integer_type_for_its_sizes():
    """Sizes computed with numpy are integers too; bools and floats are not."""
    import numpy as np

    bank = MemoryBank(np.int64(4), np.int32(3))
    assert (bank.size, bank.dim) == (4, 3) and type(bank.size) is int
    for size in (True, 4.0, 0):
        with pytest.raises(ValueError, match="size must be a positive int"):
            MemoryBank(size, 3)
