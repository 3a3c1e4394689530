"""SDSSL (Jang et al. 2023) on a ViT: every block's CLS, through its own projector and predictor, is distilled toward
the teacher's final output; SD-MoCo v3 or SD-BYOL."""

from __future__ import annotations

import torch
from torch import nn

from fastssl.backbones import ViTBackbone
from fastssl.functional import sdssl_alpha
from fastssl.losses import SDSSLLoss
from fastssl.train.heads import mlp
from fastssl.train.methods.base import Method


class SDSSL(Method):
    def __init__(self, config) -> None:
        super().__init__(config)
        if not isinstance(self.backbone, ViTBackbone):
            raise ValueError(f"model.arch: SDSSL distills ViT blocks; {config.model.arch!r} is not a ViT")
        model, m = config.model, config.method
        depth, feature_dim = self.backbone.depth, self.backbone.feature_dim
        # One projector and one predictor per block; the last pair is the usual output head. The intermediate
        # projectors may be narrower (Sec. 4.1: hidden 2048 there, 4096 for the last projector and all predictors).
        layer_dims = model.layer_projector or model.projector
        self.projectors = nn.ModuleList(
            [self.projector]
            + [
                mlp(feature_dim, layer_dims, bn=model.projector_bn, out_bn=model.projector_out_bn)
                for _ in range(depth - 1)
            ]
        )
        self.predictors = nn.ModuleList(
            [self.predictor] + [mlp(self.embed_dim, model.predictor, bn=model.predictor_bn) for _ in range(depth - 1)]
        )
        # index 0 holds the output head, so order the per-layer lists as [block 1, …, block L]
        self.layer_order = list(range(1, depth)) + [0]
        total = max(1, config.run.max_steps or 1)
        self.criterion = SDSSLLoss(total, m.sdssl_ratio, tau=m.tau, method=m.sdssl_base)

    def set_total_steps(self, total_steps: int) -> None:
        self.criterion.total_steps = max(1, total_steps)

    def _layers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, N, D) predictions and (L, N, D) predictor-only outputs on detached projections."""
        cls = self.backbone.forward_layers(x)  # (L, N, feature_dim)
        preds, pred_only = [], []
        for layer, head in enumerate(self.layer_order):
            h = self.projectors[head](cls[layer])
            preds.append(self.predictors[head](h))
            pred_only.append(self.predictors[head](h.detach()))
        return torch.stack(preds), torch.stack(pred_only)

    def loss(self, views, labels, step):
        v1, v2 = views[0], views[1]
        q1, p1 = self._layers(v1)
        q2, p2 = self._layers(v2)
        loss = self.criterion(q1, q2, self.teacher(v1), self.teacher(v2), p1, p2, step=step)
        return loss, {"alpha": sdssl_alpha(step, self.criterion.total_steps, self.criterion.ratio)}
