"""Named view presets (single views) and multi-view recipes built from :class:`ViewSpec`.

Single views (``get_preset``):

- ``weak``: random resized crop 224, scale (0.2, 1) + flip. The teacher view of ISD, MSF and ReSSL
  (MSF Sec. 4 "weak augmentation"; ReSSL Table 4: crop + flip is the best teacher augmentation).
- ``mocov2``: the MoCo v2 strong view: crop (0.2, 1), jitter (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2,
  blur sigma in [0.1, 2] p=0.5, flip. The student view of ISD / MSF / ReSSL (CIFAR-size and ImageNet).
- ``byol_view1`` / ``byol_view2``: the BYOL asymmetric pair: crop (0.08, 1), jitter (0.4, 0.4, 0.2, 0.1) p=0.8,
  grayscale p=0.2, blur p=1.0 / 0.1, solarize p=0.0 / 0.2, flip (used by SDSSL).
- ``ressl_strong``: ReSSL ImageNet contrastive view: BYOL's with blur p=0.5, solarize p=0.1, min crop area 0.14.
- ``*_cifar``: 32 px variants with CIFAR statistics and no blur (a Gaussian blur at 32 px erases the image).
- ``digits_weak`` / ``digits_crop`` / ``digits_strong``: 16 px views for the offline shifted-digits data: no flip
  (a flipped digit is another symbol) and no hue/saturation (the data is gray); ``digits_crop`` is the crop-only view
  of the issue's quick trial (SimCLR/MoCo v2 with a 3-conv CNN at batch 256: random-init kNN 0.47 -> 0.89 in ~150 s
  on 2 cores, a trial not reproduced here); ``digits_crop_large`` keeps
  at least 40% of the canvas, so a crop rarely misses the digit: the embedded CPU demo learns faster with it (kNN
  after 300 MoCo v2 steps: 0.55 with crop scale (0.2, 1), 0.57 (0.3, 1), 0.66 (0.4, 1), 0.61 (0.6, 1)).

Multi-view recipes (``get_views``), in the order the training code consumes them (teacher first):

- ``weak_strong`` = [weak, mocov2] (ISD, MSF, ReSSL), ``weak_strong_cifar``;
- ``byol`` = [byol_view1, byol_view2] (SDSSL, BYOL), ``byol_cifar``;
- ``ressl_multicrop``: five ``ressl_strong`` crops at 224/192/160/128/96 px with min/max area
  (0.14, 0.117, 0.095, 0.073, 0.05) / (1.0, 0.86, 0.715, 0.571, 0.429) (ReSSL Sec. 5.1, after [42]); combine with the
  teacher view as ``["weak", "ressl_multicrop"]``;
- ``digits_pair`` = [digits_crop, digits_crop], ``digits_pair_large`` = [digits_crop_large, digits_crop_large] (the
  CPU demo), ``digits_weak_strong`` = [digits_weak, digits_strong].
"""

from __future__ import annotations

from fastssl.data.spec import CIFAR_MEAN, CIFAR_STD, ViewSpec

_GRAY_MEAN = (0.5, 0.5, 0.5)
_GRAY_STD = (0.5, 0.5, 0.5)

_MOCO_JITTER = (0.4, 0.4, 0.4, 0.1)
_BYOL_JITTER = (0.4, 0.4, 0.2, 0.1)


def _build_presets() -> dict[str, ViewSpec]:
    weak = ViewSpec(size=224, scale=(0.2, 1.0), flip_p=0.5, name="weak")
    mocov2 = ViewSpec(
        size=224, scale=(0.2, 1.0), jitter=_MOCO_JITTER, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, name="mocov2"
    )
    byol_view1 = ViewSpec(
        size=224, scale=(0.08, 1.0), jitter=_BYOL_JITTER, jitter_p=0.8, grayscale_p=0.2, blur_p=1.0, name="byol_view1"
    )
    byol_view2 = byol_view1.replace(blur_p=0.1, solarize_p=0.2, name="byol_view2")
    ressl_strong = byol_view1.replace(scale=(0.14, 1.0), blur_p=0.5, solarize_p=0.1, name="ressl_strong")
    presets = {v.name: v for v in (weak, mocov2, byol_view1, byol_view2, ressl_strong)}
    for base in (weak, mocov2, byol_view1, byol_view2):
        name = f"{base.name}_cifar"
        presets[name] = base.replace(size=32, blur_p=0.0, mean=CIFAR_MEAN, std=CIFAR_STD, name=name)
    digits = dict(size=16, ratio=(3.0 / 4.0, 4.0 / 3.0), flip_p=0.0, mean=_GRAY_MEAN, std=_GRAY_STD)
    presets["digits_weak"] = ViewSpec(scale=(0.5, 1.0), name="digits_weak", **digits)
    presets["digits_crop"] = ViewSpec(scale=(0.2, 1.0), name="digits_crop", **digits)
    presets["digits_crop_large"] = ViewSpec(scale=(0.4, 1.0), name="digits_crop_large", **digits)
    presets["digits_strong"] = ViewSpec(
        scale=(0.2, 1.0),
        jitter=(0.4, 0.4, 0.0, 0.0),
        jitter_p=0.8,
        blur_p=0.5,
        blur_sigma=(0.1, 1.0),
        name="digits_strong",
        **digits,
    )
    return presets


PRESETS: dict[str, ViewSpec] = _build_presets()

RESSL_MULTICROP_SIZES = (224, 192, 160, 128, 96)
RESSL_MULTICROP_MIN_SCALES = (0.14, 0.117, 0.095, 0.073, 0.05)
RESSL_MULTICROP_MAX_SCALES = (1.0, 0.86, 0.715, 0.571, 0.429)


def _build_recipes() -> dict[str, tuple[ViewSpec, ...]]:
    p = PRESETS
    multicrop = tuple(
        p["ressl_strong"].replace(size=size, scale=(lo, hi), name=f"ressl_crop{size}")
        for size, lo, hi in zip(
            RESSL_MULTICROP_SIZES, RESSL_MULTICROP_MIN_SCALES, RESSL_MULTICROP_MAX_SCALES, strict=True
        )
    )
    return {
        "weak_strong": (p["weak"], p["mocov2"]),
        "weak_strong_cifar": (p["weak_cifar"], p["mocov2_cifar"]),
        "byol": (p["byol_view1"], p["byol_view2"]),
        "byol_cifar": (p["byol_view1_cifar"], p["byol_view2_cifar"]),
        "ressl_multicrop": multicrop,
        "digits_pair": (p["digits_crop"], p["digits_crop"]),
        "digits_weak_strong": (p["digits_weak"], p["digits_strong"]),
        "digits_pair_large": (p["digits_crop_large"], p["digits_crop_large"]),
    }


RECIPES: dict[str, tuple[ViewSpec, ...]] = _build_recipes()


def get_preset(name: str) -> ViewSpec:
    """Single-view preset by name (see the module docstring)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown view preset {name!r}; single views: {sorted(PRESETS)}") from None


def get_views(name: str) -> list[ViewSpec]:
    """A single-view preset as a one-element list, or a multi-view recipe."""
    if name in RECIPES:
        return list(RECIPES[name])
    if name in PRESETS:
        return [PRESETS[name]]
    raise KeyError(f"unknown view preset {name!r}; single views: {sorted(PRESETS)}; multi-view: {sorted(RECIPES)}")
