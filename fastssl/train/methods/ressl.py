"""ReSSL (Zheng et al. 2021): relational consistency with a sharpened weak-view target and InfoNCE warm-up."""

from __future__ import annotations

from fastssl.losses import ReSSLLoss
from fastssl.train.methods.bank_dtype import bank_dtype
from fastssl.train.methods.bank_shard import method_bank
from fastssl.train.methods.base import Method


class ReSSL(Method):
    def __init__(self, config) -> None:
        super().__init__(config)
        m = config.method
        self.criterion = ReSSLLoss(
            self.embed_dim,
            m.bank_size,
            tau_student=m.tau_student,
            tau_teacher=m.tau_teacher,
            warmup_steps=m.warmup_steps,
            tau_infonce=m.tau,
            bank_dtype=bank_dtype(m),
            backend=m.loss_backend,
            query_precision=m.query_precision,
            bank=method_bank(m, self.embed_dim),
        )

    def loss(self, views, labels, step):
        weak, strong = views[0], views[1:]  # multi-crop: every strong crop against the one weak teacher view
        loss = self.criterion([self.student(view) for view in strong], self.teacher(weak), step=step)
        return loss, {"alpha": self.criterion.alpha(step)}
