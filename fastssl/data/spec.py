"""Declarative per-view augmentation spec shared by the torchvision and DALI backends.

One :class:`ViewSpec` describes one view completely (crop, flip, colour jitter, grayscale, blur, solarize,
normalization). It is a frozen dataclass so a list of specs can be hashed, compared and written to a training config
with :meth:`ViewSpec.to_dict` / :meth:`ViewSpec.from_dict` without loss.

The op order is the MoCo v2 / BYOL order: random resized crop -> colour jitter (p) -> grayscale (p) -> Gaussian blur
(p) -> solarize (p) -> horizontal flip (p) -> normalize. Flip commutes with every colour op, so the backends are free to
fuse it with normalization.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def _pair(value: Any, name: str) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        return (float(value), float(value))
    values = tuple(float(v) for v in value)
    if len(values) != 2:
        raise ValueError(f"ViewSpec.{name} must have 2 values, got {value!r}")
    return values  # type: ignore[return-value]


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"ViewSpec.{name} must have 3 values (one per RGB channel), got {value!r}")
    return values  # type: ignore[return-value]


def _probability(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"ViewSpec.{name} is a probability and must lie in [0, 1], got {value}")
    return value


@dataclass(frozen=True)
class ViewSpec:
    """Augmentation of one view.

    Attributes:
        size: output (height, width) in pixels; an int means a square crop.
        scale: range of the crop area as a fraction of the image area (torchvision ``RandomResizedCrop.scale``).
        ratio: range of the crop aspect ratio width/height, sampled log-uniformly.
        flip_p: probability of a horizontal flip.
        jitter: colour-jitter strengths (brightness, contrast, saturation, hue) as in ``ColorJitter``: factors are
            drawn from [1 - s, 1 + s] for the first three and the hue shift from [-h, h] (fraction of the hue circle).
        jitter_p: probability of applying the colour jitter.
        grayscale_p: probability of converting to grayscale (kept as 3 equal channels).
        blur_p: probability of a Gaussian blur.
        blur_sigma: range of the blur standard deviation in output pixels (kernel radius ceil(3 sigma)).
        solarize_p: probability of solarization (values >= threshold are inverted).
        solarize_threshold: solarization threshold as a fraction of the value range.
        mean: per-channel normalization mean, on the [0, 1] scale.
        std: per-channel normalization std, on the [0, 1] scale.
        name: free-form label (the preset name) carried into configs and logs.
    """

    size: tuple[int, int] = (224, 224)
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    jitter_p: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        # Normalize containers to tuples of the right type so that a spec read back from YAML/JSON compares equal.
        size = (self.size, self.size) if isinstance(self.size, (int, float)) else tuple(self.size)
        if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
            raise ValueError(f"ViewSpec.size must be a positive int or (height, width), got {self.size!r}")
        object.__setattr__(self, "size", (int(size[0]), int(size[1])))
        scale = _pair(self.scale, "scale")
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"ViewSpec.scale must satisfy 0 < min <= max <= 1, got {self.scale!r}")
        ratio = _pair(self.ratio, "ratio")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ViewSpec.ratio must satisfy 0 < min <= max, got {self.ratio!r}")
        jitter = tuple(float(v) for v in self.jitter)
        if len(jitter) != 4 or any(v < 0 for v in jitter) or jitter[0] > 1 or jitter[1] > 1 or jitter[2] > 1:
            raise ValueError(
                "ViewSpec.jitter must be 4 non-negative strengths (brightness, contrast, saturation <= 1, hue), "
                f"got {self.jitter!r}"
            )
        if jitter[3] > 0.5:
            raise ValueError(f"ViewSpec.jitter hue strength must be <= 0.5, got {jitter[3]}")
        sigma = _pair(self.blur_sigma, "blur_sigma")
        if not 0.0 < sigma[0] <= sigma[1]:
            raise ValueError(f"ViewSpec.blur_sigma must satisfy 0 < min <= max, got {self.blur_sigma!r}")
        std = _triple(self.std, "std")
        if any(s <= 0 for s in std):
            raise ValueError(f"ViewSpec.std must be positive, got {self.std!r}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", ratio)
        object.__setattr__(self, "jitter", jitter)
        object.__setattr__(self, "blur_sigma", sigma)
        object.__setattr__(self, "mean", _triple(self.mean, "mean"))
        object.__setattr__(self, "std", std)
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            object.__setattr__(self, name, _probability(getattr(self, name), name))
        if not 0.0 < float(self.solarize_threshold) <= 1.0:
            raise ValueError(f"ViewSpec.solarize_threshold must lie in (0, 1], got {self.solarize_threshold}")
        object.__setattr__(self, "solarize_threshold", float(self.solarize_threshold))
        object.__setattr__(self, "name", str(self.name))

    @property
    def has_jitter(self) -> bool:
        """True when the colour jitter can change a pixel."""
        return self.jitter_p > 0 and any(v > 0 for v in self.jitter)

    @property
    def changes_colour(self) -> bool:
        """True when any op other than crop/flip/normalize can run (a 'weak' view has none)."""
        return self.has_jitter or self.grayscale_p > 0 or self.blur_p > 0 or self.solarize_p > 0

    def blur_radius(self, sigma: float) -> int:
        """Kernel radius used for a blur of standard deviation ``sigma`` (same rule in both backends)."""
        return max(1, math.ceil(3.0 * sigma))

    def replace(self, **changes: Any) -> ViewSpec:
        """Return a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (lists, floats, str) suitable for JSON/YAML configs."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ViewSpec:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a typo must not silently disable an op).

        A ``preset`` key starts from that preset and applies the other keys on top, e.g.
        ``{"preset": "mocov2", "size": 160}``.
        """
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"preset"})
        if unknown:
            raise ValueError(f"unknown ViewSpec field(s) {unknown}; valid fields: {sorted(known)}")
        preset = data.pop("preset", None)
        if preset is not None:
            from fastssl.data.presets import get_preset

            return get_preset(str(preset)).replace(**data)
        return cls(**data)


def resolve_views(
    views: ViewSpec | str | Mapping[str, Any] | Sequence[ViewSpec | str | Mapping[str, Any]],
) -> list[ViewSpec]:
    """Turn ``views`` (specs, preset names, dicts, or a multi-view preset name) into a list of ViewSpec.

    Args:
        views: a ViewSpec, a preset name (single view such as "weak" or multi-view such as "ressl_multicrop"),
            a dict for :meth:`ViewSpec.from_dict`, or a sequence of any of those.

    Returns:
        The list of view specs, at least one.
    """
    from fastssl.data.presets import get_views

    if isinstance(views, (ViewSpec, str, Mapping)):
        views = [views]
    out: list[ViewSpec] = []
    for view in views:
        if isinstance(view, ViewSpec):
            out.append(view)
        elif isinstance(view, str):
            out.extend(get_views(view))
        elif isinstance(view, Mapping):
            out.append(ViewSpec.from_dict(view))
        else:
            raise TypeError(f"a view must be a ViewSpec, a preset name or a dict, got {type(view).__name__}")
    if not out:
        raise ValueError("at least one view is required")
    return out
