"""Ahead-of-time compile check of every Triton kernel, without a GPU.

Each kernel variant its launcher can pick for D in {128, 512} and every supported (query, bank) dtype pair
(``aot_specs`` of each kernel module, built from the same per-architecture config table and constexpr helper as the
launcher) is compiled for sm_80, sm_86, sm_89 and sm_90 with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``, and the cubin's resource usage is read with the
cuobjdump shipped in Triton. A kernel that spills registers shows a non-zero STACK (ptxas puts spill slots in the stack
frame; LOCAL counts only explicit local arrays, so LOCAL:0 alone does not exclude spills): both must be 0. Static plus
dynamic shared memory (the software pipeline's buffers) must fit the architecture's per-block opt-in limit (a launch
that exceeds it fails with OutOfResources). If an entry spills, change the config table, not this check. The sm_90
tuning candidates (``CANDIDATES_SM90``) are checked the same way, so the GPU sweep that times them never meets a
spilling or unlaunchable one. The table-free prologue and epilogue kernels compile the same code everywhere and are
checked for sm_80 and sm_90 only.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

# sm_80 (A100) and sm_90 (H100), and sm_86 / sm_89 (A10, L4, RTX 30/40), which use the sm_80 table with less shared
# memory per block.
ARCHS = (80, 86, 89, 90)
DIMS = (128, 512)
# (query dtype, bank dtype): fp32 queries over fp16/bf16 banks (what fastssl.functional passes), plain fp16, fp32.
# Plain bf16 x bf16 compiles to the fp16 code with another mma type; it runs in the GPU tests.
DTYPE_PAIRS = (
    (torch.float32, torch.float16),
    (torch.float32, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float32, torch.float32),
)
FP32_MAX_D = 128  # fp32 banks are rejected above this D (see the config tables)
KERNEL_MODULES = ("bank_softmax_stats", "bank_topk", "unit_rows", "bank_loss_epilogue")
# Largest shared memory (static + dynamic) one block can opt into (CUDA programming guide, compute capabilities
# table): 163 KB on sm_80 (A100), 99 KB on sm_86 / sm_89, 227 KB on sm_90 (H100).
MAX_SHARED_PER_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


# Config-table column -> the (query, bank) dtypes of the candidates compiled for it.
CANDIDATE_DTYPES = {"32x16": (torch.float32, torch.float16), "16": (torch.float16, torch.float16)}


def _specs() -> list[tuple]:
    """(module, spec name, D, x dtype, bank dtype, cc, config) of every variant: the config tables' (config None) and
    the sm_90 tuning candidates' (``CANDIDATES_SM90``, timed by benchmarks/gpu_check.py's sweep); dtype-independent
    merge kernels once per D."""
    import importlib

    out, seen = [], set()

    def add(module, mod, d, x_dtype, bank_dtype, cc, config=None):
        extra = {"config": config} if config is not None else {}
        for spec in mod.aot_specs(d, x_dtype, bank_dtype, arch=cc, **extra):
            if (spec["name"], cc) not in seen:
                seen.add((spec["name"], cc))
                out.append((module, spec["name"], d, x_dtype, bank_dtype, cc, config))

    for module in KERNEL_MODULES:
        mod = importlib.import_module(f"fastssl.kernels.{module}")
        for d in DIMS:
            for x_dtype, bank_dtype in DTYPE_PAIRS:
                if bank_dtype == torch.float32 and d > FP32_MAX_D:
                    continue
                # each architecture compiles its own config table; table-free kernels (prologue, epilogue) compile
                # the same code everywhere, checked for sm_80 and sm_90
                for cc in ARCHS if hasattr(mod, "CONFIGS") else (80, 90):
                    add(module, mod, d, x_dtype, bank_dtype, cc)
        for (block_d, column), configs in getattr(mod, "CANDIDATES_SM90", {}).items():
            for config in configs:
                add(module, mod, block_d, *CANDIDATE_DTYPES[column], 90, config)
    return out


def resource_usage(
    module: str, name: str, d: int, x_dtype: torch.dtype, bank_dtype: torch.dtype, cc: int, config=None
) -> dict[str, int]:
    """Compile one variant for sm_<cc> and return its cuobjdump resource usage (REG, STACK, LOCAL, SHARED)."""
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod = importlib.import_module(f"fastssl.kernels.{module}")
    extra = {"config": config} if config is not None else {}
    spec = next(s for s in mod.aot_specs(d, x_dtype, bank_dtype, arch=cc, **extra) if s["name"] == name)
    src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"], attrs=spec["attrs"])
    options = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        dump = subprocess.run(
            [str(CUOBJDUMP), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    function = dump.split(f"Function {spec['fn'].__name__}:", 1)[1]
    usage = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", function)}
    return {**usage, "DYNAMIC_SHARED": int(compiled.metadata.shared)}


SPECS = _specs()


@pytest.fixture(scope="module")
def usage() -> dict[tuple, dict[str, int] | str]:
    """Compile everything once, in parallel; failures are recorded per variant, not raised here."""
    if not CUOBJDUMP.exists():
        pytest.skip(f"cuobjdump not shipped with this Triton ({CUOBJDUMP})")
    results: dict[tuple, dict[str, int] | str] = {}
    # Under TRITON_INTERPRET=1 @triton.jit returns interpreted functions, which cannot be compiled: compile in fresh
    # (spawned) processes that import the kernels without the flag.
    env_interpret = os.environ.pop("TRITON_INTERPRET", None)
    try:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1), mp_context=context) as pool:
            futures = {spec: pool.submit(resource_usage, *spec) for spec in SPECS}
            for spec, future in futures.items():
                try:
                    results[spec] = future.result()
                except Exception as exc:  # noqa: BLE001 - reported by the parametrized test of that variant
                    results[spec] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
    finally:
        if env_interpret is not None:
            os.environ["TRITON_INTERPRET"] = env_interpret
    return results


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s[0]}-{s[1]}-sm{s[5]}")
def test_compiles_without_spills(usage: dict, spec: tuple) -> None:
    result = usage[spec]
    assert isinstance(result, dict), f"compile failed: {result}"
    assert result["LOCAL"] == 0 and result["STACK"] == 0, f"register spills: {result}"
    assert 0 < result["REG"] <= 255
    shared = result["DYNAMIC_SHARED"] + result["SHARED"]
    assert shared <= MAX_SHARED_PER_BLOCK[spec[5]], f"shared memory over the launch limit: {result}"


def test_every_jit_function_is_compiled_by_the_aot_specs():
    """Each launched kernel appears in ``aot_specs``; each @triton.jit helper is inlined into one of them, so the
    compile check above covers it (helpers are listed by name, with the kernel that calls them)."""
    import importlib
    import inspect

    launched = {
        "bank_softmax_stats": {"_bank_softmax_stats_partial_kernel", "_bank_softmax_stats_merge_kernel"},
        "bank_topk": {"_bank_topk_partial_kernel", "_bank_topk_tile_max_kernel", "_bank_topk_merge_kernel"},
        "unit_rows": {"_unit_rows_kernel"},
        "bank_loss_epilogue": {"_bank_loss_epilogue_kernel"},
    }
    helpers = {  # helper -> a launched kernel whose source calls it (directly or through another helper)
        "query_dot": "_bank_softmax_stats_partial_kernel",
        "chunked_query_dot": "_bank_softmax_stats_partial_kernel",
        "split_query": "_bank_softmax_stats_partial_kernel",
        "_score_tile": "_bank_topk_partial_kernel",
        "_query_terms": "_bank_topk_partial_kernel",
        "_empty_lists": "_bank_topk_tile_max_kernel",
        "_store_sorted_lists": "_bank_topk_tile_max_kernel",
        "_insert_row_keys": "_bank_topk_tile_max_kernel",
        "_pack_keys": "_bank_topk_partial_kernel",
        "_unpack_value": "_insert_row_keys",
        "_above_floor": "_bank_topk_partial_kernel",
        "_topk_rows": "_store_sorted_lists",
        "_sort_bitonic_rows": "_bank_topk_merge_kernel",
        "_bitonic_merge": "_sort_bitonic_rows",
        "_compare_exchange": "_bitonic_merge",
        "_upper_bit": "_compare_exchange",
    }
    sources = {}
    for module, kernels in launched.items():
        mod = importlib.import_module(f"fastssl.kernels.{module}")
        compiled = {spec["fn"].__name__ for d in DIMS for spec in mod.aot_specs(d, torch.float32, torch.float16)}
        assert kernels <= compiled, f"{module}: {kernels - compiled} not in aot_specs"
        for name, obj in vars(mod).items():
            # JITFunction when compiled, InterpretedFunction under TRITON_INTERPRET=1: both wrap the Python fn.
            if isinstance(obj, triton.runtime.jit.KernelInterface) and callable(getattr(obj, "fn", None)):
                sources[name] = inspect.getsource(obj.fn)
    for helper, caller in helpers.items():
        assert f"{helper}(" in sources[caller], f"{caller} does not call {helper}"
    jit_functions = set(sources)
    assert jit_functions == set(helpers) | set().union(*launched.values()), (
        "a new @triton.jit function needs a row here"
    )
