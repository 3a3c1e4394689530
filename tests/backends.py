"""Which backends the loss tests compare against the reference here."""

from __future__ import annotations

from conftest import kernel_available

# Every non-reference backend that can run on this machine, compared against the materializing oracle.
STATS_BACKENDS = ["streaming"] + (["triton"] if kernel_available("bank_softmax_stats") else [])
TOPK_BACKENDS = ["streaming"] + (["triton"] if kernel_available("bank_topk") else [])
