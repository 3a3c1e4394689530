"""One-command GPU check: the GPU test subset, then the benchmark matrix, in under 10 minutes.

Run on a CUDA machine from the repository root (installs nothing, needs no network):

    python benchmarks/gpu_check.py            # kernel + loss tests compiled with bf16, then the op benchmarks
    python benchmarks/gpu_check.py --extra    # second command: kNN at ImageNet scale and the training step

Writes under benchmarks/results/<device>/: pytest_gpu.log and pytest_gpu.xml (kernel tests compiled, with bf16, and
the core loss tests with the triton backend), the three benchmark result sets (.json/.md/.png),
kernel_configs.json/.md (a short launch-config sweep of both kernels at the target shapes, to tune the config
tables), and gpu_check.json (what ran, how long, exit codes). Each step has a time limit so that the whole run
stays under 10 minutes; a step that fails or times out is recorded and the next one still runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GPU_TESTS = [
    "tests/test_kernels_bank_softmax_stats.py",
    "tests/test_kernels_bank_topk.py",
    "tests/test_soft_bank_cross_entropy.py",
    "tests/test_bank_info_nce.py",
    "tests/test_bank_topk.py",
    "tests/test_msf.py",
]
# (script, extra arguments, time limit in s): full shape matrix for the fused providers, torch.compile on the targets.
BENCHMARKS = [
    ("soft_bank_cross_entropy.py", ["--compile-targets-only"], 150),
    ("bank_info_nce.py", ["--compile-targets-only"], 90),
    ("bank_topk.py", ["--compile-targets-only"], 90),
]
# Run with --extra as a second command (each device command is limited to 10 minutes): kNN evaluation at ImageNet
# scale (torch chunked vs fastssl Triton; FAISS where installed) and the training-step throughput / bank-loss share.
EXTRA_BENCHMARKS = [
    ("bench_knn.py", [], 240),
    ("bench_train_step.py", [], 240),
]


def _run(cmd: list[str], timeout: float, log: Path | None = None) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = "timeout"
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    if log is not None:
        log.write_text(out, encoding="utf-8")
    print(out[-3000:], flush=True)
    return {"cmd": " ".join(cmd), "returncode": rc, "seconds": round(time.perf_counter() - t0, 1)}


def config_sweep(out_dir: Path) -> None:
    """Time a few launch configurations of each kernel at the target shapes (results only inform the tables)."""
    from fastssl.kernels.bank_softmax_stats import bank_softmax_stats
    from fastssl.kernels.bank_topk import bank_topk
    from triton.testing import do_bench

    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for d in (128, 512):
        bank = torch.nn.functional.normalize(torch.randn(2**20, d, device="cuda", generator=gen), dim=1).half()
        x = torch.nn.functional.normalize(torch.randn(512, d, device="cuda", generator=gen), dim=1)
        inv_tau = torch.full((512,), 10.0, device="cuda")
        stats_cfgs = [(64, 64, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 8, 3), (32, 64, 8, 2), (64, 32, 8, 2)]
        for block_r, block_k, warps, stages in stats_cfgs:
            kw = dict(block_r=block_r, block_k=block_k, num_warps=warps, num_stages=stages)
            for x_in, label in ((x, "fp32 x"), (x.half(), "fp16 x")):
                try:
                    ms = do_bench(
                        lambda kw=kw, x_in=x_in, t=inv_tau, b=bank: bank_softmax_stats(x_in, t, b, **kw), rep=50
                    )
                except Exception as exc:  # noqa: BLE001 - out of resources etc. is a result here
                    ms = f"{type(exc).__name__}"
                rows.append({"kernel": "bank_softmax_stats", "R": 512, "K": 2**20, "D": d, "x": label, **kw, "ms": ms})
        for block_n, block_k, warps, stages in [(64, 64, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3), (32, 64, 8, 2)]:
            kw = dict(block_n=block_n, block_k=block_k, num_warps=warps, num_stages=stages)
            try:
                ms = do_bench(lambda kw=kw, q=x[:256], b=bank: bank_topk(q, b, 10, **kw), rep=50)
            except Exception as exc:  # noqa: BLE001
                ms = f"{type(exc).__name__}"
            rows.append({"kernel": "bank_topk", "R": 256, "K": 2**20, "D": d, "x": "fp32 x", **kw, "ms": ms})
    harness.write_results("kernel_configs", rows, title="Kernel launch-config sweep (fp16 bank)", out_dir=out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-benchmarks", action="store_true")
    parser.add_argument("--extra", action="store_true", help="run only the kNN and training-step benchmarks")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA device; on CPU run `pytest` and the benchmarks' --smoke mode", file=sys.stderr)
        return 2
    env = harness.environment("cuda")
    out_dir = harness.results_dir(env["device"])
    steps: list[dict] = []
    t_start = time.perf_counter()
    if args.extra:
        for script, extra, limit in EXTRA_BENCHMARKS:
            cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--out-dir", str(out_dir), *extra]
            steps.append(_run(cmd, limit, out_dir / f"{Path(script).stem}.log"))
        args.skip_tests = args.skip_benchmarks = True
    if not args.skip_tests:
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "--durations=15", f"--junitxml={out_dir / 'pytest_gpu.xml'}"]
        steps.append(_run(cmd + [t for t in GPU_TESTS if (ROOT / t).exists()], 240, out_dir / "pytest_gpu.log"))
    if not args.skip_benchmarks:
        for script, extra, limit in BENCHMARKS:
            cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--out-dir", str(out_dir), *extra]
            steps.append(_run(cmd, limit, out_dir / f"{Path(script).stem}.log"))
        t0 = time.perf_counter()
        try:
            config_sweep(out_dir)
            steps.append({"cmd": "config_sweep", "returncode": 0, "seconds": round(time.perf_counter() - t0, 1)})
        except Exception as exc:  # noqa: BLE001 - recorded, the results above stay valid
            steps.append({"cmd": "config_sweep", "returncode": f"{type(exc).__name__}: {exc}"[:300]})
    summary = {"environment": env, "steps": steps, "total_seconds": round(time.perf_counter() - t_start, 1)}
    summary_name = "gpu_check_extra.json" if args.extra else "gpu_check.json"
    (out_dir / summary_name).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))
    return 0 if all(s["returncode"] == 0 for s in steps) else 1


if __name__ == "__main__":
    raise SystemExit(main())
