"""One-command GPU check: the GPU test subset, then the benchmark matrix, in under 10 minutes.

Run on a CUDA machine from the repository root (installs nothing, needs no network):

    python benchmarks/gpu_check.py            # kernel + loss tests compiled with bf16, config sweep, op benchmarks
    python benchmarks/gpu_check.py --extra    # second command: kNN at ImageNet scale and the training step

Writes under benchmarks/results/<device>/: pytest_gpu.log and pytest_gpu.xml (kernel tests compiled, with bf16, and
the core loss tests with the triton backend), kernel_configs.json/.md (a short launch-config sweep of both kernels at
the target shapes, including each kernel's untested CANDIDATES_SM90, to tune the config tables, and both top-k
algorithms; it runs right after the tests), the three benchmark result sets (.json/.md/.png), and gpu_check.json
(what ran, how long, exit codes). Each step has a time limit so that the whole run stays under 10 minutes; a step that
fails or times out is recorded and the next one still runs, and a step the deadline leaves no time for is recorded as
skipped: run it as its own command with ``--only`` (e.g. ``--only sweep,bank_topk``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _source_tree_path() -> str | None:
    """A directory that makes ``import fastssl.kernels`` work from an uninstalled checkout (the GPU image has no
    network, so nothing is pip-installed there): ``<tmp>/fastssl`` holds links to every entry of ``fastssl/`` plus
    ``kernels`` -> ``kernels/``, mirroring pyproject's package-dir mapping. ``None`` when fastssl is installed."""
    if importlib.util.find_spec("fastssl") is not None:
        try:
            if importlib.util.find_spec("fastssl.kernels") is not None:
                return None
        except ImportError:
            pass
    shim = Path(os.environ.get("TMPDIR", "/tmp")) / "fastssl_source_tree"
    pkg = shim / "fastssl"
    pkg.mkdir(parents=True, exist_ok=True)
    for entry in [*(ROOT / "fastssl").iterdir(), ROOT / "kernels"]:
        link = pkg / entry.name
        if entry.name != "__pycache__" and not link.exists():
            link.symlink_to(entry)
    return str(shim)


SOURCE_TREE = _source_tree_path()
if SOURCE_TREE is not None:
    sys.path.insert(0, SOURCE_TREE)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SOURCE_TREE, os.environ.get("PYTHONPATH")) if p)

import harness  # noqa: E402
import torch  # noqa: E402

GPU_TESTS = [
    "tests/test_kernels_bank_softmax_stats.py",
    "tests/test_kernels_bank_topk.py",
    "tests/test_kernels_unit_rows.py",
    "tests/test_kernels_bank_loss_epilogue.py",
    "tests/test_query_precision.py",
    "tests/test_soft_bank_cross_entropy.py",
    "tests/test_bank_info_nce.py",
    "tests/test_bank_topk.py",
    "tests/test_msf.py",
    "tests/test_cuda_graphs.py",
    "tests/test_train_step_readback.py",
]
# (script, extra arguments, time limit in s): full shape matrix for the fused providers, torch.compile on the targets.
BENCHMARKS = [
    ("soft_bank_cross_entropy.py", ["--compile-targets-only"], 200),
    ("bank_info_nce.py", ["--compile-targets-only"], 150),
    ("bank_topk.py", ["--compile-targets-only"], 240),  # 45-63 s on the H100 before 6 more providers
]
# Run with --extra as a second command (each device command is limited to 10 minutes): kNN evaluation at ImageNet
# scale (torch chunked vs fastssl Triton; FAISS where installed) and the training-step throughput / bank-loss share.
EXTRA_BENCHMARKS = [
    ("bench_knn.py", [], 240),
    ("bench_train_step.py", [], 240),
]


def _run(cmd: list[str], timeout: float, log: Path | None = None) -> dict:
    t0 = time.perf_counter()
    # stderr merged into stdout; at the limit SIGINT first: pytest then prints its failures and writes its JUnit XML,
    # a benchmark its traceback, before the kill (SIGKILL alone loses both)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            try:  # a grandchild holding the pipe open must not hold gpu_check past the device limit
                out, _ = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                out = "(output lost: the step was killed and a child process kept its pipe open)"
    if log is not None:
        log.write_text(out, encoding="utf-8")
    print(out[-3000:], flush=True)
    return {"cmd": " ".join(cmd), "returncode": rc, "seconds": round(time.perf_counter() - t0, 1)}


# Launch configurations the sweep times: (block rows, block keys, warps, stages[, D-chunk]) per feature dim, plus each
# kernel's CANDIDATES_SM90 (D-chunked variants, compiled and spill-checked for sm_90 by tests/test_kernels_aot.py) and
# its sm_80 and sm_90 table entries. The fixed lists and the candidates were compiled ahead of time for sm_90 (no
# spills; the sm_80 table entries are checked for sm_8x only); the winners (marked "fastest" in kernel_configs.md, with
# suggested table lines) go into the kernels' config tables.
STATS_SWEEP = {
    128: [(64, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3), (128, 64, 8, 4), (64, 128, 4, 3),
          (64, 128, 8, 3), (128, 128, 8, 3), (64, 32, 4, 3)],
    512: [(32, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2), (32, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2),
          (16, 64, 4, 2)],
}  # fmt: skip
TOPK_SWEEP = {
    128: [(64, 64, 4, 3), (64, 64, 8, 3), (64, 128, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 3),
          (32, 128, 4, 3)],
    512: [(32, 64, 4, 2), (32, 64, 8, 2), (64, 64, 8, 2), (16, 64, 4, 2)],
}  # fmt: skip


def sweep_configs(module, fixed: dict[int, list[tuple]], d: int) -> list[tuple]:
    """The sweep's fixed configs for D = ``d``, then the module's sm_80 and sm_90 table entries and CANDIDATES_SM90 at
    that D (as 5-tuples with the D-chunk), without repeats."""
    from dataclasses import astuple

    configs = [tuple(c) + (0,) * (5 - len(c)) for c in fixed[d]]
    extra = [cfg for (block_d, _), cfg in module.CONFIGS.items() if block_d == d]
    extra += [cfg for (block_d, _), cfg in module.CONFIGS_SM90.items() if block_d == d]
    extra += [cfg for (block_d, _), cfgs in module.CANDIDATES_SM90.items() if block_d == d for cfg in cfgs]
    for cfg in extra:
        if astuple(cfg) not in configs:
            configs.append(astuple(cfg))
    return configs


def mark_fastest(rows: list[dict], group: tuple[str, ...]) -> None:
    """Adds ``fastest`` = "yes" to the quickest row (numeric ms) of each group of rows with equal ``group`` keys."""
    best: dict[tuple, dict] = {}
    for row in rows:
        key = tuple(row.get(name) for name in group)
        if isinstance(row["ms"], float) and (key not in best or row["ms"] < best[key]["ms"]):
            best[key] = row
    for row in rows:
        row["fastest"] = "yes" if any(row is b for b in best.values()) else ""


# Sweep row label of the query dtype -> (query dtype, config-table column); the bank is fp16.
SWEEP_QUERIES = {"fp32 x": (torch.float32, "32x16"), "fp16 x": (torch.float16, "16")}


def table_suggestions(rows: list[dict], modules: dict, margin: float = 0.05) -> list[str]:
    """Config-table changes the sweep supports: per (kernel, D, query dtype) group (top-k at k = 10), the fastest
    config when it beats the one the launcher picks on sm_90 by more than ``margin`` (or that one is not in the sweep
    or failed). ``modules`` maps kernel names to their modules (``pick_config``, config class)."""
    from dataclasses import astuple

    from fastssl.kernels.dot_precision import dot_plan

    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("k", 10) == 10 and row.get("algorithm", "one_pass") == "one_pass":
            groups.setdefault((row["kernel"], row["D"], row["x"]), []).append(row)
    lines = []
    for (kernel, d, x), group in groups.items():
        timed = [r for r in group if isinstance(r["ms"], float)]
        if not timed:
            continue
        module = modules[kernel]
        x_dtype, column = SWEEP_QUERIES[x]
        current = astuple(module.pick_config(d, dot_plan(x_dtype, torch.float16), 90))

        def config(row: dict) -> tuple:
            return (row.get("block_r", row.get("block_n")), row["block_k"], row["num_warps"], row["num_stages"],
                    row.get("block_dc", 0))  # fmt: skip

        best = min(timed, key=lambda r: r["ms"])
        now = next((r["ms"] for r in timed if config(r) == current), None)
        if config(best) != current and (now is None or best["ms"] < (1 - margin) * now):
            cls = type(module.pick_config(d, dot_plan(x_dtype, torch.float16), 90)).__name__
            was = f"{now:.3f} ms" if now is not None else "not timed"
            lines.append(
                f'{kernel}: CONFIGS_SM90[({d}, "{column}")] = {cls}{config(best)}  # {best["ms"]:.3f} ms; '
                f"now {cls}{current}: {was}"
            )
    return lines


def algorithm_comparison(rows: list[dict]) -> list[str]:
    """One line per (D, k) of the top-k sweep rows: each algorithm's fastest time and config, and the ratio."""
    best: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        if row["kernel"] == "bank_topk" and isinstance(row["ms"], float):
            per = best.setdefault((row["D"], row["k"]), {})
            if row["algorithm"] not in per or row["ms"] < per[row["algorithm"]]["ms"]:
                per[row["algorithm"]] = row
    lines = []
    for (d, k), per in sorted(best.items()):
        parts = [
            f"{name} {r['ms']:.3f} ms ({r['block_n']}, {r['block_k']}, {r['num_warps']}, {r['num_stages']}, "
            f"{r['block_dc']})"
            for name, r in sorted(per.items())
        ]
        ratio = (
            f"; two_pass / one_pass = {per['two_pass']['ms'] / per['one_pass']['ms']:.2f}"
            if {"one_pass", "two_pass"} <= per.keys()
            else ""
        )
        lines.append(f"D = {d}, k = {k}: " + ", ".join(parts) + ratio)
    return lines or ["no top-k rows timed"]


def config_sweep(
    out_dir: Path,
    *,
    device: str = "cuda",
    num_keys: int = 2**20,
    num_rows: int = 512,
    bench=None,
    time_left=None,
) -> list[dict]:
    """Time launch configurations of each kernel at the target shapes (results only inform the tables).

    ``device``, ``num_keys``, ``num_rows`` and ``bench`` (a callable fn -> ms; default triton's do_bench) exist so the
    test suite can run the same sweep on tiny shapes in Triton's CPU interpreter. ``time_left`` (a callable -> s):
    once it drops under 15 s the remaining configs are recorded as skipped and the results written, so a device
    command's time limit never loses the sweep. Returns the rows written."""
    import fastssl.kernels.bank_softmax_stats as stats_module
    import fastssl.kernels.bank_topk as topk_module
    from fastssl.kernels.bank_softmax_stats import bank_softmax_stats
    from fastssl.kernels.bank_topk import bank_topk

    if bench is None:
        from triton.testing import do_bench

        def bench(fn):
            return do_bench(fn, rep=50)

    def timed(fn) -> float | str:
        if time_left is not None and time_left() < 15:
            return "skipped: deadline"
        try:
            return float(bench(fn))
        except Exception as exc:  # noqa: BLE001 - out of resources etc. is a result here
            return f"{type(exc).__name__}"

    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for d in (128, 512):
        bank = torch.nn.functional.normalize(torch.randn(num_keys, d, device=device, generator=gen), dim=1).half()
        x = torch.nn.functional.normalize(torch.randn(num_rows, d, device=device, generator=gen), dim=1)
        inv_tau = torch.full((num_rows,), 10.0, device=device)
        for block_r, block_k, warps, stages, block_dc in sweep_configs(stats_module, STATS_SWEEP, d):
            kw = dict(block_r=block_r, block_k=block_k, num_warps=warps, num_stages=stages, block_dc=block_dc)
            for x_in, label in ((x, "fp32 x"), (x.half(), "fp16 x")):
                ms = timed(lambda kw=kw, x_in=x_in, t=inv_tau, b=bank: bank_softmax_stats(x_in, t, b, **kw))
                rows.append(
                    {"kernel": "bank_softmax_stats", "R": num_rows, "K": num_keys, "D": d, "x": label, **kw, "ms": ms}
                )
                print(rows[-1], flush=True)
        for config in sweep_configs(topk_module, TOPK_SWEEP, d):
            block_n, block_k, warps, stages, block_dc = config
            for algorithm in topk_module.ALGORITHMS:
                for k in (10, 64):
                    # the rows per program the launcher would use with this config (fewer for long lists)
                    block_n = topk_module._rows_per_program(topk_module.TopkConfig(*config), 16 if k == 10 else 64)
                    kw = dict(block_n=block_n, block_k=block_k, num_warps=warps, num_stages=stages, block_dc=block_dc)
                    kw |= {"algorithm": algorithm}
                    ms = timed(lambda kw=kw, k=k, q=x[: num_rows // 2], b=bank: bank_topk(q, b, k, **kw))
                    rows.append(
                        {"kernel": "bank_topk", "R": num_rows // 2, "K": num_keys, "D": d, "x": "fp32 x", "k": k}
                        | kw
                        | {"ms": ms}
                    )
                    print(rows[-1], flush=True)
    mark_fastest(rows, ("kernel", "D", "x", "k"))
    suggestions = table_suggestions(rows, {"bank_softmax_stats": stats_module, "bank_topk": topk_module})
    notes = (
        "Suggested sm_90 table changes (fastest config ≥ 5% quicker than the one the launcher picks on sm_90; top-k "
        "judged at k = 10 with its default algorithm, check its k = 64 row too; compile-check with "
        "tests/test_kernels_aot.py before moving an entry into CONFIGS_SM90):\n\n"
        + ("\n".join(f"- `{line}`" for line in suggestions) if suggestions else "- none")
        + "\n\nTop-k algorithms, fastest config of each (`bank_topk(..., algorithm=)`; the default is one_pass):\n\n"
        + "\n".join(f"- {line}" for line in algorithm_comparison(rows))
    )
    print(notes, flush=True)
    harness.write_results(
        "kernel_configs", rows, title="Kernel launch-config sweep (fp16 bank)", out_dir=out_dir, notes=notes
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-benchmarks", action="store_true")
    parser.add_argument("--extra", action="store_true", help="run only the kNN and training-step benchmarks")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated steps to run instead of the defaults: tests, sweep, and benchmark "
        "script stems (soft_bank_cross_entropy, bank_info_nce, bank_topk, bench_knn, bench_train_step)",
    )
    parser.add_argument("--tests", nargs="*", default=None, help="pytest node ids instead of the GPU test files")
    parser.add_argument(
        "--deadline",
        type=float,
        default=540.0,
        help="seconds for the whole check; a step that cannot start in time "
        "is recorded as skipped and every step's own limit is cut to what is left (a device command gets 600 s)",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA device; on CPU run `pytest` and the benchmarks' --smoke mode", file=sys.stderr)
        return 2
    import fastssl.kernels  # noqa: F401 - fail loudly here rather than let the kernel tests skip themselves

    env = harness.environment("cuda")
    env["source_tree"] = SOURCE_TREE or "installed"
    out_dir = harness.results_dir(env["device"])
    steps: list[dict] = []
    t_start = time.perf_counter()

    def left() -> float:
        return args.deadline - (time.perf_counter() - t_start)

    def step(cmd: list[str], limit: float, log: Path) -> None:
        if left() < 40:  # 20 s of margin, at least 20 s to run
            steps.append({"cmd": " ".join(cmd), "returncode": "skipped: deadline", "seconds": 0.0})
            return
        steps.append(_run(cmd, min(limit, left() - 20), log))  # the margin covers _run's 15 s grace after SIGINT

    scripts = {Path(script).stem: (script, extra, limit) for script, extra, limit in BENCHMARKS + EXTRA_BENCHMARKS}
    if args.only:
        selected = args.only.split(",")
        unknown = set(selected) - {"tests", "sweep", *scripts}
        if unknown:
            parser.error(f"unknown steps {sorted(unknown)}")
    elif args.extra:
        selected = [Path(script).stem for script, _, _ in EXTRA_BENCHMARKS]
    else:
        selected = (["tests"] if not args.skip_tests else []) + (
            # the sweep first: it is short and decides the config tables; the loss benchmarks then use those tables
            ["sweep"] + [Path(script).stem for script, _, _ in BENCHMARKS] if not args.skip_benchmarks else []
        )
    summary_name = (
        "gpu_check_extra.json"
        if args.extra
        else f"gpu_check{'_' + args.only.replace(',', '_') if args.only else ''}.json"
    )

    def write_summary() -> dict:
        """Rewritten after every step, so a command killed at its time limit keeps what ran."""
        summary = {"environment": env, "steps": steps, "total_seconds": round(time.perf_counter() - t_start, 1)}
        (out_dir / summary_name).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        return summary

    for name in selected:
        write_summary()
        if name == "tests":
            # -P keeps the checkout's own uninstalled ``fastssl/`` (no kernels subpackage) off the front of sys.path.
            cmd = [sys.executable, "-P", "-m", "pytest", "-q", "--maxfail=20", "--durations=15"]
            tests = args.tests if args.tests is not None else [t for t in GPU_TESTS if (ROOT / t).exists()]
            # ~190-215 s on the H100 before the two-pass top-k doubled its kernel tests; alone, the whole deadline
            limit = 330 if len(selected) > 1 else left() - 10
            step(cmd + [f"--junitxml={out_dir / 'pytest_gpu.xml'}", *tests], limit, out_dir / "pytest_gpu.log")
        elif name == "sweep":
            t0 = time.perf_counter()
            if left() < 60:
                steps.append({"cmd": "config_sweep", "returncode": "skipped: deadline", "seconds": 0.0})
                continue
            try:
                # leave the benchmarks selected after the sweep their time limits (plus step()'s 20 s margin each),
                # but at most half of what is left: the sweep always gets the other half
                later = [n for n in selected[selected.index(name) + 1 :] if n in scripts]
                reserve = min(sum(scripts[n][2] + 20 for n in later), left() / 2)
                config_sweep(out_dir, time_left=lambda reserve=reserve: left() - reserve)
                steps.append({"cmd": "config_sweep", "returncode": 0, "seconds": round(time.perf_counter() - t0, 1)})
            except Exception as exc:  # noqa: BLE001 - recorded, the results above stay valid
                steps.append({"cmd": "config_sweep", "returncode": f"{type(exc).__name__}: {exc}"[:300]})
        else:
            script, extra, limit = scripts[name]
            cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--out-dir", str(out_dir), *extra]
            step(cmd, limit, out_dir / f"{name}.log")
    summary = write_summary()
    print(json.dumps(summary, indent=2))
    return 0 if all(s["returncode"] == 0 for s in steps) else 1


if __name__ == "__main__":
    raise SystemExit(main())
