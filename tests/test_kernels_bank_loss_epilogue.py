"""fastssl.kernels.bank_loss_epilogue against its closed form in fp64 (module docstring), for InfoNCE, soft CE and
the KL variant, with and without rounding the query values to fp16; the loss-level tests (test_bank_info_nce,
test_soft_bank_cross_entropy, test_query_precision) check the composed ops against the materializing references.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from conftest import CUDA  # noqa: E402 - conftest has set TRITON_INTERPRET=1 on CPU machines before this import
from fastssl.kernels.bank_loss_epilogue import bank_loss_epilogue  # noqa: E402

from fastssl.functional import moco_loss, soft_bank_cross_entropy  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = (["cpu"] if INTERPRET else []) + (["cuda"] if CUDA else [])
EPS = 1e-12


def oracle(x_hat, norm, lse, mu, beta_a, beta_b, c, *, soft_ce, kl, round_dtype):
    """(loss (N,), grad (N, D)) in fp64, written out from the module docstring."""
    x_hat, norm, lse, mu = (t.double().cpu() for t in (x_hat, norm, lse, mu))
    n = x_hat.shape[0] // 2
    rho = (lambda t: t.to(round_dtype).double()) if round_dtype is not None else (lambda t: t)
    a, b = x_hat[:n], x_hat[n:]
    v = mu[n:] if soft_ce else rho(b)
    loss = lse[:n] - beta_a * (rho(a) * v).sum(1)
    if soft_ce and kl:
        loss = loss - (lse[n:] - beta_b * (rho(b) * v).sum(1))
    g = (mu[:n] - v) * c
    radial = torch.where(norm[:n] >= EPS, (g * a).sum(1), 0.0)
    grad = (g - a * radial[:, None]) / norm[:n].clamp_min(EPS)[:, None]
    return loss, grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("soft_ce,kl", [(False, False), (True, False), (True, True)], ids=["infonce", "ce", "kl"])
@pytest.mark.parametrize("round_dtype", [None, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n,d", [(5, 40), (70, 16)])
def test_matches_closed_form(device: str, soft_ce: bool, kl: bool, round_dtype, n: int, d: int) -> None:
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(2 * n, d, generator=gen, dtype=torch.float64)
    raw[1] = 0.0  # a zero row: x̂ = 0, gradient g / ε
    raw[2] *= 1e-14  # ‖x‖ < ε: x̂ = x/ε is not a unit vector and the clamp, not the norm, gets differentiated
    norm = raw.norm(dim=1)
    x_hat = F.normalize(raw, dim=1)
    rows = 2 * n if soft_ce else n
    lse = torch.randn(rows, generator=gen, dtype=torch.float64) + 5
    mu = torch.randn(rows, d, generator=gen, dtype=torch.float64) * 0.1
    args = [t.float().to(device) for t in (x_hat, norm, lse, mu)]
    loss, grad = bank_loss_epilogue(*args, 10.0, 25.0, 10.0 / n, soft_ce=soft_ce, kl=kl, round_dtype=round_dtype)
    ref_loss, ref_grad = oracle(
        *args, 10.0, 25.0, 10.0 / n, soft_ce=soft_ce, kl=kl, round_dtype=round_dtype
    )  # the oracle sees the same fp32 inputs
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-6, atol=1e-5)
    scale = ref_grad.abs().amax(dim=1, keepdim=True)  # the zero row's gradient is g/ε ~ 1e11: compare per row
    torch.testing.assert_close(grad.double().cpu() / scale, ref_grad / scale, rtol=0, atol=1e-6)


def test_rejects_mismatched_shapes() -> None:
    x_hat, norm = torch.zeros(6, 8), torch.ones(6)
    with pytest.raises(ValueError, match="do not fit"):
        bank_loss_epilogue(x_hat, norm, torch.zeros(6), torch.zeros(6, 8), 1.0, 1.0, 1.0, soft_ce=False)
    with pytest.raises(ValueError, match="contiguous fp32"):
        bank_loss_epilogue(torch.zeros(5, 8), norm, torch.zeros(2), torch.zeros(2, 8), 1.0, 1.0, 1.0, soft_ce=False)


LOSSES = {
    "moco": lambda q, t, bank, backend, reduction: moco_loss(q, t, bank, 0.2, backend=backend, reduction=reduction),
    "ce": lambda q, t, bank, backend, reduction: soft_bank_cross_entropy(
        q, t, bank, 0.1, 0.04, backend=backend, reduction=reduction
    ),
    "kl": lambda q, t, bank, backend, reduction: soft_bank_cross_entropy(
        q, t, bank, 0.1, 0.01, kl=True, backend=backend, reduction=reduction
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n", [1, 6])
@pytest.mark.parametrize("q_dtype,k_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float32)], ids=str)
def test_fused_loss_matches_fp64_reference(device, loss, reduction, n, q_dtype, k_dtype) -> None:
    """The whole fused Triton path (prologue, statistics, epilogue) through the functional losses, against the fp64
    materializing reference: mixed raw dtypes, a transposed (non-contiguous) query view, an fp32 row shorter than ε, a
    batch of one row, and a grad_output that is not 1 (per row for reduction="none")."""
    gen = torch.Generator().manual_seed(3)
    d = 24
    raw = torch.randn(d, n, generator=gen, dtype=torch.float64)
    if n > 1 and q_dtype == torch.float32:
        raw[:, 1] *= 1e-14  # ‖q‖ < ε (fp16 would flush it to zero, and g/ε overflows fp16 as in autograd)
    t = torch.randn(n, d, generator=gen, dtype=torch.float64).to(k_dtype)
    bank = F.normalize(torch.randn(50, d, generator=gen, dtype=torch.float64), dim=1).float()
    q = raw.to(q_dtype).to(device).T.requires_grad_()  # (n, d) view of a (d, n) tensor: non-contiguous rows
    assert n == 1 or not q.is_contiguous()
    out = LOSSES[loss](q, t.to(device), bank.to(device), "triton", reduction)
    grad_out = torch.linspace(0.5, 2.0, n, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7)
    (g,) = torch.autograd.grad(out, q, grad_out.to(device, out.dtype))
    # the op's backward feeds the (non-contiguous leaf) embeddings directly: no normalization nodes
    assert [type(fn).__name__ for fn, _ in out.grad_fn.next_functions if fn is not None] == ["AccumulateGrad"]
    q64 = q.detach().double().cpu().requires_grad_()
    ref = LOSSES[loss](q64, t.double(), bank.double(), "reference", reduction)
    (g64,) = torch.autograd.grad(ref, q64, grad_out)
    torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=1e-5, atol=1e-5)
    assert g.dtype == q_dtype
    # per row (the ‖q‖ < ε row's gradient is ~1e12); fp16 gradients carry their own 2^-11 rounding
    scale = g64.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    rtol = 2**-11 if q_dtype == torch.float16 else 0.0
    torch.testing.assert_close(g.double().cpu() / scale, g64 / scale, rtol=rtol, atol=2e-5)
