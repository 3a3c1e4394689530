"""make_loader on both backends: output format, normalization, determinism, resume, corrupt files, fallback."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch

from fastssl.data import CorruptImageError, get_preset, make_loader, make_synthetic_image_folder

BACKENDS = [
    "torchvision",
    pytest.param(
        "dali",
        marks=pytest.mark.skipif(
            __import__("importlib").util.find_spec("nvidia.dali") is None, reason="DALI not installed"
        ),
    ),
]


def _loader(source, views, backend, batch_size=8, **kw):
    kw.setdefault("num_workers", 0 if backend == "torchvision" else 2)
    return make_loader(source, views, batch_size, backend=backend, verbose=False, **kw)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_synthetic_image_folder(
        tmp_path_factory.mktemp("data") / "jpegs", num_classes=3, images_per_class=8, min_size=40, max_size=72
    )


def _constant_images(n=32, side=24):
    colours = np.random.default_rng(0).integers(0, 256, (n, 1, 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.broadcast_to(colours, (n, side, side, 3))), colours[:, 0, 0, :]


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_format_per_view_from_files(folder, backend):
    views = ["weak", "ressl_multicrop"]
    loader = _loader(folder, views, backend, batch_size=8)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    for b in batches:
        assert [tuple(v.shape) for v in b["views"]] == [(8, 3, s, s) for s in (224, 224, 192, 160, 128, 96)]
        assert all(v.dtype == torch.float32 for v in b["views"])
        assert b["index"].dtype == torch.int64 and b["label"].dtype == torch.int64
        assert torch.equal(b["label"], b["index"] // 8)  # synthetic folder: 8 sorted images per class
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(24))


@pytest.mark.parametrize("backend", BACKENDS)
def test_weak_view_keeps_colours_exactly(backend):
    """Oracle: a constant image stays its colour under crop/flip, so the output is (c/255 - mean) / std exactly."""
    images, colours = _constant_images()
    spec = get_preset("weak_cifar")
    loader = _loader((images, np.zeros(len(images))), [spec, "mocov2_cifar"], backend, batch_size=32, shuffle=False)
    batch = next(iter(loader))
    expected = (torch.from_numpy(colours).float() / 255.0 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    weak, strong = batch["views"]
    assert torch.allclose(weak, expected[:, :, None, None].expand_as(weak), atol=1e-5)
    # the strong view of the same images does change colours (the check above is sensitive)
    assert (strong.mean(dim=(2, 3)) - expected).abs().amax(dim=1).gt(0.05).float().mean() > 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_16_bit_png_is_scaled_to_8_bits(tmp_path, backend):
    """A 16-bit grayscale PNG of constant value v is the 8-bit image round(v·255/65535) on both backends (torchvision
    decodes it to uint16; dividing that by 255 made views ~257x too bright)."""
    from PIL import Image

    from fastssl.data import image_folder

    value = 40_000
    (tmp_path / "c0").mkdir()
    for i in range(8):
        Image.fromarray(np.full((24, 24), value, dtype=np.uint16)).save(tmp_path / "c0" / f"{i}.png")
    spec = get_preset("weak_cifar")
    batch = next(iter(_loader(image_folder(tmp_path), [spec, spec], backend, batch_size=8)))
    level = round(value * 255 / 65535) / 255.0
    expected = (level - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    tolerance = 1e-5 if backend == "torchvision" else 1.5 / 255 / min(spec.std)  # DALI rounds in its own decoder
    torch.testing.assert_close(batch["views"][0].mean(dim=(2, 3)), expected.expand(8, 3), rtol=0, atol=tolerance)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_views_differ_and_seed_epoch_determinism(backend):
    images = np.random.default_rng(1).integers(0, 256, (32, 40, 40, 3), dtype=np.uint8)
    src = (images, np.arange(32))
    views = ["weak_cifar", "mocov2_cifar"]
    a = list(_loader(src, views, backend, seed=5))
    b = list(_loader(src, views, backend, seed=5))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["index"], y["index"])
        assert all(torch.equal(u, v) for u, v in zip(x["views"], y["views"], strict=True))
        assert (x["views"][0] - x["views"][1]).abs().amax(dim=(1, 2, 3)).min() > 0.1  # every pair differs
    other = _loader(src, views, backend, seed=5)
    other.set_epoch(1)
    c = list(other)
    assert not torch.equal(a[0]["index"], c[0]["index"])
    d = list(_loader(src, views, backend, seed=6))
    assert not torch.equal(a[0]["views"][1], d[0]["views"][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_yields_the_remaining_batches(backend):
    images = np.random.default_rng(2).integers(0, 256, (40, 20, 20, 3), dtype=np.uint8)
    src = (images, np.arange(40) % 5)
    full_loader = _loader(src, ["weak_cifar"], backend, seed=3)
    full_loader.set_epoch(2)
    full = list(full_loader)
    resumed = _loader(src, ["weak_cifar"], backend, seed=3, start_step=2)
    resumed.set_epoch(2)  # set_epoch keeps the pending start step only through resume(); use resume explicitly
    resumed.resume(2, 2)
    rest = list(resumed)
    assert len(rest) == len(full) - 2 == 3
    for x, y in zip(rest, full[2:], strict=True):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["label"], y["label"])
        if backend == "torchvision":  # pixels depend on (seed, epoch, index) only
            assert torch.equal(x["views"][0], y["views"][0])
    assert len(list(resumed)) == len(full)  # the next iteration is a full epoch again


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_same_values(backend):
    images = np.random.default_rng(3).integers(0, 256, (16, 36, 36, 3), dtype=np.uint8)
    src = (images, np.zeros(16))
    a = next(iter(_loader(src, ["mocov2_cifar"], backend, batch_size=16)))["views"][0]
    b = next(iter(_loader(src, ["mocov2_cifar"], backend, batch_size=16, channels_last=True)))["views"][0]
    assert b.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b)


def test_torchvision_output_independent_of_worker_count():
    images = np.random.default_rng(4).integers(0, 256, (24, 30, 30, 3), dtype=np.uint8)
    src = (images, np.zeros(24))
    a = list(_loader(src, ["mocov2_cifar"], "torchvision", num_workers=0))
    b = list(_loader(src, ["mocov2_cifar"], "torchvision", num_workers=2))
    assert all(torch.equal(x["views"][0], y["views"][0]) for x, y in zip(a, b, strict=True))


@pytest.fixture
def broken_folder(tmp_path):
    root = make_synthetic_image_folder(tmp_path / "ds", num_classes=2, images_per_class=6, min_size=32, max_size=40)
    good = sorted((root / "class_00").iterdir())
    data = good[2].read_bytes()
    good[2].write_bytes(data[: len(data) // 2])  # truncated JPEG: valid header, broken stream
    (root / "class_01" / "notes.jpg").write_text("this is not an image\n")
    (root / "class_01" / "empty.png").write_bytes(b"")
    return root, {str(good[2]), str(root / "class_01" / "notes.jpg"), str(root / "class_01" / "empty.png")}


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_files_raise_naming_the_file(broken_folder, backend):
    root, bad = broken_folder
    with pytest.raises(CorruptImageError) as info:
        for _ in _loader(root, ["weak_cifar"], backend, batch_size=5, shuffle=False, drop_last=False):
            pass
    assert info.value.path in bad and info.value.path in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_files_skipped_when_asked(broken_folder, backend):
    root, bad = broken_folder
    loader = _loader(root, ["weak_cifar"], backend, batch_size=5, shuffle=False, drop_last=False, on_error="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seen = [i for b in loader for i in b["index"].tolist()]
    named = {p for p in bad if any(p in str(w.message) for w in caught)}
    assert named == bad
    paths = loader.source.paths
    assert sorted(paths[i] for i in seen) == sorted(set(paths) - bad)  # 15 files, 3 bad: all 12 good ones


def test_missing_dali_falls_back_to_torchvision(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` raise ImportError
    images = np.zeros((8, 8, 8, 3), dtype=np.uint8)
    with caplog.at_level("INFO", logger="fastssl.data"):
        loader = make_loader((images, np.zeros(8)), "weak_cifar", 4, backend="auto", num_workers=0)
    assert loader.backend == "torchvision" and "DALI is not available" in loader.reason
    assert [r.message for r in caplog.records if "torchvision backend (DALI is not available" in r.message]
    assert next(iter(loader))["views"][0].shape == (4, 3, 32, 32)
    with pytest.raises(ImportError, match=r"fastssl\[dali\]"):
        make_loader((images, np.zeros(8)), "weak_cifar", 4, backend="dali")


def test_auto_picks_torchvision_on_cpu_with_reason():
    images = np.zeros((8, 8, 8, 3), dtype=np.uint8)
    loader = make_loader((images, np.zeros(8)), "weak_cifar", 4, verbose=False, num_workers=0, device="cpu")
    assert loader.backend == "torchvision" and "cpu" in loader.reason


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_corrupt_file_listed_twice_is_skipped_twice(broken_folder, backend):
    """A list source may name one file twice; with on_error="skip" both samples are skipped (DALI used to blacklist
    only the path's first sample and rebuild its pipeline forever)."""
    from fastssl.data.sources import FileSource, image_folder

    root, bad = broken_folder
    folder = image_folder(root)
    twice = sorted(bad)[0]
    source = FileSource((*folder.paths, twice), np.append(folder.labels, 0), folder.classes)
    loader = _loader(source, ["weak_cifar"], backend, batch_size=4, shuffle=False, drop_last=False, on_error="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seen = [i for b in loader for i in b["index"].tolist()]
    assert sorted(source.paths[i] for i in seen) == sorted(set(folder.paths) - bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_batch_of_only_corrupt_files_is_skipped_not_yielded_empty(tmp_path, backend):
    from fastssl.data.sources import FileSource, image_folder

    good = image_folder(make_synthetic_image_folder(tmp_path / "ok", num_classes=1, images_per_class=4))
    (tmp_path / "bad").mkdir()
    bad = []
    for i in range(4):
        (tmp_path / "bad" / f"{i}.jpg").write_text("not an image")
        bad.append(str(tmp_path / "bad" / f"{i}.jpg"))
    source = FileSource((*bad, *good.paths), np.zeros(8, dtype=np.int64), good.classes)
    loader = _loader(source, ["weak_cifar"], backend, batch_size=4, shuffle=False, drop_last=False, on_error="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
    assert all(len(b["views"]) == 1 and b["views"][0].shape[0] > 0 for b in batches)
    assert sorted(i for b in batches for i in b["index"].tolist()) == [4, 5, 6, 7]
