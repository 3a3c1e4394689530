"""NNCLR (Dwibedi et al. 2021): the support-set nearest neighbour of one view is contrasted with the other view."""

from __future__ import annotations

from fastssl.losses import NNCLRLoss
from fastssl.train.methods.bank_dtype import bank_dtype
from fastssl.train.methods.base import Method


class NNCLR(Method):
    has_teacher = False  # NNCLR has no momentum encoder

    def __init__(self, config) -> None:
        super().__init__(config)
        m = config.method
        self.criterion = NNCLRLoss(
            self.embed_dim, m.bank_size, tau=m.tau, bank_dtype=bank_dtype(m), backend=m.loss_backend
        )

    def loss(self, views, labels, step):
        z1, z2 = self.projector(self.backbone(views[0])), self.projector(self.backbone(views[1]))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        if self.config.method.symmetric:
            return self.criterion(z1, p2, z2, p1), {}
        return self.criterion(z1, p2), {}
