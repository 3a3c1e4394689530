"""``fastssl eval knn|linear``: evaluate a pretrained backbone checkpoint, print a small table, write JSON.

Examples::

    fastssl eval knn --checkpoint run/last.pt --arch resnet50 --data /data/imagenet --k 20 --vote both
    fastssl eval linear --checkpoint run/last.pt --arch resnet18 --data digits --protocol lbfgs
    fastssl eval linear --checkpoint run/last.pt --arch resnet50 --data /data/imagenet --subset 1percent.txt

``--data`` is an ImageFolder root with ``train/`` and ``val/`` class folders (or give ``--train-dir``/``--val-dir``),
or ``digits`` for the offline shifted-digits data shipped with fastssl. Features are cached under ``--cache-dir``
keyed by the checkpoint's SHA-256, the architecture, the data and the transform, so a second evaluation of the same
checkpoint (another k, the linear probe after the kNN) skips the backbone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

DIGITS = "digits"


class _DigitsDataset(torch.utils.data.TensorDataset):
    """Shifted digits as normalized (3, 16, 16) float tensors, with a cache identity."""

    def __init__(self, split: str, seed: int) -> None:
        from fastssl.data import shifted_digits

        data = shifted_digits(split, seed=seed)
        images = torch.from_numpy(data.images).permute(0, 3, 1, 2).float().div(255.0)
        super().__init__((images - 0.5) / 0.5, torch.from_numpy(data.labels))
        self._id = f"shifted_digits|{split}|seed={seed}|mean=0.5|std=0.5"

    def fingerprint(self) -> str:
        return self._id


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``knn`` and ``linear`` sub-commands to the ``fastssl eval`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model and data")
    g.add_argument("--checkpoint", required=True, type=Path, help="backbone checkpoint (state_dict or dict with one)")
    g.add_argument(
        "--arch",
        default=None,
        help="backbone: resnet*, vit*, digits_cnn* or a torchvision name (default: the one a fastssl train "
        "checkpoint records)",
    )
    g.add_argument("--data", required=True, help=f"ImageFolder root with train/ and val/, or '{DIGITS}'")
    g.add_argument("--train-dir", type=Path, default=None, help="train ImageFolder (default DATA/train)")
    g.add_argument("--val-dir", type=Path, default=None, help="evaluation ImageFolder (default DATA/val)")
    g.add_argument("--image-size", type=_positive_int, default=224, help="center-crop size (default 224)")
    g.add_argument("--resize", type=_positive_int, default=None, help="shorter side before the crop (size/0.875)")
    g.add_argument("--batch-size", type=_positive_int, default=256)
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading processes")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--no-amp", action="store_true", help="disable fp16 autocast on CUDA")
    g.add_argument("--cache-dir", type=Path, default=None, help="feature cache folder (default: no cache)")
    g.add_argument("--output", type=Path, default=None, help="JSON result file (default CHECKPOINT.<task>.json)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="task", required=True)

    knn = sub.add_parser("knn", parents=[common], help="k-nearest-neighbour accuracy")
    knn.add_argument("--k", type=_positive_int, nargs="+", default=[20], help="neighbour counts (default 20)")
    knn.add_argument(
        "--vote",
        choices=("weighted", "majority", "both"),
        default="weighted",
        help="exp(s/T)-weighted (DINO) or majority (ISD/MSF) vote",
    )
    knn.add_argument("--temperature", type=float, default=0.07, help="T of the weighted vote")
    knn.add_argument("--backend", default="auto", choices=("auto", "faiss-gpu", "faiss-cpu", "torch", "triton"))
    knn.add_argument("--tsne", type=Path, default=None, help="also write a t-SNE PNG of 10 random val classes")

    linear = sub.add_parser("linear", parents=[common], help="linear probe accuracy on frozen features")
    linear.add_argument("--protocol", choices=("sgd", "lbfgs"), default="sgd", help="ISD/MSF SGD or L-BFGS sweep")
    linear.add_argument("--epochs", type=_positive_int, default=40)
    linear.add_argument("--lr", type=float, default=0.01)
    linear.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    linear.add_argument(
        "--weight-decays", type=float, nargs="+", default=None, help="L-BFGS λ grid (default 1e-6 ... 1e-2)"
    )
    linear.add_argument("--subset", type=Path, default=None, help="label-subset file (indices or image names)")


def _datasets(args: argparse.Namespace) -> tuple[Any, Any, list[str] | None]:
    """(train, val, train sample paths or None)."""
    if args.data == DIGITS:
        return _DigitsDataset("train", args.seed), _DigitsDataset("test", args.seed), None
    from torchvision.datasets import ImageFolder

    from fastssl.eval.features import eval_transform

    root = Path(args.data)
    train_dir = args.train_dir or root / "train"
    val_dir = args.val_dir or root / "val"
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"{d} is not a folder; --data expects an ImageFolder root with train/ and val/")
    transform = eval_transform(args.image_size, args.resize)
    train, val = ImageFolder(str(train_dir), transform), ImageFolder(str(val_dir), transform)
    if train.classes != val.classes:
        raise ValueError(f"train and val class folders differ: {len(train.classes)} vs {len(val.classes)} classes")
    return train, val, [p for p, _ in train.samples]


def _features(args: argparse.Namespace) -> tuple[dict[str, Any], Any, Any, list[str] | None]:
    from fastssl.eval.checkpoint import load_backbone
    from fastssl.eval.features import checkpoint_fingerprint, data_fingerprint, extract_features

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    model = load_backbone(args.checkpoint, args.arch, device=device)
    args.arch = model.arch_name  # as given, or as the checkpoint records it
    checkpoint_sha = checkpoint_fingerprint(args.checkpoint)
    train_set, val_set, train_paths = _datasets(args)
    splits = {}
    for name, dataset in (("train", train_set), ("val", val_set)):
        key = f"{checkpoint_sha}|{args.arch}|{data_fingerprint(dataset)}" if args.cache_dir else None
        splits[name] = extract_features(
            model,
            dataset,
            device=device,
            batch_size=args.batch_size,
            num_workers=args.workers,
            amp=not args.no_amp,
            progress=not args.quiet,
            desc=f"{name} features",
            cache_dir=args.cache_dir,
            cache_key=key,
        )
    info = {
        "checkpoint": str(args.checkpoint),
        "checkpoint_sha256": checkpoint_sha,
        "arch": args.arch,
        "data": str(args.data),
        "device": str(device),
        "num_train": int(splits["train"].labels.shape[0]),
        "num_test": int(splits["val"].labels.shape[0]),
        "feature_dim": int(splits["train"].features.shape[1]),
        "features_from_cache": bool(splits["train"].from_cache and splits["val"].from_cache),
        "feature_seconds": round(time.perf_counter() - t0, 3),
    }
    return info, splits["train"], splits["val"], train_paths


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)  # never a half-written result file


def _run_knn(args: argparse.Namespace, info: dict[str, Any], train, val) -> tuple[dict[str, Any], str]:
    from fastssl.eval.knn import knn_accuracy

    votes = ("weighted", "majority") if args.vote == "both" else (args.vote,)
    results, backend = [], None
    t0 = time.perf_counter()
    for k in args.k:
        for vote in votes:
            acc = knn_accuracy(
                train.features,
                train.labels,
                val.features,
                val.labels,
                k=k,
                weighted=vote == "weighted",
                temperature=args.temperature,
                backend=args.backend,
                seed=args.seed,
            )
            backend = acc.backend
            results.append({"k": k, "vote": vote, "top1": acc.top1, "top5": acc.top5})
    payload = {"task": "knn", **info, "backend": backend, "temperature": args.temperature, "results": results}
    payload["knn_seconds"] = round(time.perf_counter() - t0, 3)
    if args.tsne is not None:
        from fastssl.eval.embedding_plot import plot_embedding

        plot_embedding(val.features, val.labels, args.tsne, seed=args.seed, title=f"{args.arch}: {args.checkpoint}")
        payload["tsne_png"] = str(args.tsne)
    rows = [[str(r["k"]), r["vote"], f"{100 * r['top1']:.2f}", f"{100 * r['top5']:.2f}"] for r in results]
    title = f"kNN  {args.arch}  {info['num_train']} train / {info['num_test']} val  backend={backend}"
    return payload, title + "\n" + _table(["k", "vote", "top-1 %", "top-5 %"], rows)


def _run_linear(args: argparse.Namespace, info: dict[str, Any], train, val, train_paths) -> tuple[dict[str, Any], str]:
    from fastssl.eval.linear_probe import (
        DEFAULT_WEIGHT_DECAYS,
        linear_probe_sgd,
        load_subset_indices,
        logistic_regression_lbfgs,
    )

    subset = load_subset_indices(args.subset, train_paths) if args.subset is not None else None
    device = info["device"]
    t0 = time.perf_counter()
    if args.protocol == "sgd":
        res = linear_probe_sgd(
            train.features,
            train.labels,
            val.features,
            val.labels,
            subset=subset,
            epochs=args.epochs,
            lr=args.lr,
            weight_decay=args.weight_decay,
            device=device,
            seed=args.seed,
            progress=not args.quiet,
        )
    else:
        res = logistic_regression_lbfgs(
            train.features,
            train.labels,
            val.features,
            val.labels,
            subset=subset,
            weight_decays=tuple(args.weight_decays or DEFAULT_WEIGHT_DECAYS),
            device=device,
            seed=args.seed,
        )
    payload = {"task": "linear", **info, **res.as_dict(), "subset": str(args.subset) if args.subset else None}
    payload["probe_seconds"] = round(time.perf_counter() - t0, 3)
    rows = [
        [res.protocol, str(res.num_train), f"{res.weight_decay:g}", f"{100 * res.top1:.2f}", f"{100 * res.top5:.2f}"]
    ]
    title = f"linear probe  {args.arch}  {res.num_train} train / {res.num_test} val"
    return payload, title + "\n" + _table(["protocol", "train rows", "wd", "top-1 %", "top-5 %"], rows)


def run(args: argparse.Namespace) -> int:
    """Run ``fastssl eval knn|linear``; returns the exit status (2 on bad input, with a one-line message)."""
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    output = args.output or args.checkpoint.with_name(f"{args.checkpoint.stem}.{args.task}.json")
    existing = next((folder for folder in output.absolute().parents if folder.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        # known before the features are computed (the missing folders are created when the result is written)
        print(
            f"fastssl eval {args.task}: error: cannot write {output}: {existing} is not a writable folder",
            file=sys.stderr,
        )
        return 2
    try:
        info, train, val, train_paths = _features(args)
        if args.task == "knn":
            payload, table = _run_knn(args, info, train, val)
        else:
            payload, table = _run_linear(args, info, train, val, train_paths)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as err:
        print(f"fastssl eval {args.task}: error: {err}", file=sys.stderr)
        return 2
    _write_json(output, payload)
    print(table)
    print(f"wrote {output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastssl eval", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
