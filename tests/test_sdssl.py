"""SDSSL loss against a direct transcription of the paper's Alg. 1, and its α schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastssl.functional import sdssl_alpha, sdssl_loss
from fastssl.losses import SDSSLLoss


def ctr(q, z, tau, num_layers=1):
    """Alg. 1's ctr: logits = mm(q, z.t()); labels = repeat(arange(N), num_layers); 2τ·CE(logits/τ)."""
    q, z = F.normalize(q, dim=1), F.normalize(z, dim=1)
    n = z.shape[0]
    logits = torch.mm(q, z.t())
    labels = torch.arange(n).repeat(num_layers)
    return 2 * tau * torch.nn.CrossEntropyLoss()(logits / tau, labels)


def test_matches_algorithm_1_one_direction():
    torch.manual_seed(0)
    layers, n, d, tau, alpha = 4, 6, 8, 0.2, 0.3
    q = torch.randn(layers, n, d, dtype=torch.float64, requires_grad=True)  # p(q1) per layer, last = output
    pred_only = torch.randn(layers, n, d, dtype=torch.float64)  # p(q1.detach())
    z = torch.randn(n, d, dtype=torch.float64)
    loss = sdssl_loss(q, z, pred_only, alpha=alpha, tau=tau)
    q_flat = q.reshape(layers * n, d)
    q_isd, q_out = q_flat[: (layers - 1) * n], q_flat[(layers - 1) * n :]
    expected = (
        ctr(q_out, z, tau)
        + alpha * ctr(q_isd, z, tau, layers - 1)
        + layers * ctr(pred_only.reshape(-1, d), z, tau, layers)
    )
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.autograd.gradcheck(lambda x: sdssl_loss(x, z, pred_only, alpha=alpha, tau=tau), (q,))


def test_byol_variant_is_mean_cosine_distance():
    torch.manual_seed(1)
    q, z = torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    loss = sdssl_loss(q, z, alpha=0.5, method="byol")
    dist = 2 - 2 * (F.normalize(q, dim=2) * F.normalize(z, dim=1)).sum(-1)  # (L, N)
    torch.testing.assert_close(loss, dist[-1].mean() + 0.5 * dist[:-1].mean())


def test_alpha_schedule_is_cosine_from_zero_to_ratio():
    assert sdssl_alpha(0, 100, 0.8) == 0.0
    assert sdssl_alpha(100, 100, 0.8) == pytest.approx(0.8)
    assert sdssl_alpha(50, 100, 0.8) == pytest.approx(0.4)
    assert sdssl_alpha(25, 100, 1.0) == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    assert sdssl_alpha(500, 100, 0.8) == pytest.approx(0.8)  # clipped


def test_module_is_symmetric_and_steps_alpha():
    torch.manual_seed(2)
    q1, q2 = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    module = SDSSLLoss(total_steps=10, ratio=1.0)
    first = module(q1, q2, z1, z2)
    torch.testing.assert_close(first, sdssl_loss(q1, z2, alpha=0.0) + sdssl_loss(q2, z1, alpha=0.0))
    assert int(module.step) == 1
    second = module(q1, q2, z1, z2)
    alpha = sdssl_alpha(1, 10, 1.0)
    torch.testing.assert_close(second, sdssl_loss(q1, z2, alpha=alpha) + sdssl_loss(q2, z1, alpha=alpha))


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"\(L, N, D\)"):
        sdssl_loss(torch.randn(4, 8), torch.randn(4, 8), alpha=0.1)
    with pytest.raises(ValueError, match="teacher must have shape"):
        sdssl_loss(torch.randn(2, 4, 8), torch.randn(3, 8), alpha=0.1)
    with pytest.raises(ValueError, match="method"):
        sdssl_loss(torch.randn(2, 4, 8), torch.randn(4, 8), alpha=0.1, method="simclr")


def test_bad_alpha_and_non_tensor_inputs():
    student, teacher = torch.randn(3, 4, 8), torch.randn(4, 8)
    for alpha in (float("nan"), -0.5, float("inf")):
        with pytest.raises(ValueError, match="alpha must be a finite weight"):
            sdssl_loss(student, teacher, alpha=alpha)
    with pytest.raises(TypeError, match="teacher must be a torch.Tensor"):
        sdssl_loss(student, teacher.tolist(), alpha=0.5)
