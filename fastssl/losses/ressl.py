"""ReSSL as a module with the journal version's InfoNCE warm-up (Zheng et al. 2021, arXiv:2107.09282 / 2203.08717)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastssl.bank import MemoryBank
from fastssl.functional.inputs import check_query_precision, check_temperature
from fastssl.functional.moco import moco_loss
from fastssl.functional.ressl import ressl_loss
from fastssl.losses.bank_owner import own_or_given_bank
from fastssl.ops.backend import check_backend


class ReSSLLoss(nn.Module):
    """α·L_relation + (1 − α)·L_InfoNCE with α = step / warmup_steps (clipped to 1), then enqueue the teacher keys.

    With ``warmup_steps=0`` this is the conference version's pure relation loss. The InfoNCE term uses the same bank
    as negatives and the teacher's weak-view key as positive; terms with zero weight are not computed.

    Args:
        dim: embedding dimension D (omit when passing ``bank``).
        bank_size: K (CIFAR: 4096/16384; ImageNet: 65,536).
        tau_student: τ_s (0.1).
        tau_teacher: τ_t (0.04; 0.03 for ImageNet).
        warmup_steps: InfoNCE warm-up length in optimizer steps (0 disables it).
        tau_infonce: temperature of the warm-up InfoNCE term.
        bank: an existing :class:`~fastssl.MemoryBank`.
        bank_dtype: storage dtype of a new bank.
        backend: loss backend.
        query_precision: ``"float32"`` (fp32-accurate logits) or ``"bank"`` (queries rounded to the bank's 16-bit
            dtype: faster kernels), see :func:`fastssl.functional.soft_bank_cross_entropy`.

    Shape:
        student: (N, D), or a list of (N, D) for multi-crop (each crop against the one weak-view target; the loss is
        their mean); teacher: (N, D) → scalar. ``step`` defaults to an internal counter advanced by each training call
        (a persistent buffer, so it resumes with the state_dict).
    """

    def __init__(
        self,
        dim: int | None = None,
        bank_size: int = 65_536,
        *,
        tau_student: float = 0.1,
        tau_teacher: float = 0.04,
        warmup_steps: int = 0,
        tau_infonce: float = 0.2,
        bank: MemoryBank | None = None,
        bank_dtype: torch.dtype = torch.float16,
        backend: str = "auto",
        query_precision: str = "float32",
    ) -> None:
        super().__init__()
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.bank = own_or_given_bank(bank, dim, bank_size, dtype=bank_dtype, init="random", store_labels=False)
        self.tau_student = check_temperature("tau_student", tau_student)
        self.tau_teacher = check_temperature("tau_teacher", tau_teacher)
        self.tau_infonce = check_temperature("tau_infonce", tau_infonce)
        self.warmup_steps, self.backend = warmup_steps, check_backend(backend)
        self.query_precision = check_query_precision(query_precision)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # Host copy of ``step``: reading the buffer would wait for the GPU every call. Set the step through
        # load_state_dict (or pass ``step=`` to forward), not by writing the buffer in place.
        self._host_step = 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._host_step = int(self.step)

    def alpha(self, step: int) -> float:
        """Weight of the relation loss at ``step``: step / warmup_steps, clipped to [0, 1]."""
        return 1.0 if self.warmup_steps == 0 else min(max(step / self.warmup_steps, 0.0), 1.0)

    def forward(
        self, student: torch.Tensor | Sequence[torch.Tensor], teacher: torch.Tensor, step: int | None = None
    ) -> torch.Tensor:
        alpha = self.alpha(self._host_step if step is None else step)
        crops = [student] if isinstance(student, torch.Tensor) else list(student)
        if not crops:
            raise ValueError("student: no crops given (a tensor, or a non-empty sequence of per-crop tensors)")
        loss = 0.0
        for crop in crops:
            if alpha > 0:
                relation = ressl_loss(
                    crop,
                    teacher,
                    self.bank,
                    self.tau_student,
                    self.tau_teacher,
                    backend=self.backend,
                    query_precision=self.query_precision,
                )
                loss = loss + alpha * relation
            if alpha < 1:
                infonce = moco_loss(
                    crop,
                    teacher,
                    self.bank,
                    self.tau_infonce,
                    backend=self.backend,
                    query_precision=self.query_precision,
                )
                loss = loss + (1 - alpha) * infonce
        loss = loss / len(crops)
        if self.training:
            self.bank.enqueue(teacher.detach())
            self._host_step += 1
            self.step.fill_(self._host_step)
        return loss
