"""Generator of a synthetic JPEG ImageFolder for loader tests and benchmarks (no download, deterministic).

Each class has its own hue and shape (ellipse or rectangle) over a smooth two-colour gradient plus pixel noise, and
image sizes vary, so decoders, crops and colour ops see realistic, non-constant content of several sizes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from fastssl.data.sources import TORCHVISION_IO_DEPRECATION


def _hue_to_rgb(h: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return 1.0 - np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def synthetic_image(label: int, num_classes: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 image of class ``label``."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (xx / max(width - 1, 1)) * rng.uniform(0.2, 1.0) + (yy / max(height - 1, 1)) * rng.uniform(0.0, 0.8)
    bg_a, bg_b = rng.uniform(0, 1, size=3), rng.uniform(0, 1, size=3)
    img = bg_a * (1 - t[..., None] / t.max()) + bg_b * (t[..., None] / t.max())
    colour = _hue_to_rgb(label / num_classes) * rng.uniform(0.7, 1.0)
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    ry, rx = rng.uniform(0.15, 0.35) * height, rng.uniform(0.15, 0.35) * width
    if label % 2 == 0:
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    else:
        mask = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
    img[mask] = colour
    img = img * 255.0 + rng.normal(0.0, 8.0, size=img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def make_synthetic_image_folder(
    root: str | os.PathLike,
    *,
    num_classes: int = 4,
    images_per_class: int = 16,
    min_size: int = 48,
    max_size: int = 96,
    quality: int = 90,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Write ``root/class_XX/img_XXXXX.jpg`` and return ``root``.

    The folder is written to a temporary sibling and renamed into place, so an interrupted run never leaves a
    half-written dataset behind. Height and width are drawn independently from [min_size, max_size].

    Args:
        root: destination (must not exist unless ``overwrite``).
        num_classes: number of class folders.
        images_per_class: JPEGs per class.
        min_size: smallest image side.
        max_size: largest image side.
        quality: JPEG quality.
        seed: content seed.
        overwrite: replace an existing ``root``.
        progress: show a progress bar (default: when writing more than 500 images and tqdm is installed).

    Returns:
        The dataset root.
    """
    from torchvision.io import encode_jpeg

    root = Path(root)
    if root.exists() and not overwrite:
        raise FileExistsError(f"{root} exists; pass overwrite=True to replace it")
    if num_classes < 1 or images_per_class < 1 or not 1 <= min_size <= max_size:
        raise ValueError("need num_classes >= 1, images_per_class >= 1 and 1 <= min_size <= max_size")
    root.parent.mkdir(parents=True, exist_ok=True)
    total = num_classes * images_per_class
    show = progress if progress is not None else total > 500
    bar = None
    if show:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=f"writing {root.name}", unit="img")
        except ImportError:
            bar = None
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        for label in range(num_classes):
            class_dir = tmp / f"class_{label:02d}"
            class_dir.mkdir()
            for k in range(images_per_class):
                rng = np.random.default_rng([seed, label, k])
                h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
                img = synthetic_image(label, num_classes, h, w, rng)
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=TORCHVISION_IO_DEPRECATION)
                    data = encode_jpeg(torch.from_numpy(img).permute(2, 0, 1).contiguous(), quality=quality)
                (class_dir / f"img_{k:05d}.jpg").write_bytes(data.numpy().tobytes())
                if bar is not None:
                    bar.update(1)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return root
