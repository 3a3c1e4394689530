"""Loading a pretrained backbone for evaluation from a checkpoint file.

Accepted checkpoint layouts: a plain backbone ``state_dict``, or a dict holding it under ``"backbone"``, ``"model"``
or ``"state_dict"`` (fastssl's training writes ``{"backbone": ...}``). ``module.`` prefixes (DDP) are stripped, and
when the keys carry a common prefix such as ``backbone.`` or ``encoder_q.`` (whole SSL models), the rows under the
prefix that matches the architecture are used. The classifier head of the architecture is replaced by an identity,
so the model returns pooled features.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
from torch import nn

logger = logging.getLogger(__name__)

STATE_KEYS = ("backbone", "model", "state_dict")
HEAD_NAMES = ("fc", "head", "classifier", "heads")


def build_backbone(arch: str, *, cifar_stem: bool = False) -> nn.Module:
    """A randomly initialized backbone returning pooled (N, D) features.

    Uses :func:`fastssl.backbones.build_backbone` (torchvision ResNets with optional CIFAR stem, timm ViTs,
    ``digits_cnn``) so every trained architecture can be evaluated; other torchvision names go through
    ``torchvision.models.get_model`` with the classifier head replaced by ``nn.Identity``.

    Args:
        arch: architecture name (``resnet18``, ``resnet50``, ``vit_small_patch16_224``, ``digits_cnn``, ...).
        cifar_stem: 3x3 stride-1 first convolution and no max-pool (CIFAR ResNets).

    Raises:
        ValueError: unknown architecture.
    """
    from fastssl.backbones import build_backbone as build_fastssl

    if arch.startswith(("digits_cnn", "resnet", "vit")):
        try:
            return build_fastssl(arch, cifar_stem=cifar_stem)
        except ValueError:
            pass  # not a name fastssl builds itself: try torchvision below
    import torchvision

    try:
        model = torchvision.models.get_model(arch, weights=None)
    except ValueError as err:
        known = ", ".join(n for n in torchvision.models.list_models() if n.startswith(("resnet", "vit", "wide")))
        raise ValueError(f"unknown architecture {arch!r}; e.g. digits_cnn, {known}") from err
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            setattr(model, name, nn.Identity())
            break
    return model


def extract_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The backbone state dict inside a loaded checkpoint, with ``module.`` prefixes removed.

    Raises:
        ValueError: no tensor mapping found.
    """
    state = checkpoint
    for key in STATE_KEYS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = list(checkpoint)[:8] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(f"no backbone state_dict found in the checkpoint (expected one of {STATE_KEYS}); saw {keys}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _match_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Pick the sub-dict whose keys, after dropping a common prefix, match the model best."""
    best, best_hits = state, len(expected & set(state))
    prefixes = {k.split(".", 1)[0] + "." for k in state if "." in k}
    for prefix in prefixes:
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        hits = len(expected & set(sub))
        if hits > best_hits:
            best, best_hits = sub, hits
    return best


def load_backbone(path: str | os.PathLike, arch: str | None, *, device: torch.device | str = "cpu") -> nn.Module:
    """Build ``arch`` and load the checkpoint's backbone weights into it (eval mode).

    Args:
        path: checkpoint file (``torch.save`` output).
        arch: architecture name (see :func:`build_backbone`); CIFAR-stem ResNets are detected from conv1. None: the
            one a ``fastssl train`` checkpoint records in its config.
        device: where to put the model.

    Returns:
        The backbone, with the architecture name it was built as in ``arch_name``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a loadable checkpoint, no architecture given or recorded, or weights that do not fit the
            architecture (missing or mis-shaped tensors).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling, zip and runtime errors alike
        raise ValueError(f"{path} is not a loadable checkpoint: {' '.join(str(error).split())[:200]}") from error
    if arch is None:
        config = checkpoint.get("config") if isinstance(checkpoint, Mapping) else None
        arch = config.get("model", {}).get("arch") if isinstance(config, Mapping) else None
        if not isinstance(arch, str):
            raise ValueError(f"{path} does not record its architecture (not a fastssl train checkpoint): pass --arch")
    raw = extract_state_dict(checkpoint)
    model = build_backbone(arch)
    state = _match_prefix(raw, set(model.state_dict()))
    conv1 = state.get("conv1.weight")
    if arch.startswith("resnet") and conv1 is not None and tuple(conv1.shape[-2:]) == (3, 3):
        model = build_backbone(arch, cifar_stem=True)  # a CIFAR-stem ResNet checkpoint
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(
            f"checkpoint {path} does not fit arch {arch!r}: {len(missing)} tensors missing, e.g. {missing[:4]}"
        )
    mis_shaped = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if mis_shaped:
        k = mis_shaped[0]
        raise ValueError(
            f"checkpoint {path} does not fit arch {arch!r}: {k} has shape {tuple(state[k].shape)}, "
            f"the model expects {tuple(expected[k].shape)}"
        )
    unused = [k for k in state if k not in expected]
    if unused:
        logger.info("ignoring %d checkpoint tensors not in the backbone (e.g. %s)", len(unused), unused[:3])
    model.load_state_dict({k: state[k] for k in expected})
    model.arch_name = arch
    return model.to(device).eval()
