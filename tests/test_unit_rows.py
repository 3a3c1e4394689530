"""fastssl.ops.unit_rows: the normalization the fused loss ops fold into their saved gradient, against autograd of
F.normalize (the oracle), including rows shorter than ε; and the losses' autograd graphs hold no normalization nodes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastssl.functional import isd_loss, moco_loss, ressl_loss
from fastssl.ops.unit_rows import EPS, unit_rows, unit_rows_backward


def _rows(dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64) * torch.tensor(
        [[1.0], [3.0], [1e-3], [1.0], [1.0], [1.0]]
    )
    x[3] = 0.0  # zero row: the clamp is the denominator
    x[4] = 1e-14  # ‖x‖ < ε as well, but not zero
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_values_and_vector_jacobian_product_match_autograd(dtype: torch.dtype) -> None:
    x = _rows(dtype)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    ref = F.normalize(leaf if dtype == torch.float64 else leaf.float(), dim=1)
    (ref_grad,) = torch.autograd.grad(ref, leaf, g.to(ref.dtype))

    x_hat, denom, norm = unit_rows(x)
    assert x_hat.dtype == ref.dtype and torch.equal(x_hat, ref.detach())
    assert (norm >= EPS).squeeze(1).tolist() == [True, True, True, False, False, True]
    torch.testing.assert_close(denom, norm.clamp_min(EPS), rtol=0, atol=0)
    grad = unit_rows_backward(g.to(x_hat.dtype), x_hat, denom, norm)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-6}[dtype]
    torch.testing.assert_close(grad.to(ref_grad.dtype), ref_grad, rtol=tol, atol=tol * float(ref_grad.abs().max()))


def test_gradient_is_orthogonal_to_the_row_and_scales_with_its_inverse_norm() -> None:
    """Closed form: x·∂L/∂x = 0 (scaling a row does not change x̂) and ∂L/∂(c·x) = ∂L/∂x / c."""
    x = torch.randn(4, 7, dtype=torch.float64)
    g = torch.randn(4, 7, dtype=torch.float64)
    grad = unit_rows_backward(g, *unit_rows(x))
    torch.testing.assert_close((grad * x).sum(1), torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(unit_rows_backward(g, *unit_rows(3.0 * x)), grad / 3.0, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "loss",
    [
        lambda q, t, b, backend: moco_loss(q, t, b, 0.2, backend=backend),
        lambda q, t, b, backend: isd_loss(q, t, b, backend=backend),
        lambda q, t, b, backend: ressl_loss(q, t, b, backend=backend),
    ],
    ids=["moco", "isd", "ressl"],
)
def test_loss_graph_is_one_node_from_the_embeddings(loss) -> None:
    """The bank losses normalize inside their op: the query's gradient comes straight from the op's backward (no
    normalization nodes for autograd to launch), and equals the fp64 reference's, which differentiates F.normalize and
    the materialized logits with autograd."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(5, 16, generator=gen, requires_grad=True)
    t, bank = torch.randn(5, 16, generator=gen), F.normalize(torch.randn(40, 16, generator=gen), dim=1)
    out = loss(q, t, bank, "streaming")
    assert [type(fn).__name__ for fn, _ in out.grad_fn.next_functions if fn is not None] == ["AccumulateGrad"]
    (g,) = torch.autograd.grad(out, q)
    q64 = q.detach().double().requires_grad_()
    ref = loss(q64, t.double(), bank.double(), "reference")
    (g64,) = torch.autograd.grad(ref, q64)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-6)
