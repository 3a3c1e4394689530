"""ISD (Tejankar et al. 2021): the student's strong view mimics the teacher's weak-view similarities to the bank."""

from __future__ import annotations

from fastssl.losses import ISDLoss
from fastssl.train.methods.bank_dtype import bank_dtype
from fastssl.train.methods.bank_shard import method_bank
from fastssl.train.methods.base import Method


class ISD(Method):
    def __init__(self, config) -> None:
        super().__init__(config)
        m = config.method
        self.criterion = ISDLoss(
            self.embed_dim,
            m.bank_size,
            tau_student=m.tau_student,
            tau_teacher=m.tau_teacher,
            bank_dtype=bank_dtype(m),
            backend=m.loss_backend,
            query_precision=m.query_precision,
            bank=method_bank(m, self.embed_dim),
        )

    def loss(self, views, labels, step):
        weak, strong = views[0], views[1]
        return self.criterion(self.student(strong), self.teacher(weak)), {}
