"""Frozen-backbone feature extraction for evaluation: eval transform, AMP forward, L2-normalized fp16 features,
DDP-sharded extraction gathered to rank 0, and an on-disk cache so repeated evaluations of one checkpoint are free.

The eval transform is the papers' (ISD/MSF follow CompRess, Koohpayegani et al. 2020): resize the shorter side to
256 (bilinear: torchvision's default ``Resize(256)`` in their ``eval_knn.py``; DINO uses bicubic) and center-crop
224, ImageNet mean/std. Features are L2-normalized in fp32 and stored in fp16 (a 1,281,167 × 2048
ImageNet train set is 5.2 GB instead of 10.5 GB in fp32), which is what the kNN and linear-probe code consume.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_FORMAT_VERSION = "1"


@dataclass(frozen=True)
class Features:
    """Extracted features of one dataset split.

    Attributes:
        features: (N, D) L2-normalized features (fp16 by default), on CPU, in dataset order.
        labels: (N,) int64 labels.
        from_cache: whether they were loaded from the on-disk cache instead of computed.
    """

    features: torch.Tensor
    labels: torch.Tensor
    from_cache: bool = False


def eval_transform(
    image_size: int | tuple[int, int] = 224,
    resize: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable:
    """The papers' evaluation transform: resize the shorter side, center crop, to tensor, normalize.

    Args:
        image_size: crop size (224 for ImageNet), or (height, width).
        resize: shorter-side size before the crop; defaults to the crop's shorter side / 0.875 (256 for 224).
        mean: per-channel mean.
        std: per-channel std.

    Returns:
        a torchvision transform taking a PIL image and returning a (3, height, width) float tensor.
    """
    from torchvision import transforms

    crop = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    resize = resize if resize is not None else round(min(crop) / 0.875)
    return transforms.Compose(
        [
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(crop),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


# ---------------------------------------------------------------------------------------------- cache keys


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint file's bytes (read in 16 MB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes and values of every parameter and buffer)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


# Reprs that do not identify what a transform computes: torchvision's Lambda() and plain functions or objects.
_OPAQUE_REPR = re.compile(r"Lambda\(\)|<function |<lambda>| object at 0x")


def data_fingerprint(data: Any) -> str:
    """SHA-256 identifying a dataset's content for the feature cache.

    Understands objects with a ``fingerprint()`` method, torchvision ``ImageFolder``-style datasets (their ``samples``
    list: path, label, file size and modification time, plus the transform's and target transform's reprs), and
    DataLoaders over either. A transform whose repr does not identify it (a ``Lambda``, a plain function) is refused
    rather than risk serving another transform's features.

    Raises:
        ValueError: the data's identity cannot be determined (pass ``cache_key`` explicitly).
    """
    dataset = getattr(data, "dataset", data) if isinstance(data, torch.utils.data.DataLoader) else data
    if hasattr(dataset, "fingerprint") and callable(dataset.fingerprint):
        return str(dataset.fingerprint())
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list) and samples and isinstance(samples[0], tuple):
        digest = hashlib.sha256()
        for path, label in samples:
            stat = os.stat(path)
            digest.update(f"{os.path.abspath(path)}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        for name in ("transform", "target_transform"):
            description = repr(getattr(dataset, name, None))
            if _OPAQUE_REPR.search(description):
                raise ValueError(
                    f"cannot identify the dataset's {name} for the feature cache: its repr {description!r} does not "
                    "say what it computes (a Lambda or a plain function); pass cache_key= explicitly"
                )
            digest.update(f"{name}={description}\n".encode())
        return digest.hexdigest()
    raise ValueError(
        f"cannot identify the content of a {type(dataset).__name__} for the feature cache; pass cache_key= explicitly "
        "(for example a hash of the file list and the transform)"
    )


def _cache_file(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / f"features-{key[:32]}.safetensors"


def _load_cache(path: Path, key: str) -> Features | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return Features(f.get_tensor("features"), f.get_tensor("labels"), from_cache=True)
    except (OSError, ValueError, RuntimeError) as err:  # unreadable or foreign file: recompute and overwrite
        logger.warning("ignoring unreadable feature cache %s (%s)", path, err)
        return None


def _save_cache(path: Path, key: str, features: Features) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target, then rename: a crash never leaves a half-written cache file behind.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(
            {"features": features.features.contiguous(), "labels": features.labels.contiguous()},
            tmp,
            metadata={"key": key, "version": CACHE_FORMAT_VERSION},
        )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------------------------------------- extraction


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_map_dataset(data: Any) -> bool:
    return isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__") and hasattr(data, "__getitem__")


def _batches(
    data: Any, rank: int, world: int, batch_size: int, num_workers: int
) -> tuple[Iterable, int | None, Callable[[int], tuple[int, int]]]:
    """This rank's batches, their count, and a sort key per local batch that restores dataset order after gathering.

    Map-style datasets (or DataLoaders over one that read it in order, or shard it with a DistributedSampler, which
    is replaced: dealing out an already sharded loader's batches again would drop samples) are split into contiguous
    shards, one per rank, so each image is decoded once; any other iterable is dealt out batch by batch (rank r runs
    the model on batches r, r + W, ...).
    """
    if world == 1 and not _is_map_dataset(data):
        return data, (len(data) if hasattr(data, "__len__") else None), lambda j: (j, 0)
    loader_kwargs: dict[str, Any] = {"batch_size": batch_size, "num_workers": num_workers}
    dataset = None
    if isinstance(data, torch.utils.data.DataLoader):
        own_order = (torch.utils.data.SequentialSampler, torch.utils.data.DistributedSampler)
        if _is_map_dataset(data.dataset) and isinstance(data.sampler, own_order):
            dataset = data.dataset
            loader_kwargs = {
                "batch_size": data.batch_size or batch_size,
                "num_workers": data.num_workers,
                "collate_fn": data.collate_fn,
                "pin_memory": data.pin_memory,
            }
    elif _is_map_dataset(data):
        dataset = data
    if dataset is not None:
        n = len(dataset)
        per_rank = -(-n // world)
        shard = range(min(n, rank * per_rank), min(n, (rank + 1) * per_rank))
        subset = dataset if world == 1 else torch.utils.data.Subset(dataset, shard)
        loader = torch.utils.data.DataLoader(subset, shuffle=False, **loader_kwargs)
        return loader, len(loader), lambda j: (rank, j)
    total = len(data) if hasattr(data, "__len__") else None
    mine = (batch for i, batch in enumerate(data) if i % world == rank)
    count = None if total is None else len(range(rank, total, world))
    return mine, count, lambda j: (j * world + rank, 0)


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        images, labels = batch.get("image", batch.get("images")), batch.get("label", batch.get("labels"))
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        images, labels = batch[0], batch[1]
    else:
        raise TypeError(f"each batch must be (images, labels) or a dict with image/label keys, got {type(batch)}")
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"batch images must be a tensor, got {type(images).__name__}")
    return images, torch.as_tensor(labels).long().reshape(-1)


def _gather_to_rank0(
    local_feats: list[torch.Tensor],
    local_labels: list[torch.Tensor],
    keys: list[tuple[int, int]],
    rank: int,
    world: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Gather every rank's batches to rank 0 and put them back in dataset order (padded tensor gather)."""
    feats = torch.cat(local_feats) if local_feats else torch.empty(0, 0, dtype=torch.float16)
    labels = torch.cat(local_labels) if local_labels else torch.empty(0, dtype=torch.long)
    meta = {"keys": keys, "sizes": [len(t) for t in local_labels], "n": len(labels), "d": feats.shape[1]}
    metas: list[Any] = [None] * world
    dist.all_gather_object(metas, meta)
    n_max = max(m["n"] for m in metas)
    d = max(m["d"] for m in metas)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    f_pad = torch.zeros(n_max, d, dtype=feats.dtype if feats.numel() else torch.float16, device=device)
    l_pad = torch.zeros(n_max, dtype=torch.long, device=device)
    if meta["n"]:
        f_pad[: meta["n"]] = feats.to(device)
        l_pad[: meta["n"]] = labels.to(device)
    f_list = [torch.empty_like(f_pad) for _ in range(world)] if rank == 0 else None
    l_list = [torch.empty_like(l_pad) for _ in range(world)] if rank == 0 else None
    dist.gather(f_pad, f_list, dst=0)
    dist.gather(l_pad, l_list, dst=0)
    if rank != 0:
        return None
    pieces = []  # (sort key, features, labels) per batch from every rank
    for r, m in enumerate(metas):
        offset = 0
        for key, size in zip(m["keys"], m["sizes"], strict=True):
            pieces.append((key, f_list[r][offset : offset + size], l_list[r][offset : offset + size]))
            offset += size
    pieces.sort(key=lambda p: p[0])
    if not pieces:
        return torch.empty(0, d, dtype=torch.float16), torch.empty(0, dtype=torch.long)
    return torch.cat([p[1] for p in pieces]).cpu(), torch.cat([p[2] for p in pieces]).cpu()


def extract_features(
    model: nn.Module,
    data: Iterable | torch.utils.data.Dataset,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    amp: bool = True,
    dtype: torch.dtype = torch.float16,
    progress: bool = True,
    desc: str = "features",
    cache_dir: str | os.PathLike | None = None,
    cache_key: str | None = None,
) -> Features | None:
    """Run a frozen backbone over a dataset and return L2-normalized features with their labels.

    Under ``torch.distributed`` every rank extracts its shard and the result is gathered on rank 0 in dataset order;
    the other ranks return None. The model runs in eval mode under ``torch.inference_mode`` (its training mode is
    restored afterwards), with fp16 autocast on CUDA when ``amp`` is True.

    Args:
        model: backbone mapping (B, C, H, W) images to (B, D) or (B, D, 1, 1) features.
        data: a map-style dataset of (image, label) (batched here, sharded across ranks), a DataLoader, or any
            iterable of (images, labels) batches (dealt out batch by batch across ranks).
        device: where the model runs; defaults to the model's device.
        batch_size: batch size when batching a dataset here.
        num_workers: DataLoader workers when batching a dataset here.
        amp: fp16 autocast on CUDA (ignored on CPU).
        dtype: storage dtype of the returned features.
        progress: show a tqdm progress bar (rank 0 only).
        desc: progress-bar label.
        cache_dir: if given, features are cached there as ``features-<key>.safetensors`` and reused when the key
            matches; the key covers the model's weights, the data's identity (:func:`data_fingerprint`) and dtype/AMP.
        cache_key: explicit identity of model + data (e.g. checkpoint hash + split), replacing the automatic one.

    Returns:
        :class:`Features` on rank 0 (CPU tensors), None on other ranks.

    Raises:
        ValueError: the model produced NaN/inf features, or the cache key cannot be derived.
        TypeError: malformed batches.
    """
    rank, world = _rank_world()
    device = torch.device(device) if device is not None else next(model.parameters(), torch.empty(0)).device
    cache_path = None
    if cache_dir is not None:
        identity = cache_key if cache_key is not None else f"{model_fingerprint(model)}|{data_fingerprint(data)}"
        autocast = amp and device.type == "cuda"  # what the forward really ran with (amp is ignored on CPU)
        key = hashlib.sha256(f"{CACHE_FORMAT_VERSION}|{identity}|{dtype}|amp={autocast}".encode()).hexdigest()
        cache_path = _cache_file(cache_dir, key)
        if cache_path.exists():
            cached = _load_cache(cache_path, key) if rank == 0 else None
            hit = torch.tensor([int(cached is not None) if rank == 0 else 0])
            if world > 1:
                dist.broadcast(hit, src=0)
            if bool(hit):
                logger.info("features: cache hit %s", cache_path)
                return cached

    from tqdm.auto import tqdm

    batches, count, sort_key = _batches(data, rank, world, batch_size, num_workers)
    was_training = model.training
    model.eval()
    local_feats: list[torch.Tensor] = []
    local_labels: list[torch.Tensor] = []
    keys: list[tuple[int, int]] = []
    try:
        with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=amp and device.type == "cuda"):
            bar = tqdm(batches, total=count, desc=desc, unit="batch", disable=not progress or rank != 0)
            for j, batch in enumerate(bar):
                images, labels = _split_batch(batch)
                out = model(images.to(device, non_blocking=True))
                out = out[0] if isinstance(out, (tuple, list)) else out
                out = out.float().flatten(1)
                if not bool(torch.isfinite(out).all()):
                    raise ValueError(f"the model produced NaN/inf features in batch {j} of {desc!r}")
                local_feats.append(F.normalize(out, dim=1).to(dtype).cpu())
                local_labels.append(labels.cpu())
                keys.append(sort_key(j))
    finally:
        model.train(was_training)

    if world > 1:
        gathered = _gather_to_rank0(local_feats, local_labels, keys, rank, world)
        if gathered is None:
            return None
        feats, labels = gathered
    else:
        feats = torch.cat(local_feats) if local_feats else torch.empty(0, 0, dtype=dtype)
        labels = torch.cat(local_labels) if local_labels else torch.empty(0, dtype=torch.long)
    result = Features(feats, labels)
    if cache_path is not None and rank == 0:
        _save_cache(cache_path, key, result)
    return result
