"""BYOL (Grill et al. 2020): symmetric regression of the online prediction onto the EMA target; EMA after the step."""

from __future__ import annotations

from fastssl.functional import byol_loss
from fastssl.train.methods.base import Method


class BYOL(Method):
    ema_before_forward = False

    def loss(self, views, labels, step):
        v1, v2 = views[0], views[1]
        loss = byol_loss(self.student(v1), self.teacher(v2))
        if self.config.method.symmetric:
            loss = loss + byol_loss(self.student(v2), self.teacher(v1))
        return loss, {}
