"""CPU augmentation backend: torchvision.transforms.v2 functional ops in DataLoader workers.

Every random draw of a sample comes from one ``numpy`` generator seeded by ``sample_seeds(seed, epoch, index)``, so
the augmented pixels of a sample depend only on (seed, epoch, index, specs): the same for any worker count, rank,
world size, batch position, or resume point. The draws follow torchvision's own transforms (RandomResizedCrop's
10-attempt sampler with its centre-crop fallback, ColorJitter's random op order), so this backend is the reference the
DALI backend is compared with.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fastssl.data.epoch_loader import Batch, MultiViewLoader
from fastssl.data.sampler import ShardedBatchOrder, sample_seeds
from fastssl.data.sources import ArraySource, CorruptImageError, Source, decode_file
from fastssl.data.spec import ViewSpec

_DRAWS_PER_VIEW = 64  # fixed budget of uniforms per view keeps each op's draw independent of the others' outcomes
_CROP_ATTEMPTS = 10


def sample_crop(height: int, width: int, spec: ViewSpec, u: Sequence[float]) -> tuple[int, int, int, int]:
    """RandomResizedCrop window (top, left, h, w) from 40 uniforms ``u``, torchvision's algorithm.

    Up to 10 attempts draw an area fraction uniformly from ``spec.scale`` and an aspect ratio log-uniformly from
    ``spec.ratio``; the first window that fits is placed uniformly. Otherwise the largest centred window with the
    closest allowed aspect ratio is used.
    """
    area = height * width
    log_lo, log_hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    for attempt in range(_CROP_ATTEMPTS):
        a, r, y, x = u[4 * attempt : 4 * attempt + 4]
        target_area = area * (spec.scale[0] + (spec.scale[1] - spec.scale[0]) * a)
        aspect = math.exp(log_lo + (log_hi - log_lo) * r)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(y * (height - h + 1)), height - h)
            left = min(int(x * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < spec.ratio[0]:
        w, h = width, int(round(width / spec.ratio[0]))
    elif in_ratio > spec.ratio[1]:
        h, w = height, int(round(height * spec.ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_view(image: torch.Tensor, spec: ViewSpec, u: Sequence[float]) -> torch.Tensor:
    """Apply one view to one image.

    Args:
        image: (3, H, W) uint8 RGB.
        spec: the view.
        u: 64 uniforms in [0, 1) driving every random choice.

    Returns:
        (3, size_h, size_w) float32, normalized with ``spec.mean`` / ``spec.std``.
    """
    from torchvision.transforms.v2 import functional as F

    top, left, h, w = sample_crop(image.shape[-2], image.shape[-1], spec, u[:40])
    x = F.resized_crop(image, top, left, h, w, list(spec.size), antialias=True)
    x = x.to(torch.float32).div_(255.0)
    if spec.has_jitter and u[40] < spec.jitter_p:
        b, c, s, hue = spec.jitter
        factors = (
            1.0 + b * (2.0 * u[41] - 1.0),
            1.0 + c * (2.0 * u[42] - 1.0),
            1.0 + s * (2.0 * u[43] - 1.0),
            hue * (2.0 * u[44] - 1.0),
        )
        ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
        strengths = (b, c, s, hue)
        for op_id in np.argsort(np.asarray(u[45:49])):  # ColorJitter's random op order
            if strengths[op_id] > 0:
                x = ops[op_id](x, factors[op_id])
    if u[49] < spec.grayscale_p:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if u[50] < spec.blur_p:
        sigma = spec.blur_sigma[0] + (spec.blur_sigma[1] - spec.blur_sigma[0]) * u[51]
        radius = min(spec.blur_radius(sigma), min(x.shape[-2:]) - 1)  # reflect padding needs radius < side
        x = F.gaussian_blur(x, [2 * radius + 1, 2 * radius + 1], [sigma, sigma])
    if u[52] < spec.solarize_p:
        x = F.solarize(x, spec.solarize_threshold)
    if u[53] < spec.flip_p:
        x = F.horizontal_flip(x)
    return F.normalize(x, list(spec.mean), list(spec.std))


def augment_sample(image: torch.Tensor, views: Sequence[ViewSpec], seed: int) -> list[torch.Tensor]:
    """All views of one (3, H, W) uint8 image, randomness from ``seed`` only."""
    u = np.random.default_rng(int(seed)).random(_DRAWS_PER_VIEW * len(views)).tolist()
    return [augment_view(image, v, u[i * _DRAWS_PER_VIEW : (i + 1) * _DRAWS_PER_VIEW]) for i, v in enumerate(views)]


def load_image(source: Source, index: int) -> torch.Tensor:
    """(3, H, W) uint8 image ``index`` of ``source`` (files are decoded; CorruptImageError names a bad file)."""
    if isinstance(source, ArraySource):
        return torch.from_numpy(source.images[index]).permute(2, 0, 1)
    return decode_file(source.paths[index])


class _MultiViewDataset(Dataset):
    """Map-style dataset keyed by (index, sample_seed); returns None for a skipped corrupt file."""

    def __init__(self, source: Source, views: list[ViewSpec], on_error: str) -> None:
        self.source = source
        self.views = views
        self.on_error = on_error

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        try:
            image = load_image(self.source, index)
        except CorruptImageError as err:
            if self.on_error == "raise":
                raise
            warnings.warn(f"skipping sample {index}: {err}", RuntimeWarning, stacklevel=2)
            return None
        return augment_sample(image, self.views, seed), index, int(self.source.labels[index])


class _Collate:
    def __init__(self, num_views: int, channels_last: bool) -> None:
        self.num_views = num_views
        self.channels_last = channels_last

    def __call__(self, items: list) -> Batch:
        items = [it for it in items if it is not None]
        if not items:
            return {"views": [], "index": torch.empty(0, dtype=torch.int64), "label": torch.empty(0, dtype=torch.int64)}
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        views = [torch.stack([it[0][v] for it in items]).contiguous(memory_format=fmt) for v in range(self.num_views)]
        return {
            "views": views,
            "index": torch.tensor([it[1] for it in items], dtype=torch.int64),
            "label": torch.tensor([it[2] for it in items], dtype=torch.int64),
        }


class _BatchKeys:
    """Batch sampler yielding [(index, seed), ...]; its (epoch, start) is set before each DataLoader iteration."""

    def __init__(self, order: ShardedBatchOrder) -> None:
        self.order = order
        self.epoch = 0
        self.start_step = 0

    def __len__(self) -> int:
        return len(self.order) - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for idx in self.order.batches(self.epoch, self.start_step):
            seeds = sample_seeds(self.order.seed, self.epoch, idx)
            yield list(zip(idx.tolist(), seeds.tolist(), strict=True))


def default_num_workers() -> int:
    """One worker per available core, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


class TorchvisionLoader(MultiViewLoader):
    """Multi-view loader on torchvision ops and DataLoader workers (pinned memory when the target is CUDA).

    A batch loses a sample whose file is corrupt when ``on_error="skip"`` (with a RuntimeWarning naming the file).
    """

    backend = "torchvision"

    def __init__(self, *args, num_workers: int | None = None, prefetch_factor: int = 2, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if num_workers is None:
            num_workers = default_num_workers()
        self.num_workers = num_workers
        self._keys = _BatchKeys(self.order)
        self._loader = DataLoader(
            _MultiViewDataset(self.source, self.views, self.on_error),
            batch_sampler=self._keys,
            num_workers=num_workers,
            collate_fn=_Collate(len(self.views), self.channels_last),
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
        )

    def _iter_batches(self, epoch: int, start_step: int) -> Iterator[Batch]:
        self._keys.epoch, self._keys.start_step = epoch, start_step
        batches = iter(self._loader)
        while True:
            if self.num_workers == 0:
                # Per-image ops on tiny tensors are ~8x slower with intra-op threads (workers already run with 1);
                # the caller's setting is restored before the batch is handed over.
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    batch = next(batches, None)
                finally:
                    torch.set_num_threads(threads)
            else:
                batch = next(batches, None)
            if batch is None:
                return
            if not batch["views"]:  # every sample of the batch was corrupt and skipped (on_error="skip"), as in DALI
                continue
            if self.device.type != "cpu":
                batch = {
                    "views": [v.to(self.device, non_blocking=True) for v in batch["views"]],
                    "index": batch["index"].to(self.device, non_blocking=True),
                    "label": batch["label"].to(self.device, non_blocking=True),
                }
            yield batch
