"""Image sources: an ImageFolder root, a list of (path, label), or in-memory uint8 arrays.

Every backend consumes one of two normalized forms: :class:`FileSource` (encoded files on disk, decoded by the
backend) or :class:`ArraySource` (already-decoded HWC uint8 images, e.g. CIFAR or the offline digits).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Leading bytes of the formats both backends decode; a file without one of them is rejected before decoding so the
# error names the file instead of surfacing as an anonymous decoder failure.
_MAGIC = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"BM",
    b"II*\x00",  # TIFF little endian
    b"MM\x00*",  # TIFF big endian
    b"GIF87a",
    b"GIF89a",
    b"P1",
    b"P2",
    b"P3",
    b"P4",
    b"P5",
    b"P6",
)


# torchvision >= 0.24 warns on every decode that torchcodec will take over; the decoders still work.
TORCHVISION_IO_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"


class CorruptImageError(RuntimeError):
    """A file could not be read or decoded as an image. ``path`` names the file."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot decode image {path!r}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True, eq=False)
class FileSource:
    """Encoded image files with integer labels (-1 = unknown).

    Attributes:
        paths: file paths, one per sample.
        labels: (N,) int64.
        classes: class names by label id, when known (ImageFolder).
    """

    paths: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(labels) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(labels)} labels")
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int] | np.ndarray) -> FileSource:
        """Samples at ``indices``, labels and class names unchanged."""
        idx = np.asarray(indices, dtype=np.int64)
        return FileSource(tuple(self.paths[i] for i in idx), self.labels[idx], self.classes)


@dataclass(frozen=True, eq=False)
class ArraySource:
    """Decoded images held in memory.

    Attributes:
        images: (N, H, W, 3) uint8, C-contiguous (grayscale input is replicated to 3 channels).
        labels: (N,) int64 (-1 = unknown).
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        # torch tensors (on any device) go through .cpu() first: np.asarray cannot read a CUDA tensor
        images = self.images.cpu().numpy() if isinstance(self.images, torch.Tensor) else np.asarray(self.images)
        if images.dtype != np.uint8:
            raise TypeError(f"in-memory images must be uint8 (N,H,W[,C]), got dtype {images.dtype}")
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"in-memory images must have shape (N,H,W), (N,H,W,1) or (N,H,W,3), got {images.shape}")
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        raw_labels = self.labels.cpu().numpy() if isinstance(self.labels, torch.Tensor) else self.labels
        labels = np.asarray(raw_labels, dtype=np.int64).reshape(-1)
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        object.__setattr__(self, "images", np.ascontiguousarray(images))
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ArraySource:
        idx = np.asarray(indices, dtype=np.int64)
        return ArraySource(self.images[idx], self.labels[idx])


Source = FileSource | ArraySource


def image_folder(root: str | os.PathLike, extensions: Sequence[str] = IMG_EXTENSIONS) -> FileSource:
    """Scan an ImageNet-layout folder ``root/<class>/**/<image>``; class ids follow sorted class names.

    Files whose extension is not in ``extensions`` are ignored (as torchvision's ImageFolder does); a file with an
    image extension but non-image content fails at decode time with a :class:`CorruptImageError` naming it.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(
            f"image folder {str(root)!r} has no class sub-directories (expected root/<class>/<img>)"
        )
    exts = tuple(e.lower() for e in extensions)
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            for filename in sorted(filenames):
                if filename.lower().endswith(exts):
                    paths.append(os.path.join(dirpath, filename))
                    labels.append(label)
    if not paths:
        raise FileNotFoundError(f"image folder {str(root)!r} contains no files with extensions {exts}")
    return FileSource(tuple(paths), np.asarray(labels, dtype=np.int64), tuple(classes))


def as_source(source: Any) -> Source:
    """Normalize any supported ``source`` into a FileSource or ArraySource.

    Accepted: a FileSource/ArraySource; a directory path (ImageFolder); a list of (path, label); a uint8 array
    (N,H,W[,C]) (labels -1); a tuple (images, labels); a mapping with "images" and "labels"; or an object with
    ``.data`` and ``.targets`` (torchvision's CIFAR datasets).
    """
    if isinstance(source, (FileSource, ArraySource)):
        return source
    if isinstance(source, (str, os.PathLike)):
        return image_folder(source)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return ArraySource(source, np.full(len(source), -1, dtype=np.int64))
    if isinstance(source, Mapping) and "images" in source:
        return ArraySource(source["images"], source.get("labels", np.full(len(source["images"]), -1)))
    if hasattr(source, "data") and hasattr(source, "targets"):
        return ArraySource(np.asarray(source.data), np.asarray(source.targets))
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], (np.ndarray, torch.Tensor)):
        return ArraySource(source[0], source[1])
    if isinstance(source, Sequence) and len(source) > 0:
        try:
            paths = tuple(os.fspath(p) for p, _ in source)
            labels = np.asarray([int(lbl) for _, lbl in source], dtype=np.int64)
        except (TypeError, ValueError) as err:
            raise TypeError("a list source must contain (path, label) pairs") from err
        return FileSource(paths, labels)
    raise TypeError(
        "source must be an ImageFolder root, a list of (path, label), uint8 arrays (N,H,W[,C]), (images, labels), "
        f"or a dataset with .data/.targets; got {type(source).__name__}"
    )


def read_encoded(path: str) -> np.ndarray:
    """Read a file's bytes as a uint8 array, rejecting empty and non-image files with an error naming the file."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise CorruptImageError(path, f"cannot read file ({err})") from err
    if data.size == 0:
        raise CorruptImageError(path, "file is empty")
    head = data[:16].tobytes()
    is_webp = head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    if not (is_webp or any(head.startswith(m) for m in _MAGIC)):
        raise CorruptImageError(path, "not an image (unrecognized file signature)")
    return data


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    """An unsigned-integer image of more than 8 bits, rounded to uint8 over its full range (v · 255 / max)."""
    top = float(torch.iinfo(image.dtype).max)
    return (image.to(torch.float64) * (255.0 / top)).round_().to(torch.uint8)


def decode_file(path: str) -> torch.Tensor:
    """Decode one file to a (3, H, W) uint8 RGB tensor; any failure raises CorruptImageError naming the file."""
    import torchvision.io as tvio

    data = read_encoded(path)
    try:
        # JPEG/PNG/GIF/WebP through torchvision's decoders; truncated JPEGs raise instead of returning grey rows.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=TORCHVISION_IO_DEPRECATION)
            if data[:3].tobytes() == b"\xff\xd8\xff":
                return tvio.decode_jpeg(torch.from_numpy(data), mode=tvio.ImageReadMode.RGB)
            image = tvio.decode_image(torch.from_numpy(data), mode=tvio.ImageReadMode.RGB)
            if image.dtype != torch.uint8:  # 16-bit PNGs decode to uint16: rescale to 8 bits like every other image
                image = _to_uint8(image)
            return image
    except (RuntimeError, ValueError) as tv_err:
        tv_reason = str(tv_err).splitlines()[0] if str(tv_err) else type(tv_err).__name__
    try:  # formats torchvision does not decode (BMP, TIFF, PNM) go through Pillow
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    except Exception as pil_err:  # noqa: BLE001 - any Pillow failure means the file is not a usable image
        raise CorruptImageError(path, f"{tv_reason}; Pillow: {pil_err}") from pil_err
