"""ViewSpec validation and serialization; the presets match the papers' recipes."""

from __future__ import annotations

import json

import pytest

from fastssl.data import PRESETS, RECIPES, ViewSpec, get_views, resolve_views


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_round_trips_through_json(name):
    spec = PRESETS[name]
    back = ViewSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec and back.name == spec.name


def test_from_dict_with_preset_base_and_override():
    spec = ViewSpec.from_dict({"preset": "mocov2", "size": 160})
    assert spec.size == (160, 160) and spec.jitter == PRESETS["mocov2"].jitter


@pytest.mark.parametrize(
    "bad",
    [
        {"flip_p": 1.5},
        {"scale": (0.5, 0.2)},
        {"scale": (0.0, 1.0)},
        {"ratio": (2.0, 1.0)},
        {"jitter": (0.4, 0.4, 0.4)},
        {"jitter": (0.4, 0.4, 0.4, 0.7)},
        {"blur_sigma": (0.0, 1.0)},
        {"std": (1.0, 0.0, 1.0)},
        {"size": 0},
    ],
)
def test_invalid_fields_are_rejected(bad):
    with pytest.raises(ValueError):
        ViewSpec(**bad)


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ValueError, match="flip_prob"):
        ViewSpec.from_dict({"flip_prob": 0.5})


def test_presets_follow_the_papers():
    weak, moco = PRESETS["weak"], PRESETS["mocov2"]
    assert weak.scale == (0.2, 1.0) and weak.flip_p == 0.5 and not weak.changes_colour
    assert moco.jitter == (0.4, 0.4, 0.4, 0.1) and moco.jitter_p == 0.8
    assert (moco.grayscale_p, moco.blur_p, moco.blur_sigma) == (0.2, 0.5, (0.1, 2.0))
    v1, v2 = get_views("byol")
    assert (v1.blur_p, v1.solarize_p, v2.blur_p, v2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    crops = get_views("ressl_multicrop")
    assert [c.size[0] for c in crops] == [224, 192, 160, 128, 96]
    assert [c.scale for c in crops] == [
        (0.14, 1.0),
        (0.117, 0.86),
        (0.095, 0.715),
        (0.073, 0.571),
        (0.05, 0.429),
    ]
    for name in ("weak_cifar", "mocov2_cifar", "byol_view1_cifar", "byol_view2_cifar"):
        assert PRESETS[name].size == (32, 32) and PRESETS[name].blur_p == 0.0
    assert PRESETS["digits_crop"].size == (16, 16) and not PRESETS["digits_crop"].changes_colour
    assert PRESETS["digits_crop"].flip_p == 0.0


def test_resolve_views_mixes_names_specs_and_dicts():
    views = resolve_views(["weak", "ressl_multicrop", {"preset": "mocov2", "size": 96}, PRESETS["byol_view1"]])
    assert len(views) == 1 + 5 + 1 + 1
    assert set(RECIPES) >= {"weak_strong", "byol", "ressl_multicrop", "digits_pair"}
    with pytest.raises(KeyError, match="unknown view preset"):
        resolve_views("mocov3")
