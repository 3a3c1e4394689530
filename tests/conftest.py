"""Shared test setup.

Triton kernels run in the CPU interpreter when no GPU is present; TRITON_INTERPRET must be set before any kernel
module is imported, which is why it is set here, before the test modules load. On a CUDA machine the same tests run
the compiled kernels.
"""

from __future__ import annotations

import importlib.util
import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests are deterministic and small; extra intra-op threads only fight the other test workers for 2 cores.
# On a GPU machine the fp64 CPU oracles of the large CUDA cases dominate the run: give them the machine's cores.
torch.set_num_threads(max(1, min(8 if CUDA else 2, os.cpu_count() or 1)))

DEVICE = torch.device("cuda") if CUDA else torch.device("cpu")


def kernel_available(name: str) -> bool:
    """Whether fastssl.kernels.<name> exists and Triton can run it here (GPU, or the interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return importlib.util.find_spec(f"fastssl.kernels.{name}") is not None
