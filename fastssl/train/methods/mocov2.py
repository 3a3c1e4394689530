"""MoCo v2 (Chen et al. 2020): InfoNCE of the query against its key and the queue; key enqueued after the loss."""

from __future__ import annotations

from fastssl.losses import MoCoLoss
from fastssl.train.methods.bank_dtype import bank_dtype
from fastssl.train.methods.bank_shard import method_bank
from fastssl.train.methods.base import Method


class MoCoV2(Method):
    def __init__(self, config) -> None:
        super().__init__(config)
        m = config.method
        self.criterion = MoCoLoss(
            self.embed_dim,
            m.bank_size,
            tau=m.tau,
            bank_dtype=bank_dtype(m),
            backend=m.loss_backend,
            query_precision=m.query_precision,
            bank=method_bank(m, self.embed_dim),
        )

    def loss(self, views, labels, step):
        key_view, query_view = views[0], views[1]
        loss = self.criterion(self.student(query_view), self.teacher(key_view))
        if self.config.method.symmetric:
            loss = loss + self.criterion(self.student(key_view), self.teacher(query_view))
        return loss, {}
