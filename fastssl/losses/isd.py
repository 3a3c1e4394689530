"""ISD as a module that owns its memory bank (Tejankar et al., ICCV 2021, arXiv:2012.09259)."""

from __future__ import annotations

import torch
from torch import nn

from fastssl.bank import MemoryBank
from fastssl.functional.inputs import check_query_precision, check_temperature
from fastssl.functional.isd import isd_loss
from fastssl.losses.bank_owner import own_or_given_bank
from fastssl.ops.backend import check_backend


class ISDLoss(nn.Module):
    """KL(p_t‖p_s) over a memory bank; enqueues the teacher keys AFTER the loss, like the official code.

    Args:
        dim: embedding dimension D (omit when passing ``bank``).
        bank_size: K (official: 128,000 for ISD R18/R50).
        tau_student: τ_s (0.1).
        tau_teacher: τ_t (0.01).
        bank: an existing :class:`~fastssl.MemoryBank` to use instead of building one.
        bank_dtype: storage dtype of a new bank.
        backend: loss backend (``"auto"`` picks Triton on CUDA).
        query_precision: ``"float32"`` (fp32-accurate logits) or ``"bank"`` (queries rounded to the bank's 16-bit
            dtype: faster kernels), see :func:`fastssl.functional.soft_bank_cross_entropy`.

    Shape:
        student, teacher: (N, D) → scalar.
    """

    def __init__(
        self,
        dim: int | None = None,
        bank_size: int = 128_000,
        *,
        tau_student: float = 0.1,
        tau_teacher: float = 0.01,
        bank: MemoryBank | None = None,
        bank_dtype: torch.dtype = torch.float16,
        backend: str = "auto",
        query_precision: str = "float32",
    ) -> None:
        super().__init__()
        self.bank = own_or_given_bank(bank, dim, bank_size, dtype=bank_dtype, init="random", store_labels=False)
        self.tau_student = check_temperature("tau_student", tau_student)
        self.tau_teacher = check_temperature("tau_teacher", tau_teacher)
        self.backend = check_backend(backend)
        self.query_precision = check_query_precision(query_precision)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        loss = isd_loss(
            student,
            teacher,
            self.bank,
            self.tau_student,
            self.tau_teacher,
            backend=self.backend,
            query_precision=self.query_precision,
        )
        if self.training:
            self.bank.enqueue(teacher.detach())
        return loss
