"""Loader throughput: images/s for two 224 px views (weak + MoCo v2), DALI vs torchvision, same JPEG folder.

Providers: ``torchvision`` (DataLoader workers, one per thread), ``dali-cpu`` (CPU-only pipeline, libjpeg-turbo
decode), and ``dali-gpu`` (nvJPEG ``device="mixed"`` decode, augmentation on the GPU) wherever DALI and a GPU are both
present. Each provider runs one warm-up epoch, then the timed epochs; images/s counts decoded source images (each
yields two views). The folder is synthetic (:func:`fastssl.data.make_synthetic_image_folder`), ImageNet-like in
size unless ``--smoke``.

    python benchmarks/bench_data.py                # writes benchmarks/results/<device>/bench_data.{json,md}
    python benchmarks/bench_data.py --smoke --out-dir /tmp/x
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import base_parser, environment, write_results  # noqa: E402

from fastssl.data import dali_import_error, make_loader, make_synthetic_image_folder  # noqa: E402
from fastssl.data.torchvision_backend import default_num_workers  # noqa: E402

VIEWS = ["weak", "mocov2"]


def _epoch(loader) -> tuple[int, float]:
    start = time.perf_counter()
    seen = 0
    for batch in loader:
        seen += len(batch["index"])
        if batch["views"][0].is_cuda:
            torch.cuda.synchronize()
    return seen, time.perf_counter() - start


def measure(folder: Path, provider: str, *, batch_size: int, threads: int, epochs: int) -> dict:
    backend, device = {
        "torchvision": ("torchvision", "cpu"),
        "dali-cpu": ("dali", "cpu"),
        "dali-gpu": ("dali", "cuda"),
    }[provider]
    loader = make_loader(
        folder, VIEWS, batch_size, backend=backend, device=device, num_workers=threads, seed=0, verbose=False
    )
    _epoch(loader)  # warm-up: worker start, pipeline build, page cache
    seen, seconds = 0, 0.0
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        n, s = _epoch(loader)
        seen, seconds = seen + n, seconds + s
    views = [tuple(v.shape[1:]) for v in next(iter(loader))["views"]]
    return {
        "provider": provider,
        "decode": {
            "torchvision": "cpu (torchvision.io)",
            "dali-cpu": "cpu (libjpeg-turbo)",
            "dali-gpu": "mixed (nvJPEG)",
        }[provider],
        "threads": threads,
        "batch_size": batch_size,
        "images": seen,
        "views": str(views),
        "seconds": seconds,
        "images_per_s": seen / seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="JPEGs in the synthetic folder (default 512)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="workers / DALI threads (default: cores, <= 8)")
    parser.add_argument("--epochs", type=int, default=None, help="timed epochs after one warm-up epoch")
    args = parser.parse_args(argv)
    images = args.images or (16 if args.smoke else 512)
    batch_size = args.batch_size or (8 if args.smoke else 32)
    epochs = args.epochs or (1 if args.smoke else 2)
    threads = args.threads or default_num_workers()
    min_size, max_size = (96, 128) if args.smoke else (300, 500)  # ImageNet's mean is ~400 x 350

    providers = ["torchvision"]
    dali_missing = dali_import_error()
    if dali_missing is None:
        providers.append("dali-cpu")
        if torch.cuda.is_available() and not args.smoke and args.device != "cpu":
            providers.append("dali-gpu")
    else:
        print(f"DALI unavailable ({dali_missing}): torchvision only", file=sys.stderr)

    rows = []
    with tempfile.TemporaryDirectory(prefix="fastssl_bench_data_") as tmp:
        classes = 8
        folder = make_synthetic_image_folder(
            Path(tmp) / "jpegs",
            num_classes=classes,
            images_per_class=max(1, images // classes),
            min_size=min_size,
            max_size=max_size,
            seed=0,
        )
        for provider in providers:
            row = measure(folder, provider, batch_size=batch_size, threads=threads, epochs=epochs)
            rows.append(row)
            print(
                f"{provider:12s} {row['images_per_s']:8.1f} images/s ({row['images']} images, {row['seconds']:.2f} s)"
            )
    base = rows[0]["images_per_s"]
    for row in rows:
        row["speedup_vs_torchvision"] = row["images_per_s"] / base
    env = environment("cuda" if "dali-gpu" in providers else "cpu")
    notes = (
        f"{images} synthetic JPEGs of {min_size}-{max_size} px, views {VIEWS} at 224 px, one warm-up epoch then "
        f"{epochs} timed epoch(s); images/s counts source images (two views each). "
        + ("" if "dali-gpu" in providers else "No GPU with DALI here: the dali-gpu provider was not run.")
    )
    write_results(
        "bench_data", rows, title="Loader throughput: two views at 224 px", out_dir=args.out_dir, env=env, notes=notes
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
