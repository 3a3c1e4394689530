"""MSF (Koohpayegani et al. 2021): pull the query toward the target's top-k bank neighbours (targets enqueued first)."""

from __future__ import annotations

from fastssl.losses import MSFLoss
from fastssl.train.methods.bank_dtype import bank_dtype
from fastssl.train.methods.base import Method


class MSF(Method):
    def __init__(self, config) -> None:
        super().__init__(config)
        m = config.method
        self.criterion = MSFLoss(
            self.embed_dim,
            m.bank_size,
            k=m.k,
            bank_dtype=bank_dtype(m),
            store_labels=True,
            backend=m.loss_backend,
            query_precision=m.query_precision,
        )

    def loss(self, views, labels, step):
        weak, strong = views[0], views[1]
        loss = self.criterion(self.student(strong), self.teacher(weak), labels)
        purity = self.criterion.last_purity  # a device tensor: the trainer reads it a step late, with the loss
        return loss, {} if purity is None else {"purity": purity.detach()}
