"""Shared benchmark harness: environment capture, timing, memory, and result files.

Every benchmark script in ``benchmarks/`` imports this module (``from harness import ...`` when run as a script from
the ``benchmarks/`` folder, or ``benchmarks.harness`` from the repository root) and writes its results through
:func:`write_results`, so all results share one layout::

    benchmarks/results/<sanitized device name>/<stem>.json   environment + rows
    benchmarks/results/<sanitized device name>/<stem>.md     the same rows as a markdown table
    benchmarks/results/<sanitized device name>/<stem>.png    optional plot

Timing uses ``triton.testing.do_bench`` on CUDA (it flushes L2 between repetitions and returns the median) and a
``time.perf_counter`` median on CPU. Memory is the CUDA ``max_memory_allocated`` delta on GPU; on CPU, whole-process
peak RSS is measured in a subprocess (:func:`subprocess_peak_rss_mb`), because RSS of the benchmarking process itself
only ever grows.

The bank ops' provider × shape matrix benchmarks (``bank_info_nce``, ``soft_bank_cross_entropy``, ``bank_topk``)
share their loop here too: :func:`run_matrix` checks every provider against the reference before timing it and
fills the timing, memory, roofline and speedup columns; :func:`run_loss_matrix` specialises it to the bank losses;
:func:`write_matrix_results` writes the files with the performance targets checked. Each script keeps only its
providers, shapes, FLOP count and targets.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

# Datasheet numbers of the H100 SXM used for "% of the one-pass floor" in every table.
H100_FP16_DENSE_TFLOPS = 989.0
H100_HBM_TBPS = 3.35

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
# --smoke runs write here by default (git-ignored): tiny CPU shapes are no result worth keeping.
SMOKE_DIR = RESULTS_ROOT / "local" / "smoke"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device | str | None = None) -> str:
    """Human-readable name of the benchmarked device (GPU name on CUDA, CPU model otherwise)."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return _cpu_name()


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Describe the machine and software a result was measured with.

    Returns:
        dict with ``device``, ``torch``, ``triton`` (None if not importable), ``python``, ``date`` (ISO 8601, UTC),
        ``cpu``, and on CUDA ``cuda`` and ``capability``.
    """
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    env: dict[str, Any] = {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_name(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }
    dev = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (dev is None or dev.type == "cuda"):
        env["cuda"] = torch.version.cuda
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return env


def sanitize(name: str) -> str:
    """File-system-safe, lower-case device name (``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``)."""
    s = re.sub(r"\(r\)|\(tm\)", "", name.lower())
    s = re.sub(r"[^a-z0-9.]+", "-", s).strip("-.")
    return s or "unknown"


def results_dir(device_name: str) -> Path:
    """``benchmarks/results/<sanitized device>/`` (created)."""
    path = RESULTS_ROOT / sanitize(device_name)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v == 0:
            return "0"
        if abs(v) >= 1000 or abs(v) < 0.01:
            return f"{v:.3g}"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows as a GitHub markdown table; columns are the union of keys in first-seen order."""
    cols: list[str] = []
    for row in rows:
        for key in row:
            if key not in cols:
                cols.append(key)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (torch.dtype, torch.device, Path)):
        return str(v)
    return v


def write_results(
    stem: str,
    rows: list[dict[str, Any]],
    *,
    title: str,
    plot: Callable[[list[dict[str, Any]]], Any] | None = None,
    out_dir: Path | str | None = None,
    env: dict[str, Any] | None = None,
    notes: str | None = None,
) -> dict[str, Path]:
    """Write ``<stem>.json`` (environment + rows), ``<stem>.md`` and, if ``plot`` is given, ``<stem>.png``.

    Args:
        stem: file stem, the benchmarked op's stem (``bank_topk``).
        rows: one dict per measurement; values JSON-serialisable (NaN/inf are written as null).
        title: heading of the markdown file.
        plot: callable taking ``rows`` and returning a matplotlib Figure; it is only called if matplotlib imports.
        out_dir: target folder; defaults to :func:`results_dir` of the current device.
        env: environment dict; defaults to :func:`environment`.
        notes: free text appended below the table (targets, analysis).

    Returns:
        dict mapping ``json``/``md``/``png`` to the written paths.
    """
    env = env if env is not None else environment()
    out = Path(out_dir) if out_dir is not None else results_dir(env["device"])
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    payload = {"title": title, "environment": env, "rows": rows, "notes": notes}
    paths["json"] = out / f"{stem}.json"
    paths["json"].write_text(json.dumps(_jsonable(payload), indent=2) + "\n", encoding="utf-8")

    env_line = ", ".join(f"{k}={v}" for k, v in env.items())
    md = [f"# {title}", "", f"Environment: {env_line}", "", markdown_table(rows), ""]
    if notes:
        md += [notes, ""]
    paths["md"] = out / f"{stem}.md"
    paths["md"].write_text("\n".join(md), encoding="utf-8")

    if plot is not None and rows:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # plots are optional; the tables are the record
            return paths
        fig = plot(rows)
        if fig is not None:
            paths["png"] = out / f"{stem}.png"
            fig.savefig(paths["png"], dpi=120, bbox_inches="tight")
            plt.close(fig)
    return paths


def _sync(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


def time_ms(
    fn: Callable[[], Any], *, warmup: float = 25.0, rep: float = 100.0, device: str | None = None, min_calls: int = 3
) -> float:
    """Median wall time of ``fn()`` in milliseconds.

    Args:
        fn: the callable to time (no arguments).
        warmup: warm-up budget in ms (at least one call).
        rep: measurement budget in ms (at least ``min_calls`` calls on CPU).
        device: ``"cuda"`` or ``"cpu"``; defaults to cuda when available.

    On CUDA this is ``triton.testing.do_bench(fn, warmup, rep, return_mode="median")`` which flushes L2 between
    calls, so a bank that fits in L2 is not measured hot.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=int(warmup), rep=int(rep), return_mode="median"))
    t_end = time.perf_counter() + warmup / 1e3
    while time.perf_counter() < t_end:
        fn()
    times: list[float] = []
    t_end = time.perf_counter() + rep / 1e3
    while len(times) < min_calls or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 1000:
            break
    return float(statistics.median(times))


def peak_memory_mb(fn: Callable[[], Any], device: str | None = None) -> float | None:
    """Extra CUDA memory (MB, 2**20 bytes) allocated at peak while running ``fn()``, above what was allocated before.

    Returns None on CPU (use :func:`subprocess_peak_rss_mb` there).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def subprocess_peak_rss_mb(
    argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 600.0
) -> tuple[float, str]:
    """Run ``argv`` in a child process and return (its peak RSS in MB, its stdout).

    The child's own ``ru_maxrss`` is read with ``os.wait4`` on its pid, so other children of this process do not
    pollute the number (``RUSAGE_CHILDREN`` would report the maximum over all of them).

    Raises:
        RuntimeError: the child failed; the message carries its stderr.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, env=env)
        t_end = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if time.monotonic() > t_end:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise RuntimeError(f"{argv!r} timed out after {timeout} s")
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"{argv!r} exited {proc.returncode}:\n{err.read().decode(errors='replace')[-4000:]}")
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 2**10
    return usage.ru_maxrss * scale, stdout


def one_pass_floor_ms(n: int, k: int, d: int, bank_bytes: int, passes: int = 1) -> float:
    """H100 lower bound (ms) for ``passes`` fused passes over a (k, d) bank with n queries.

    Each pass is 2 matmul-sized products (logits, then V = bank): 4·n·k·d FLOPs; forward + backward of the losses
    stacks student and teacher rows, hence the issue's 8·N·K·D. The floor is the larger of compute time at
    :data:`H100_FP16_DENSE_TFLOPS` and one read of the bank at :data:`H100_HBM_TBPS`.
    """
    flops = 4.0 * n * k * d * passes
    compute = flops / (H100_FP16_DENSE_TFLOPS * 1e12)
    memory = bank_bytes / (H100_HBM_TBPS * 1e12)
    return max(compute, memory) * 1e3


def add_roofline(row: dict[str, Any], *, flops: float, bank_bytes: float) -> dict[str, Any]:
    """Add achieved TFLOP/s, bank GB/s and % of the H100 one-pass floor to a row holding ``ms``.

    ``flops`` is the op's useful one-pass work (e.g. 8·N·K·D for the two-sided soft cross-entropy) and
    ``bank_bytes`` one read of the bank; the floor is the larger of both at datasheet peak.
    """
    ms = row.get("ms")
    floor = max(flops / (H100_FP16_DENSE_TFLOPS * 1e12), bank_bytes / (H100_HBM_TBPS * 1e12)) * 1e3
    row["floor_ms"] = floor
    if ms is None or not ms > 0:
        row.update(tflops=None, gbps=None, pct_floor=None)
        return row
    row["tflops"] = flops / (ms * 1e-3) / 1e12
    row["gbps"] = bank_bytes / (ms * 1e-3) / 1e9
    row["pct_floor"] = 100.0 * floor / ms
    return row


def add_speedups(
    rows: list[dict[str, Any]], *, of: str = "triton", keys: Sequence[str] = ("mode", "N", "K", "D")
) -> None:
    """Set ``<of>_speedup`` = this row's ms / the ``of`` provider's ms of the same shape, on every row."""
    best = {tuple(r[k] for k in keys): r["ms"] for r in rows if r["provider"] == of and r.get("ms")}
    for r in rows:
        base = best.get(tuple(r[k] for k in keys))
        r[f"{of}_speedup"] = r["ms"] / base if base and r.get("ms") else None


def check_targets(rows: list[dict[str, Any]], targets: list[dict[str, Any]], *, provider: str = "triton") -> str:
    """Markdown lines saying which performance targets ``provider`` met, by how much, and what bounds it.

    Each target dict has the shape keys (``mode``, ``N``, ``K``, ``D``) and any of ``max_ms``, ``max_peak_mb``,
    ``min_speedup`` ({other provider: factor}). Utilisation of compute (TFLOP/s vs 989) and bandwidth (GB/s vs 3350)
    names the resource closest to its peak; when both are low the kernel is latency/occupancy or exp-throughput bound.
    A ``<provider>_graph`` row of the same shape (a CUDA-graph replay) adds the device time and the host overhead.
    """
    lines = []
    for t in targets:
        shape = {k: t[k] for k in ("mode", "N", "K", "D") if k in t}
        label = ", ".join(f"{k}={v}" for k, v in shape.items())
        mine = next(
            (r for r in rows if r["provider"] == provider and all(r.get(k) == v for k, v in shape.items())), None
        )
        if mine is None or not mine.get("ms"):
            lines.append(f"- {label}: {provider} not measured")
            continue
        checks = []
        if "max_ms" in t:
            ratio = mine["ms"] / t["max_ms"]
            verdict = "met" if ratio <= 1 else f"missed by {ratio:.2f}x"
            checks.append(f"{mine['ms']:.3f} ms vs ≤ {t['max_ms']} ms: {verdict}")
        if "max_peak_mb" in t and mine.get("peak_mb") is not None:
            ok = mine["peak_mb"] <= t["max_peak_mb"]
            checks.append(
                f"extra memory {mine['peak_mb']:.1f} MB vs ≤ {t['max_peak_mb']} MB: {'met' if ok else 'missed'}"
            )
        for other, factor in t.get("min_speedup", {}).items():
            ref = next(
                (r for r in rows if r["provider"] == other and all(r.get(k) == v for k, v in shape.items())), None
            )
            if ref is None or not ref.get("ms"):
                checks.append(f"vs {other}: not measured")
                continue
            speedup = ref["ms"] / mine["ms"]
            checks.append(f"{speedup:.1f}x vs {other} (target ≥ {factor}x): {'met' if speedup >= factor else 'missed'}")
        graphed = next(
            (
                r
                for r in rows
                if r["provider"] == provider + GRAPH_SUFFIX and all(r.get(k) == v for k, v in shape.items())
            ),
            None,
        )
        if graphed is not None and graphed.get("ms"):
            host = mine["ms"] - graphed["ms"]
            checks.append(
                f"as a CUDA-graph replay {graphed['ms']:.3f} ms ({provider + GRAPH_SUFFIX}: device time), so host "
                f"overhead is {host:.3f} ms ({100 * host / mine['ms']:.0f}%)"
            )
        compute = (mine.get("tflops") or 0) / H100_FP16_DENSE_TFLOPS
        memory = (mine.get("gbps") or 0) / (H100_HBM_TBPS * 1e3)
        bound = "compute" if compute >= memory else "memory bandwidth"
        if max(compute, memory) < 0.5:
            bound += " (both under 50%: latency, occupancy or exp throughput)"
        checks.append(
            f"{100 * compute:.0f}% of peak TFLOP/s, {100 * memory:.0f}% of peak HBM bandwidth; closest: {bound}"
        )
        lines.append(f"- {label}: " + "; ".join(checks))
    return "\n".join(lines)


def plot_providers(rows: list[dict[str, Any]], title: str) -> Any:
    """Grouped bars of median ms per provider for every (mode, shape), log scale, one panel per mode."""
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(len(modes), 1, figsize=(12, 3.8 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        mode_rows = [r for r in rows if r["mode"] == mode]
        shapes = list(dict.fromkeys((r["N"], r["K"], r["D"]) for r in mode_rows))
        width = 0.8 / max(1, len(providers))
        for i, provider in enumerate(providers):
            ms = {(r["N"], r["K"], r["D"]): r.get("ms") for r in mode_rows if r["provider"] == provider}
            xs = [j + i * width for j, s in enumerate(shapes) if ms.get(s)]
            ax.bar(xs, [ms[s] for s in shapes if ms.get(s)], width, label=provider)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        ax.set_xticklabels([f"N={n}\nK={k}\nD={d}" for n, k, d in shapes], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("median ms")
        ax.set_title(f"{title} ({mode})")
        ax.legend(fontsize=7, ncol=min(6, len(providers)))
    fig.tight_layout()
    return fig


def base_parser(description: str) -> argparse.ArgumentParser:
    """Common command line of every benchmark script."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU in seconds; checks every provider")
    p.add_argument("--out-dir", type=Path, default=None, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--warmup", type=float, default=25.0, help="warm-up budget per measurement, ms")
    p.add_argument("--rep", type=float, default=100.0, help="measurement budget per measurement, ms")
    return p


def add_matrix_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of the provider × shape matrix benchmarks of the bank ops."""
    p.add_argument("--shapes", choices=("full", "targets"), default="full", help="full matrix or the issue's targets")
    p.add_argument("--providers", default=None, help="comma-separated subset of providers (default: all)")
    p.add_argument(
        "--compile-targets-only",
        action="store_true",
        help="measure torch.compile only on the target shapes (it recompiles for every shape, tens of seconds each)",
    )
    return p


def parse_matrix_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse a benchmark command line; ``--smoke`` shrinks the time budgets to one call each."""
    args = parser.parse_args(argv)
    if args.smoke:
        args.warmup, args.rep = 0.0, 1.0
    return args


def bench_device(args: argparse.Namespace) -> str:
    """Device the matrix runs on: cpu for ``--smoke``, else ``--device``, else cuda when available."""
    return "cpu" if args.smoke else (args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


Shape = tuple[int, int, int]  # (N queries, K bank rows, D feature width)


def pick_shapes(
    args: argparse.Namespace, *, full: list[Shape], targets: list[Shape], smoke: list[Shape]
) -> list[Shape]:
    """The shapes selected by ``--smoke`` / ``--shapes``."""
    return smoke if args.smoke else (targets if args.shapes == "targets" else full)


def select_providers(providers: dict[str, Callable], selection: str | None) -> dict[str, Callable]:
    """The providers named in ``--providers`` (comma-separated; all when None); the reference is always kept."""
    if not selection:
        return providers
    names = selection.split(",")
    return {k: v for k, v in providers.items() if k in names or k == "reference"}


def random_bank(num_keys: int, d: int, generator: torch.Generator, device: str) -> torch.Tensor:
    """Unit-norm random fp16 memory bank (K, D), drawn on CPU so every device sees the same numbers."""
    return F.normalize(torch.randn(num_keys, d, generator=generator), dim=1).to(device, torch.float16)


def sdpa_bank_stats(x: torch.Tensor, bank: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse (N,), μ (N, D)) of softmax(x·Bᵀ/τ) by one fused attention call with V = K = bank.

    The building block of the ``sdpa`` provider of the bank losses: x (N, D), bank (K, D); both results fp32.
    """
    q = x.to(bank.dtype)[None, None]
    kv = bank[None, None]
    if x.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, kv, kv, None, True, 0.0, False, scale=1.0 / tau
        )[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, kv, kv, 0.0, False, scale=1.0 / tau)
    return lse[0, 0].float(), out[0, 0].float()


class Trial(NamedTuple):
    """One provider on one (shape, mode) cell of the matrix."""

    step: Callable[[], Any]
    """The timed call."""
    first_run: Callable[[], Any]
    """Runs ``step`` once and returns what :func:`run_matrix` compares with the reference's."""
    collect: Callable[[Any], Any] | None = None
    """What ``first_run`` returns, made from ``step()``'s output; lets :func:`cuda_graph_trial` check a replay."""
    graphed: bool = False
    """``step`` replays a captured CUDA graph (its memory was allocated at capture, so no peak is reported)."""


# Providers whose name ends in this run another provider's step as a captured CUDA graph (:func:`cuda_graph_trial`).
GRAPH_SUFFIX = "_graph"


def cuda_graph_trial(trial: Trial, *, warmup_calls: int = 3) -> Trial:
    """``trial`` with its step captured once into a CUDA graph and replayed.

    The replay launches the step's kernels without Python, autograd or launch overhead, so its time is the step's
    device time: what a training loop gets by capturing its step. Side by side with the eager provider it shows how
    much of the eager time is host work. The first run warms the step up on a side stream (kernel compilation and
    caches must come before a capture), captures it, replays it and returns ``trial.collect`` of the captured outputs,
    so the replayed result is what is compared with the reference.

    Raises:
        RuntimeError: without CUDA, or when the step cannot be captured (a device-to-host read, a CPU tensor).
    """
    if trial.collect is None:
        raise ValueError("cuda_graph_trial needs a trial with collect")
    captured: dict[str, Any] = {}

    def first_run() -> Any:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_calls):
                trial.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph):
                out = trial.step()
        except Exception as error:
            # a failed capture_end skips the graph context's stream restore: later providers would run on its
            # capture stream
            torch.cuda.set_stream(stream)
            raise RuntimeError(f"the step cannot be captured in a CUDA graph: {error}") from error
        captured.update(graph=graph, out=out)
        graph.replay()
        torch.cuda.synchronize()
        return trial.collect(out)

    def step() -> None:
        captured["graph"].replay()

    return Trial(step, first_run, trial.collect, graphed=True)


# Failures that make a row an error row instead of aborting the run (a provider that cannot run a shape).
# Providers wrapped in torch.compile: each shape recompiles (tens of seconds), so --compile-targets-only limits them.
COMPILED_PROVIDERS = ("compile", "triton_compile")
PROVIDER_ERRORS = (RuntimeError, NotImplementedError, torch.OutOfMemoryError)


def _release_cache(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def run_matrix(
    args: argparse.Namespace,
    *,
    device: str,
    providers: dict[str, Callable],
    shapes: list[Shape],
    targets: list[Shape],
    modes: Sequence[str],
    make_inputs: Callable[[Shape, torch.Generator, str], Any],
    new_row: Callable[[Shape, str, str], dict[str, Any]],
    trial: Callable[[Callable, Any, str], Trial],
    compare: Callable[[Any, Any, str], dict[str, Any]],
    flops_per_nkd: float,
) -> list[dict[str, Any]]:
    """Measure every provider on every shape and mode, each checked against the reference before it is timed.

    The reference must come first in ``providers``: its result is what later providers are compared with (a failing
    reference leaves the cell uncompared). A provider that raises one of :data:`PROVIDER_ERRORS` on its first run
    gives a row with ``ms=None`` and ``error``; the run goes on. :data:`COMPILED_PROVIDERS` are skipped off the target
    shapes under ``--compile-targets-only``. A provider named ``<name>_graph`` is timed as a CUDA-graph replay of its
    step (:func:`cuda_graph_trial`; its trial needs ``collect``). Each measured row is printed as it is done; an
    interrupt (gpu_check's SIGINT at its time limit) ends the loop and returns the rows measured so far.

    Args:
        args: parsed matrix command line (:func:`add_matrix_options`).
        device: where the inputs live and the timing runs.
        providers: name -> callable, filtered by ``--providers``.
        shapes: (N, K, D) shapes to run; ``targets`` are the issue's target shapes.
        modes: e.g. ``("forward", "forward+backward")``; the reference result is reset per mode.
        make_inputs: (shape, generator, device) -> the op's inputs, drawn once per shape from one seeded generator.
        new_row: (shape, mode, provider) -> the row's identifying fields, in column order.
        trial: (provider callable, inputs, mode) -> :class:`Trial`.
        compare: (result, reference result, provider) -> error columns, including ``matches_reference``.
        flops_per_nkd: useful FLOPs per N·K·D for the roofline (the bank is read once in fp16: 2·K·D bytes).

    Returns:
        The rows, with timing, memory, roofline and ``triton_speedup`` columns.
    """
    providers = select_providers(providers, args.providers)
    rows: list[dict[str, Any]] = []
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        for shape in shapes:
            n, k, d = shape
            cost = {"flops": flops_per_nkd * n * k * d, "bank_bytes": 2.0 * k * d}
            inputs = make_inputs(shape, gen, device)
            for mode in modes:
                reference = None
                for name, fn in providers.items():
                    if name in COMPILED_PROVIDERS and args.compile_targets_only and shape not in targets:
                        continue
                    row = new_row(shape, mode, name)
                    cell = trial(fn, inputs, mode)
                    if name.endswith(GRAPH_SUFFIX):
                        cell = cuda_graph_trial(cell)
                    try:
                        result = cell.first_run()
                    except PROVIDER_ERRORS as exc:
                        row.update(ms=None, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                        rows.append(add_roofline(row, **cost))
                        _release_cache(device)
                        continue
                    if name == "reference":
                        reference = result
                    if reference is not None:
                        row.update(compare(result, reference, name))
                    row["ms"] = time_ms(
                        cell.step, warmup=args.warmup, rep=args.rep, device=device, min_calls=1 if args.smoke else 3
                    )
                    row["peak_mb"] = None if cell.graphed else peak_memory_mb(cell.step, device=device)
                    rows.append(add_roofline(row, **cost))
                    print(markdown_table([row]).splitlines()[-1], flush=True)
                _release_cache(device)
    except KeyboardInterrupt:  # gpu_check's time limit sends SIGINT first: keep the rows measured so far
        print(f"interrupted: writing the {len(rows)} rows measured so far", flush=True)
        args.interrupted = True  # write_matrix_results says so in the results' notes
    add_speedups(rows)
    return rows


def loss_trial(fn: Callable, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], mode: str) -> Trial:
    """Trial of a bank loss ``fn(student (N, D), teacher (N, D), bank (K, D)) -> scalar``.

    In ``forward+backward`` mode the step also back-propagates into a fresh copy of the student; the first run
    returns (loss, student gradient or None).
    """
    student, teacher, bank = inputs
    s = student.clone().requires_grad_(mode != "forward")

    def step() -> torch.Tensor:
        loss = fn(s, teacher, bank)
        if s.requires_grad:
            s.grad = None
            loss.backward()
        return loss

    def collect(loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return loss.detach().clone(), (s.grad.detach().clone() if s.grad is not None else None)

    return Trial(step, lambda: collect(step()), collect)


def compare_loss_and_grad(
    result: tuple[torch.Tensor, torch.Tensor | None], reference: tuple[torch.Tensor, torch.Tensor | None], provider: str
) -> dict[str, Any]:
    """Absolute loss error and max-relative gradient error against the reference.

    A match is loss within 2e-3 (relative to max(1, |loss|)) and gradient within 2e-2 of the reference's largest entry.
    """
    (loss, grad), (ref_loss, ref_grad) = result, reference
    out: dict[str, Any] = {"loss_err": abs(loss.item() - ref_loss.item())}
    if grad is not None and ref_grad is not None:
        out["grad_err"] = (grad - ref_grad).abs().max().item() / ref_grad.abs().max().item()
    out["matches_reference"] = out["loss_err"] <= 2e-3 * max(1.0, abs(ref_loss.item())) and (
        out.get("grad_err", 0.0) <= 2e-2
    )
    return out


def run_loss_matrix(
    args: argparse.Namespace,
    *,
    stem: str,
    providers: dict[str, Callable],
    shapes: list[Shape],
    targets: list[Shape],
    flops_per_nkd: float,
) -> list[dict[str, Any]]:
    """:func:`run_matrix` for a bank loss ``fn(student, teacher, bank)``, forward and forward+backward.

    Per shape the fp16 bank, the student and the teacher (N, D) are drawn in that order; rows are labelled
    ``bank_dtype="fp16"``.
    """

    def make_inputs(shape: Shape, gen: torch.Generator, device: str) -> tuple[torch.Tensor, ...]:
        n, k, d = shape
        bank = random_bank(k, d, gen, device)
        student = torch.randn(n, d, generator=gen).to(device)
        teacher = torch.randn(n, d, generator=gen).to(device)
        return student, teacher, bank

    def new_row(shape: Shape, mode: str, provider: str) -> dict[str, Any]:
        n, k, d = shape
        return {"op": stem, "mode": mode, "N": n, "K": k, "D": d, "provider": provider, "bank_dtype": "fp16"}

    return run_matrix(
        args,
        device=bench_device(args),
        providers=providers,
        shapes=shapes,
        targets=targets,
        modes=("forward", "forward+backward"),
        make_inputs=make_inputs,
        new_row=new_row,
        trial=loss_trial,
        compare=compare_loss_and_grad,
        flops_per_nkd=flops_per_nkd,
    )


def write_matrix_results(
    args: argparse.Namespace,
    stem: str,
    rows: list[dict[str, Any]],
    *,
    title: str,
    notes: str,
    targets: list[dict[str, Any]],
    targets_heading: str = "Targets (triton)",
) -> dict[str, Path]:
    """Write a matrix benchmark's files (:func:`write_results`) with a provider plot and the targets checked.

    ``--smoke`` runs are labelled with the CPU and go to :data:`SMOKE_DIR` unless ``--out-dir`` says otherwise.
    ``targets`` are :func:`check_targets` dicts, listed below ``notes`` under ``targets_heading``.
    """
    env = environment("cpu" if args.smoke else args.device)
    out_dir = args.out_dir or (SMOKE_DIR if args.smoke else None)
    if getattr(args, "interrupted", False):
        notes = "INTERRUPTED at its time limit: only the rows measured before it are here.\n\n" + notes
    notes += f"\n\n{targets_heading}:\n" + check_targets(rows, targets)
    paths = write_results(
        stem, rows, title=title, plot=lambda r: plot_providers(r, stem), out_dir=out_dir, env=env, notes=notes
    )
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return paths
