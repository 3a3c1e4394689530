"""What every method shares: a student (backbone → projector → predictor), an EMA teacher, and the EMA update."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastssl.backbones import build_backbone
from fastssl.train.config import TrainConfig
from fastssl.train.heads import head_out_dim, mlp
from fastssl.train.shuffle_bn import shuffled_forward

MAX_TEACHER_CALLS_PER_STEP = 16  # spaces the shuffle permutations' call numbers of consecutive steps


class Method(nn.Module):
    """Base class: builds the student and (unless ``has_teacher`` is False) an EMA teacher of backbone + projector.

    Subclasses implement :meth:`loss` from the list of views (teacher view first, as in the view recipes) and say
    where the official code applies the EMA (``ema_before_forward``: MoCo/ISD/MSF/ReSSL update the key encoder at the
    start of forward; BYOL after the optimizer step).
    """

    has_teacher = True
    ema_before_forward = True

    def __init__(self, config: TrainConfig) -> None:
        super().__init__()
        self.config = config
        model = config.model
        self.backbone = build_backbone(model.arch, cifar_stem=model.cifar_stem, vit_mocov3=model.vit_mocov3)
        feature_dim = self.backbone.feature_dim
        self.projector = mlp(feature_dim, model.projector, bn=model.projector_bn, out_bn=model.projector_out_bn)
        self.embed_dim = head_out_dim(feature_dim, model.projector)
        self.predictor = mlp(self.embed_dim, model.predictor, bn=model.predictor_bn)
        if model.predictor and model.predictor[-1] != self.embed_dim:
            raise ValueError(
                f"model.predictor: must end at the projector's output width {self.embed_dim}, got {model.predictor[-1]}"
            )
        if self.has_teacher:
            self.teacher_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
            self.teacher_projector = copy.deepcopy(self.projector).requires_grad_(False)
        # Shuffling BN across ranks for the teacher (model.shuffle_bn); its permutation is drawn from (seed, step,
        # teacher call within the step), so it needs no state of its own to resume exactly.
        self.shuffle_bn, self.seed = model.shuffle_bn, config.run.seed
        self._step = self._teacher_calls = 0

    # -- student / teacher forward --------------------------------------------------------------------------------
    def student(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) → (N, embed_dim) predictor(projector(backbone(x)))."""
        return self.predictor(self.projector(self.backbone(x)))

    @torch.no_grad()
    def teacher(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) → (N, embed_dim) from the EMA teacher (no gradient); with ``model.shuffle_bn`` on a shuffled
        global batch across ranks (:mod:`fastssl.train.shuffle_bn`), every rank calling it alike."""
        if not self.shuffle_bn:
            return self._teacher_forward(x)
        call = self._step * MAX_TEACHER_CALLS_PER_STEP + self._teacher_calls
        self._teacher_calls += 1
        return shuffled_forward(self._teacher_forward, x, seed=self.seed, call=call)

    def _teacher_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher_projector(self.teacher_backbone(x))

    def loss(self, views: list[torch.Tensor], labels: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        """(scalar loss, {metric: float}) for one batch of views (teacher view first)."""
        raise NotImplementedError

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        # forward is what DistributedDataParallel hooks, so the loss is computed through it.
        self._step, self._teacher_calls = step, 0
        return self.loss(views, labels, step)

    # -- EMA ------------------------------------------------------------------------------------------------------
    def teacher_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher params, student params) in matching order."""
        teacher = list(self.teacher_backbone.parameters()) + list(self.teacher_projector.parameters())
        student = list(self.backbone.parameters()) + list(self.projector.parameters())
        return teacher, student

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """θ_t ← m·θ_t + (1 − m)·θ_s for all teacher parameters, in one fused foreach op."""
        if not self.has_teacher:
            return
        teacher, student = self.teacher_pairs()
        torch._foreach_lerp_(teacher, [p.detach() for p in student], 1.0 - m)

    def eval_backbones(self) -> dict[str, nn.Module]:
        """Backbones the kNN monitor evaluates."""
        backbones = {"student": self.backbone}
        if self.has_teacher:
            backbones["teacher"] = self.teacher_backbone
        return backbones
