"""Every benchmark script's --smoke mode runs on CPU and every provider agrees with the reference.

The scripts run in parallel subprocesses (each imports torch, fastssl and Triton's interpreter once); the tests then
assert on the JSON each one wrote: all providers present, each with a timing and a result that matches the reference
loss (and gradient) or top-k values within the provider's tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {
    "soft_bank_cross_entropy": {
        "reference",
        "compile",
        "streaming",
        "sdpa",
        "triton",
        "triton_bankq",
        "triton_compile",
    },
    "bank_info_nce": {"reference", "compile", "streaming", "sdpa", "triton", "triton_bankq", "triton_compile"},
    "bank_topk": {
        "reference",
        "compile",
        "streaming",
        "torch_mm",
        "triton",
        "triton_two_pass",
        "triton_bankq",
        "triton_two_pass_bankq",
    },
    "bank_memory": {"setup", "reference", "streaming"},
}


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    procs = {
        stem: subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / f"{stem}.py"), "--smoke", "--out-dir", str(out / stem)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for stem in SCRIPTS
    }
    results = {}
    for stem, proc in procs.items():
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{stem} --smoke failed:\n{log[-4000:]}"
        results[stem] = json.loads((out / stem / f"{stem}.json").read_text())
        assert (out / stem / f"{stem}.md").exists()
    return results


@pytest.mark.parametrize("stem", [s for s in SCRIPTS if s != "bank_memory"])
def test_every_provider_matches_reference(smoke_results: dict, stem: str) -> None:
    result = smoke_results[stem]
    rows = result["rows"]
    assert result["environment"]["torch"] and result["environment"]["date"]
    assert SCRIPTS[stem] <= {r["provider"] for r in rows}
    for row in rows:
        assert row.get("error") is None, row
        assert row["matches_reference"] is True, row
        assert row["ms"] > 0 and row["floor_ms"] > 0
    for row in (r for r in rows if r["provider"] == "reference"):
        err = row.get("loss_err", row.get("value_err"))
        assert err == 0.0  # the reference is compared with itself: the comparison really ran
    if stem != "bank_topk":
        # forward+backward rows compared gradients too
        assert all("grad_err" in r for r in rows if r["mode"] == "forward+backward")


def test_memory_benchmark_losses_agree(smoke_results: dict) -> None:
    rows = {r["provider"]: r for r in smoke_results["bank_memory"]["rows"]}
    assert set(rows) == SCRIPTS["bank_memory"]
    assert rows["setup"]["loss"] is None
    assert rows["reference"]["loss"] == pytest.approx(rows["streaming"]["loss"], rel=1e-5)
    assert all(r["peak_rss_mb"] > 0 for r in rows.values())


def test_targets_report_host_overhead_from_the_cuda_graph_row() -> None:
    """A ``triton_graph`` row of the target shape (the same step replayed as a CUDA graph) turns into the device time
    and the host overhead (eager minus replay) in the targets text; other shapes' graph rows are not used."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import harness

    shape = {"mode": "forward+backward", "N": 256, "K": 1048576, "D": 128}
    rows = [
        {"provider": "triton", **shape, "ms": 1.0, "tflops": 275.0, "gbps": 268.0},
        {"provider": "triton_graph", **shape, "ms": 0.25},
        {"provider": "triton_graph", **shape, "D": 512, "ms": 0.01},
    ]
    text = harness.check_targets(rows, [{**shape, "max_ms": 0.3}])
    assert "1.000 ms vs ≤ 0.3 ms: missed by 3.33x" in text
    assert "as a CUDA-graph replay 0.250 ms (triton_graph: device time), so host overhead is 0.750 ms (75%)" in text
    no_graph = harness.check_targets(rows[:1], [{**shape, "max_ms": 0.3}])
    assert "CUDA-graph" not in no_graph


def test_cuda_graph_trial_without_a_gpu_is_an_error_row_not_a_crash() -> None:
    """On a machine without CUDA a ``*_graph`` provider raises a RuntimeError (one of PROVIDER_ERRORS, so the matrix
    records an error row) before touching its step."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/test_cuda_graphs.py checks capture and replay there")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import harness

    calls = []
    trial = harness.Trial(lambda: calls.append(1), lambda: None, collect=lambda out: out)
    graphed = harness.cuda_graph_trial(trial)
    assert graphed.graphed and not trial.graphed
    with pytest.raises(harness.PROVIDER_ERRORS, match="CUDA graphs need a CUDA device"):
        graphed.first_run()
    assert calls == []
    with pytest.raises(ValueError, match="collect"):
        harness.cuda_graph_trial(harness.Trial(lambda: None, lambda: None))


def test_gpu_check_refuses_cpu_only_machine() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: gpu_check would run the full check")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr


def test_gpu_check_sweep_times_tables_and_candidates_once() -> None:
    """The config sweep covers its fixed list, each kernel's sm_80 table entries and CANDIDATES_SM90 at that D (as
    (rows, keys, warps, stages, D-chunk) tuples, no repeats), and marks the quickest row of each group."""
    from dataclasses import astuple

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import fastssl.kernels.bank_softmax_stats as stats
    import fastssl.kernels.bank_topk as topk
    import gpu_check

    for module, fixed in ((stats, gpu_check.STATS_SWEEP), (topk, gpu_check.TOPK_SWEEP)):
        for d in fixed:
            configs = gpu_check.sweep_configs(module, fixed, d)
            assert len(configs) == len(set(configs)) and all(len(c) == 5 for c in configs)
            wanted = [astuple(c) for (bd, _), c in module.CONFIGS.items() if bd == d]
            wanted += [astuple(c) for (bd, _), cs in module.CANDIDATES_SM90.items() if bd == d for c in cs]
            assert set(wanted) <= set(configs)
            assert configs[: len(fixed[d])] == [tuple(c) + (0,) * (5 - len(c)) for c in fixed[d]]
    rows = [
        {"kernel": "a", "D": 512, "ms": 3.0},
        {"kernel": "a", "D": 512, "ms": 1.5},
        {"kernel": "a", "D": 512, "ms": "OutOfResources"},
        {"kernel": "a", "D": 128, "ms": 2.0},
    ]
    gpu_check.mark_fastest(rows, ("kernel", "D"))
    assert [r["fastest"] for r in rows] == ["", "yes", "", "yes"]


def test_gpu_check_suggests_table_changes_from_sweep_rows() -> None:
    """From synthetic sweep rows: a config faster than the sm_90 pick by more than the margin is suggested; a marginal
    win, a k = 64 row and a group whose pick is already fastest are not."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import fastssl.kernels.bank_softmax_stats as stats
    import fastssl.kernels.bank_topk as topk
    import gpu_check

    def stats_row(d, x, cfg, ms):
        keys = ("block_r", "block_k", "num_warps", "num_stages", "block_dc")
        return {"kernel": "bank_softmax_stats", "D": d, "x": x, **dict(zip(keys, cfg, strict=True)), "ms": ms}

    def topk_row(cfg, ms, k=10):
        keys = ("block_n", "block_k", "num_warps", "num_stages", "block_dc")
        return {"kernel": "bank_topk", "D": 512, "x": "fp32 x", "k": k, **dict(zip(keys, cfg, strict=True)), "ms": ms}

    rows = [
        stats_row(512, "fp32 x", (16, 64, 4, 2, 0), 12.2),  # the sm_90 pick for fp32 queries at D = 512
        stats_row(512, "fp32 x", (64, 64, 8, 2, 32), 4.0),  # a candidate, much faster: suggested
        stats_row(512, "fp16 x", (64, 64, 8, 2, 0), 3.7),  # the pick for fp16 queries
        stats_row(512, "fp16 x", (64, 64, 8, 2, 64), 3.6),  # under 5% faster: not suggested
        stats_row(128, "fp32 x", (128, 128, 8, 3, 0), 0.76),  # the pick is the fastest
        stats_row(128, "fp32 x", (64, 64, 4, 3, 0), "OutOfResources"),
        topk_row((32, 64, 4, 2, 0), 3.0),
        topk_row((64, 64, 4, 3, 64), 3.5),  # slower at k = 10
        topk_row((64, 64, 4, 3, 64), 1.0, k=64),  # faster only at k = 64: not judged
        topk_row((64, 64, 4, 3, 64), 0.5) | {"algorithm": "two_pass"},  # another algorithm: compared, not a config
    ]
    lines = gpu_check.table_suggestions(rows, {"bank_softmax_stats": stats, "bank_topk": topk})
    assert lines == [
        'bank_softmax_stats: CONFIGS_SM90[(512, "32x16")] = StatsConfig(64, 64, 8, 2, 32)  # 4.000 ms; '
        "now StatsConfig(16, 64, 4, 2, 0): 12.200 ms"
    ]
    topk_rows = [r | {"algorithm": r.get("algorithm", "one_pass")} for r in rows if r["kernel"] == "bank_topk"]
    assert gpu_check.algorithm_comparison(topk_rows) == [
        "D = 512, k = 10: one_pass 3.000 ms (32, 64, 4, 2, 0), two_pass 0.500 ms (64, 64, 4, 3, 64); "
        "two_pass / one_pass = 0.17",
        "D = 512, k = 64: one_pass 1.000 ms (64, 64, 4, 3, 64)",
    ]


def test_gpu_check_config_sweep_runs_every_config_in_the_interpreter(tmp_path) -> None:
    """The GPU sweep itself, on tiny shapes in Triton's CPU interpreter with a stand-in timer: every configuration it
    will launch on the GPU (table entries, candidates, D-chunked ones) runs without error and is written, with the
    suggested table lines, to kernel_configs.md."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernels in the CPU interpreter; on a GPU machine gpu_check.py runs the real sweep")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import fastssl.kernels.bank_softmax_stats as stats
    import fastssl.kernels.bank_topk as topk
    import gpu_check

    times = iter(range(1, 10_000))

    def bench(fn) -> float:
        fn()
        return float(next(times))  # each config "slower" than the last: the first of each group is the fastest

    rows = gpu_check.config_sweep(tmp_path, device="cpu", num_keys=130, num_rows=8, bench=bench)
    assert all(isinstance(r["ms"], float) for r in rows), [r for r in rows if not isinstance(r["ms"], float)]
    for kernel, module, fixed, per_config in (
        ("bank_softmax_stats", stats, gpu_check.STATS_SWEEP, 2),  # fp32 and fp16 queries
        ("bank_topk", topk, gpu_check.TOPK_SWEEP, 4),  # k = 10 and 64, both algorithms
    ):
        for d in (128, 512):
            swept = [r for r in rows if r["kernel"] == kernel and r["D"] == d]
            assert len(swept) == per_config * len(gpu_check.sweep_configs(module, fixed, d))
    markdown = (tmp_path / "kernel_configs.md").read_text()
    assert "Suggested sm_90 table changes" in markdown and "CONFIGS_SM90[(" in markdown
    for d in (128, 512):
        assert f"D = {d}, k = 10: one_pass " in markdown and "two_pass / one_pass = " in markdown


def test_gpu_check_config_sweep_stops_at_its_deadline_and_still_writes(tmp_path) -> None:
    """A device command has a hard time limit: once time_left() drops under 15 s the sweep records the remaining
    configs as skipped (launching nothing) and still writes its results, so what was timed is kept."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    launched = []
    budget = iter([100.0] * 3 + [0.0] * 10_000)  # three configs fit, then the deadline

    def bench(fn) -> float:
        launched.append(fn)
        return float(len(launched))

    rows = gpu_check.config_sweep(
        tmp_path, device="cpu", num_keys=130, num_rows=8, bench=bench, time_left=lambda: next(budget)
    )
    assert [r["ms"] for r in rows[:3]] == [1.0, 2.0, 3.0] and len(launched) == 3
    assert len(rows) > 3 and all(r["ms"] == "skipped: deadline" for r in rows[3:])
    assert "Suggested sm_90 table changes" in (tmp_path / "kernel_configs.md").read_text()


def test_gpu_check_interrupts_a_step_at_its_limit_so_it_can_report(tmp_path) -> None:
    """At its time limit a step gets SIGINT before any kill, so pytest can still print its failures and write its
    XML, and a benchmark its rows: what the step printed after the interrupt reaches the log (stderr included)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    script = (
        "import sys, time\n"
        "print('started', flush=True)\n"
        "try:\n"
        "    time.sleep(60)\n"
        "except KeyboardInterrupt:\n"
        "    print('wrote what ran', file=sys.stderr, flush=True)\n"
    )
    log = tmp_path / "step.log"
    step = gpu_check._run([sys.executable, "-c", script], timeout=2.0, log=log)
    assert step["returncode"] == "timeout"
    assert log.read_text().split() == ["started", "wrote", "what", "ran"]


def test_an_interrupted_matrix_returns_the_rows_measured_before_it(capsys) -> None:
    """run_matrix turns an interrupt (gpu_check's SIGINT) into an early return with every row measured so far,
    which the script then writes; the interrupted cell leaves no row."""
    import argparse

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import harness

    def trial(fn, inputs, mode):
        return harness.Trial(step=lambda: fn(inputs), first_run=lambda: fn(inputs))

    def interrupted(inputs):
        raise KeyboardInterrupt

    args = argparse.Namespace(providers=None, compile_targets_only=False, warmup=1, rep=1, smoke=True)
    rows = harness.run_matrix(
        args,
        device="cpu",
        providers={"reference": lambda x: x.sum(), "triton": lambda x: x.sum() + 0, "other": interrupted},
        shapes=[(2, 8, 4), (4, 8, 4)],
        targets=[],
        modes=("forward",),
        make_inputs=lambda shape, gen, device: torch.randn(shape, generator=gen),
        new_row=lambda shape, mode, provider: dict(provider=provider, mode=mode, N=shape[0], K=shape[1], D=shape[2]),
        trial=trial,
        compare=lambda result, reference, provider: {"matches_reference": bool(torch.equal(result, reference))},
        flops_per_nkd=8.0,
    )
    assert [(r["provider"], r["N"], r["matches_reference"]) for r in rows] == [
        ("reference", 2, True),
        ("triton", 2, True),
    ]
    assert all(r["ms"] > 0 for r in rows)
    assert "interrupted: writing the 2 rows measured so far" in capsys.readouterr().out
    assert args.interrupted  # write_matrix_results marks the results as cut short
