"""L2-normalization of embedding rows for the fused loss ops, with its backward folded into their saved gradient.

The losses normalize their embeddings, x̂ = x / max(‖x‖, ε) (``F.normalize``, ε = 1e-12). Left to autograd, that is
about twenty small launches per step in forward and backward around the two bank kernels; the ops instead normalize
inside their forward and apply the normalization's Jacobian to the gradient they save there (vector-Jacobian
product, g the gradient with respect to x̂). This module is the PyTorch form (the streaming backend, and the Triton
backend under torch.compile; the reference backend differentiates F.normalize with autograd); the eager Triton
backend runs the same math as two kernels, ``fastssl.kernels.unit_rows`` and ``fastssl.kernels.bank_loss_epilogue``:

    ∂L/∂x = (g − x̂ (x̂·g)) / ‖x‖     where ‖x‖ ≥ ε
          = g / ε                   where ‖x‖ < ε   (the clamp is constant there, as in autograd's clamp_min)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-12  # F.normalize's default


def unit_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of ``x`` (N, D) scaled to unit length in fp32 (fp64 stays fp64), outside autograd.

    Returns:
        x̂: (N, D) normalized rows, the values ``F.normalize(x.float(), dim=1)`` gives.
        denom: (N, 1) max(‖x‖, ε).
        norm: (N, 1) ‖x‖ (where it is ≥ ε it is the denominator, otherwise the clamp is).
    """
    x = x.detach()
    x = x if x.dtype == torch.float64 else x.float()
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    denom = norm.clamp_min(EPS)
    return x / denom, denom, norm


def unit_rows_backward(
    grad: torch.Tensor, x_hat: torch.Tensor, denom: torch.Tensor, norm: torch.Tensor
) -> torch.Tensor:
    """∂L/∂x (N, D) from g = ∂L/∂x̂ (N, D) and what :func:`unit_rows` returned (module docstring)."""
    radial = torch.where(norm >= EPS, (grad * x_hat).sum(dim=1, keepdim=True), 0.0)
    return torch.addcmul(grad, x_hat, radial, value=-1.0).div_(denom)


def normalized_with_autograd(x: torch.Tensor) -> torch.Tensor:
    """The same normalization left to autograd (for the materializing references): ``F.normalize`` in fp32."""
    return F.normalize(x if x.dtype == torch.float64 else x.float(), dim=1)
