"""Feature extraction: normalized fp16 features in dataset order, the on-disk cache, and DDP gathering (gloo)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from fastssl.eval.features import Features, data_fingerprint, extract_features, model_fingerprint


def _data(n: int = 37, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, 5, (n,), generator=g))


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.BatchNorm1d(8))


class CountingModel(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


def _expected(model: nn.Module, data: torch.utils.data.TensorDataset) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return F.normalize(model(data.tensors[0]).float(), dim=1).half()


def test_features_are_normalized_fp16_in_dataset_order_and_mode_restored():
    data, model = _data(), _model()
    model.train()
    out = extract_features(model, data, batch_size=8, progress=False)
    assert model.training  # eval() during extraction only
    assert out.features.dtype == torch.float16 and out.features.shape == (37, 8)
    torch.testing.assert_close(out.features, _expected(model, data), atol=1e-3, rtol=0)
    assert torch.equal(out.labels, data.tensors[1])
    torch.testing.assert_close(out.features.float().norm(dim=1), torch.ones(37), atol=2e-3, rtol=0)
    # Any iterable of (images, labels) batches gives the same result.
    batches = [(data.tensors[0][i : i + 5], data.tensors[1][i : i + 5]) for i in range(0, 37, 5)]
    again = extract_features(model, batches, progress=False)
    torch.testing.assert_close(again.features, out.features, atol=1e-3, rtol=0)
    assert torch.equal(again.labels, out.labels)


def test_cache_hit_skips_the_model_and_weights_change_the_key(tmp_path):
    data = _data()
    model = CountingModel(_model())
    first = extract_features(model, data, batch_size=10, progress=False, cache_dir=tmp_path, cache_key="ckpt-a|val")
    assert model.calls == 4 and not first.from_cache
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"  # no temporary file left behind
    model.calls = 0
    second = extract_features(model, data, batch_size=10, progress=False, cache_dir=tmp_path, cache_key="ckpt-a|val")
    assert model.calls == 0 and second.from_cache
    assert torch.equal(second.features, first.features) and torch.equal(second.labels, first.labels)
    # A different key (another checkpoint) recomputes.
    extract_features(model, data, batch_size=10, progress=False, cache_dir=tmp_path, cache_key="ckpt-b|val")
    assert model.calls == 4
    # The automatic key follows the weights: change one and the cache misses.
    auto = CountingModel(_model())
    with pytest.raises(ValueError, match="pass cache_key"):
        extract_features(auto, data, progress=False, cache_dir=tmp_path)

    class Fingerprinted(torch.utils.data.TensorDataset):
        def fingerprint(self) -> str:
            return "toy-v1"

    fdata = Fingerprinted(*data.tensors)
    extract_features(auto, fdata, progress=False, cache_dir=tmp_path)
    fp = model_fingerprint(auto)
    auto.calls = 0
    extract_features(auto, fdata, progress=False, cache_dir=tmp_path)
    assert auto.calls == 0
    with torch.no_grad():
        auto.inner[1].weight[0, 0] += 1.0
    assert model_fingerprint(auto) != fp
    extract_features(auto, fdata, progress=False, cache_dir=tmp_path)
    assert auto.calls > 0
    assert data_fingerprint(fdata) == "toy-v1"


def test_image_folder_fingerprint_follows_the_transforms_and_refuses_opaque_ones(tmp_path):
    """The automatic cache key of an ImageFolder changes with its transform and target transform; a transform whose
    repr does not say what it computes (a Lambda, a function) is refused instead of serving stale features."""
    import torchvision
    from torchvision import transforms

    from fastssl.data import make_synthetic_image_folder
    from fastssl.eval import eval_transform

    root = make_synthetic_image_folder(tmp_path / "d", num_classes=2, images_per_class=2, min_size=40, max_size=48)

    def key(transform, target_transform=None):
        return data_fingerprint(torchvision.datasets.ImageFolder(root, transform, target_transform))

    assert key(eval_transform(32)) == key(eval_transform(32))
    assert key(eval_transform(32)) != key(eval_transform(24))
    for transform, target_transform, name in [
        (transforms.Lambda(lambda x: x), None, "transform"),
        (eval_transform(32), lambda y: y + 100, "target_transform"),
    ]:
        with pytest.raises(ValueError, match=f"cannot identify the dataset's {name} .*pass cache_key"):
            key(transform, target_transform)


def test_nan_features_raise():
    class NaNModel(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 4), float("nan"))

    with pytest.raises(ValueError, match="NaN/inf features in batch 0"):
        extract_features(NaNModel(), _data(), device="cpu", progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data, model = _data(), _model()
        sharded = extract_features(model, data, batch_size=4, progress=False)
        batches = [(data.tensors[0][i : i + 6], data.tensors[1][i : i + 6]) for i in range(0, 37, 6)]
        dealt = extract_features(model, batches, progress=False)
        # a loader the user already sharded with a DistributedSampler: still every sample once, in dataset order
        sampler = torch.utils.data.DistributedSampler(data, shuffle=True, seed=3)
        user_sharded = extract_features(model, torch.utils.data.DataLoader(data, 5, sampler=sampler), progress=False)
        if rank == 0:
            out = {"sharded": sharded, "dealt": dealt, "user_sharded": user_sharded}
            torch.save(out, os.path.join(out_dir, "rank0.pt"))
        else:
            assert sharded is None and dealt is None and user_sharded is None
    finally:
        dist.destroy_process_group()


def test_ddp_extraction_gathers_to_rank0_in_dataset_order(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "rank0.pt", weights_only=False)
    data, model = _data(), _model()
    expected = _expected(model, data)
    for name in ("sharded", "dealt", "user_sharded"):
        out: Features = got[name]
        assert out.features.shape == (37, 8), name
        torch.testing.assert_close(out.features, expected, atol=1e-3, rtol=0)
        assert torch.equal(out.labels, data.tensors[1]), name


def test_eval_transform_is_the_isd_msf_one():
    """Resize(256) with torchvision's default (bilinear) interpolation, then CenterCrop(224): ISD/MSF eval_knn.py."""
    from torchvision import transforms

    from fastssl.eval import eval_transform

    resize, crop = eval_transform(224).transforms[:2]
    assert resize.size == 256 and resize.interpolation == transforms.InterpolationMode.BILINEAR
    assert tuple(crop.size) == (224, 224)
