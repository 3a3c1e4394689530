"""kNN evaluation benchmark: time and peak memory of ``fastssl.eval.knn_classify`` per backend.

Shapes (issue 5):

- GPU: 50,000 queries against 1,281,167 × 512 fp16 train features (ImageNet-1k train set, ResNet-18 width); target
  ≤ 0.1 s excluding feature extraction. Backends: torch chunked matmul + top-k, fastssl's Triton top-k, FAISS GPU
  where installed.
- CPU: 10,000 × 100,000 × 128 fp16; torch vs FAISS CPU. Peak memory is the child process's peak RSS above a child
  that only builds the data.
- ``--smoke``: tiny CPU shapes in seconds; every available backend (Triton when ``TRITON_INTERPRET=1``).

Every row is the full call (input validation, candidate proposal, exact fp64 re-scoring, vote), k = 20, weighted
vote; ``agree`` says whether the backend's predictions equal the first backend's bit for bit. The features are
clustered (1000 classes, cosine ≈ 0.5 within a class) so that near-ties occur as in real features.

    python benchmarks/bench_knn.py            # GPU if present, else the CPU shape
    python benchmarks/bench_knn.py --smoke
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    base_parser,
    environment,
    peak_memory_mb,
    subprocess_peak_rss_mb,
    time_ms,
    write_results,
)

from fastssl.eval import knn_classify  # noqa: E402
from fastssl.eval.neighbors import _faiss, faiss_num_gpus  # noqa: E402

SHAPES = {
    "gpu": {"n_test": 50_000, "n_train": 1_281_167, "dim": 512, "classes": 1000},
    "cpu": {"n_test": 10_000, "n_train": 100_000, "dim": 128, "classes": 1000},
    "smoke": {"n_test": 64, "n_train": 1024, "dim": 32, "classes": 10},
}
K = 20


def make_data(n_test: int, n_train: int, dim: int, classes: int, device: str, seed: int = 0):
    """Clustered unit features in fp16: class centre + isotropic noise of the same norm."""
    g = torch.Generator(device=device).manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g, device=device), dim=1)
    out = []
    for n in (n_train, n_test):
        labels = torch.randint(0, classes, (n,), generator=g, device=device)
        x = torch.empty(n, dim, dtype=torch.float16, device=device)
        for s in range(0, n, 262_144):  # bounded fp32 temporaries
            e = min(n, s + 262_144)
            noise = torch.nn.functional.normalize(torch.randn(e - s, dim, generator=g, device=device), dim=1)
            x[s:e] = torch.nn.functional.normalize(centers[labels[s:e]] + noise, dim=1).half()
        out += [x, labels]
    train, train_labels, test, _ = out
    return train, train_labels, test


def backends_for(device: str) -> list[str]:
    if device == "cuda":
        names = ["torch"]
        if importlib.util.find_spec("triton") is not None:
            names.append("triton")
        if faiss_num_gpus() > 0:
            names.append("faiss-gpu")
        return names
    names = ["torch"]
    if _faiss() is not None:
        names.append("faiss-cpu")
    if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
        if (Path(__file__).resolve().parents[1] / "kernels" / "bank_topk.py").exists():
            names.append("triton")
    return names


def _child_rss(shape: str, backend: str) -> None:
    """Entry point of the peak-RSS child: build the data, run one kNN (unless backend == "none")."""
    train, labels, test = make_data(**SHAPES[shape], device="cpu")
    if backend != "none":
        knn_classify(train, labels, test, k=K, backend=backend)
    print("done")


def run(shape: str, device: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    spec = SHAPES[shape]
    train, labels, test = make_data(**spec, device=device)
    rows: list[dict[str, Any]] = []
    reference = None
    base_rss = None
    if device == "cpu" and not args.smoke:
        base_rss, _ = subprocess_peak_rss_mb([sys.executable, __file__, "--child-rss", shape, "none"])
    for backend in backends_for(device):
        fn = lambda b=backend: knn_classify(train, labels, test, k=K, backend=b)  # noqa: E731
        pred = fn()
        reference = pred if reference is None else reference
        ms = time_ms(fn, warmup=args.warmup, rep=args.rep, device=device)
        if device == "cuda":
            mem = peak_memory_mb(fn, device="cuda")
        elif base_rss is not None:
            rss, _ = subprocess_peak_rss_mb([sys.executable, __file__, "--child-rss", shape, backend])
            mem = rss - base_rss
        else:
            mem = None
        rows.append(
            {
                "backend": backend,
                "n_test": spec["n_test"],
                "n_train": spec["n_train"],
                "dim": spec["dim"],
                "k": K,
                "dtype": "fp16",
                "ms": ms,
                "queries_per_s": spec["n_test"] / (ms / 1e3),
                "peak_mb": mem,
                "agree": bool(torch.equal(pred.cpu(), reference.cpu())),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["ms"]
    for row in rows:
        row["speedup_vs_torch"] = base / row["ms"]
    return rows


def _plot(rows):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.barh([r["backend"] for r in rows], [r["ms"] for r in rows])
    ax.set_xlabel("ms per kNN evaluation (k=20)")
    r0 = rows[0]
    ax.set_title(f"{r0['n_test']:,} × {r0['n_train']:,} × {r0['dim']} fp16")
    return fig


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child-rss"]:
        _child_rss(argv[1], argv[2])
        return 0
    parser = base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke else (args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = "smoke" if args.smoke else ("gpu" if device == "cuda" else "cpu")
    if args.smoke:
        args.warmup, args.rep = 0.0, 0.0
    rows = run(shape, device, args)
    notes = (
        "Full knn_classify call (validation, proposal, exact fp64 re-scoring, weighted vote), k=20. "
        "agree: identical predictions to the first backend. " + ("Target on GPU: ≤ 100 ms." if shape == "gpu" else "")
    )
    paths = write_results(
        "bench_knn_smoke" if args.smoke else "bench_knn",
        rows,
        title=f"kNN evaluation ({shape} shape)",
        plot=_plot,
        out_dir=args.out_dir,
        env=environment(device),
        notes=notes,
    )
    print(f"wrote {paths['json']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
