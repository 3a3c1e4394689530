"""Which backends the loss tests compare against the reference here."""

from __future__ import annotations

import torch
from conftest import DEVICE, kernel_available

# Every non-reference backend that can run on this machine, compared against the materializing oracle.
STATS_BACKENDS = ["streaming"] + (["triton"] if kernel_available("bank_softmax_stats") else [])
TOPK_BACKENDS = ["streaming"] + (["triton"] if kernel_available("bank_topk") else [])


def device_for(backend: str) -> torch.device:
    """Where a test puts its tensors for ``backend``: the Triton kernels run on the GPU when there is one (the
    interpreter runs CPU tensors only where no GPU is present), every other backend on the CPU."""
    return DEVICE if backend == "triton" else torch.device("cpu")
