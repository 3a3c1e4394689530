"""Backend selection shared by every op: which implementation of a bank op runs for a given call.

- ``"reference"``: materializes the N×K logits in fp32 (fp64 for fp64 inputs) and lets autograd differentiate. The
  oracle the other backends are tested against; memory O(N·K).
- ``"streaming"``: pure PyTorch, one online-softmax pass over bank chunks; memory O(N·D + N·chunk).
- ``"triton"``: the fused kernels in :mod:`fastssl.kernels`; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
- ``"auto"``: ``"triton"`` for CUDA tensors when Triton imports, else ``"streaming"``.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "reference", "streaming", "triton")


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (must be set before the kernels are imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# What the kernels serve (fastssl.kernels raise outside it): D ≤ 512, fp32 banks only up to D = 128 (wider fp32 tiles
# spill registers), top-k k ≤ 256. "auto" falls back to the streaming backend outside these limits.
TRITON_MAX_DIM = 512
TRITON_MAX_DIM_FP32_BANK = 128
TRITON_MAX_K = 256


def triton_serves(bank: torch.Tensor, *, k: int | None = None) -> bool:
    """Whether the Triton kernels handle a bank of this dtype and width (and this k, for top-k)."""
    dim = bank.shape[-1]
    max_dim = TRITON_MAX_DIM_FP32_BANK if bank.dtype == torch.float32 else TRITON_MAX_DIM
    return dim <= max_dim and (k is None or k <= TRITON_MAX_K)


def check_backend(backend: str) -> str:
    """``backend`` must name one of :data:`BACKENDS` (checked where a loss module is built); returns it."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(
    backend: str, *tensors: torch.Tensor, triton_ok: bool = True, bank: torch.Tensor | None = None
) -> str:
    """Turns a user's ``backend`` argument into the concrete backend for these tensors.

    Args:
        backend: one of ``"auto"``, ``"reference"``, ``"streaming"``, ``"triton"``.
        *tensors: the op's tensor inputs; they decide the device.
        triton_ok: whether the kernels serve this call (:func:`triton_serves`); "auto" needs it to pick Triton.
        bank: the bank rows (also among ``tensors``): their dtype is the kernels' tensor-core dtype.

    Returns:
        ``"reference"``, ``"streaming"`` or ``"triton"``.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: ``"triton"`` was asked for but cannot run here.
        TypeError: ``"triton"`` with fp64 inputs, or on CPU tensors with a bf16 bank (the interpreter's bf16 dots are
            wrong).
    """
    check_backend(backend)
    on_cuda = any(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if on_cuda and triton_ok and triton_available() else "streaming"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError('backend="triton" needs the triton package: pip install -e ".[triton]"')
        if not on_cuda and not triton_interpreter_enabled():
            raise RuntimeError(
                'backend="triton" on CPU tensors runs only in Triton\'s interpreter: set TRITON_INTERPRET=1 before '
                'importing fastssl, or use backend="streaming" (the default on CPU)'
            )
        if any(t.dtype == torch.float64 for t in tensors):
            raise TypeError('backend="triton" does not support float64; use backend="streaming" or "reference"')
        if not on_cuda and bank is not None and bank.dtype == torch.bfloat16:
            raise TypeError(
                'backend="triton" on CPU tensors with a bf16 bank: Triton\'s interpreter computes bf16 tl.dot wrongly '
                '(triton#11584); use backend="streaming" on CPU (bf16 banks run compiled on a GPU)'
            )
    return backend


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 if any input is fp64 (for gradcheck), else fp32: fp16/bf16/fp32 inputs all accumulate in fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
