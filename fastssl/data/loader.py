"""``make_loader``: one entry point for both backends, with the backend choice logged once."""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fastssl.data.epoch_loader import MultiViewLoader
from fastssl.data.sampler import ShardedBatchOrder, resolve_rank
from fastssl.data.sources import as_source
from fastssl.data.spec import ViewSpec, resolve_views

logger = logging.getLogger("fastssl.data")

ViewsArg = ViewSpec | str | Mapping[str, Any] | Sequence[ViewSpec | str | Mapping[str, Any]]


def dali_import_error() -> str | None:
    """None when ``nvidia.dali`` imports, else a one-line reason (checked on every call, never cached)."""
    try:
        importlib.import_module("nvidia.dali")
        importlib.import_module("nvidia.dali.fn")
    except Exception as err:  # noqa: BLE001 - a broken install (missing CUDA libs, ABI) must also fall back
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return None


def choose_backend(backend: str, device: torch.device) -> tuple[str, str]:
    """Resolve ``backend`` ("auto" | "dali" | "torchvision") to a concrete backend and the reason for it."""
    if backend == "torchvision":
        return "torchvision", "requested"
    if backend == "dali":
        missing = dali_import_error()
        if missing is not None:
            raise ImportError(
                f"backend='dali' was requested but NVIDIA DALI cannot be imported ({missing}); "
                "install it with `pip install 'fastssl[dali]'` or use backend='auto' to fall back to torchvision"
            )
        where = "GPU decoding (device='mixed')" if device.type == "cuda" else "CPU-only pipeline"
        return "dali", f"requested, {where}"
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'dali' or 'torchvision', got {backend!r}")
    missing = dali_import_error()
    if missing is not None:
        return "torchvision", f"DALI is not available ({missing}); install with `pip install 'fastssl[dali]'`"
    if device.type != "cuda":
        return "torchvision", f"DALI is installed but the target device is {device}, and DALI pays off with a GPU"
    return "dali", f"DALI is installed and the target device is {device} (GPU decoding with device='mixed')"


def _announce(message: str) -> None:
    # One line the user sees even without logging configured (logging's last-resort handler drops INFO).
    if logger.hasHandlers():
        logger.info(message)
    else:
        print(message, file=sys.stderr)


def make_loader(
    source: Any,
    views: ViewsArg,
    batch_size: int,
    *,
    backend: str = "auto",
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    start_step: int = 0,
    device: str | torch.device | None = None,
    channels_last: bool = False,
    num_workers: int | None = None,
    on_error: str = "raise",
    verbose: bool = True,
) -> MultiViewLoader:
    """Build a multi-view loader.

    Args:
        source: ImageFolder root, list of (path, label), uint8 arrays (N,H,W[,C]) / (images, labels), or a
            FileSource / ArraySource (see :func:`fastssl.data.sources.as_source`).
        views: view specs, preset names or dicts (see :func:`fastssl.data.spec.resolve_views`), e.g.
            ``["weak", "mocov2"]`` or ``"byol"``.
        batch_size: per-rank batch size N.
        backend: "auto" (DALI when it imports and the device is a GPU, else torchvision), "dali" or "torchvision".
        shuffle: reshuffle every epoch with a permutation determined by (seed, epoch).
        seed: base seed; shuffle order and augmentation draws are a function of (seed, epoch).
        drop_last: equal-size shards truncated to a multiple of world_size and no partial batch.
        rank: this rank (default: torch.distributed's, or 0).
        world_size: number of ranks (default: torch.distributed's, or 1).
        start_step: the first iteration starts at this batch of the current epoch (resume; see ``loader.resume``).
        device: where the views are delivered; default the current CUDA device when there is one, else CPU.
        channels_last: deliver the views in channels_last memory format.
        num_workers: torchvision DataLoader workers / DALI threads (default: available cores, at most 8).
        on_error: "raise" a CorruptImageError naming a bad file, or "skip" it (the batch shrinks by one, with a
            warning naming the file).
        verbose: print the one-line backend choice.

    Returns:
        A :class:`~fastssl.data.epoch_loader.MultiViewLoader`; iterating yields
        ``{"views": [(N, 3, H_v, W_v) float32 on device], "index": (N,) int64, "label": (N,) int64}``.
    """
    specs = resolve_views(views)
    src = as_source(source)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    rank, world_size = resolve_rank(rank, world_size)
    order = ShardedBatchOrder(
        len(src), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, rank=rank, world_size=world_size
    )
    chosen, reason = choose_backend(backend, device)
    common = dict(start_step=start_step, device=device, channels_last=channels_last, on_error=on_error, reason=reason)
    loader: MultiViewLoader
    if chosen == "dali":
        from fastssl.data.dali_backend import DaliLoader

        loader = DaliLoader(src, specs, order, num_threads=num_workers, **common)
    else:
        from fastssl.data.torchvision_backend import TorchvisionLoader

        loader = TorchvisionLoader(src, specs, order, num_workers=num_workers, **common)
    if verbose:
        _announce(f"fastssl.data: {chosen} backend ({reason}); {loader!r}")
    return loader
