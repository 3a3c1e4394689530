"""Validation and preparation of the inputs every functional loss shares: embeddings, banks and temperatures."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from fastssl.bank import MemoryBank
from fastssl.collectives import agree, comm_device


def normalized(x: torch.Tensor) -> torch.Tensor:
    """L2-normalized rows in fp32 (fp64 stays fp64); differentiable.

    fp16/bf16 inputs are NOT rounded back after normalizing: at τ_t = 0.01 the 2⁻¹¹ rounding of a unit vector would
    move logits by ~1e-2, more than the whole fp32-accumulation error budget.
    """
    return F.normalize(x if x.dtype == torch.float64 else x.float(), dim=1)


QUERY_PRECISIONS = ("float32", "bank")


def check_query_precision(query_precision: str) -> str:
    """``query_precision`` must be one of :data:`QUERY_PRECISIONS`; returns it."""
    if query_precision not in QUERY_PRECISIONS:
        raise ValueError(f"query_precision must be one of {QUERY_PRECISIONS}, got {query_precision!r}")
    return query_precision


def query_dtype_for(rows: torch.Tensor, query: torch.Tensor, query_precision: str) -> torch.dtype | None:
    """The dtype the bank ops round the normalized queries to: None for ``"float32"`` (fp32-accurate logits: the
    kernels split each query into two or three 16-bit terms), the bank's dtype for ``"bank"`` with a 16-bit bank (one
    tensor-core dot per tile; the queries then carry the bank rows' own 2^-11 (fp16) or 2^-8 (bf16) relative rounding,
    which moves a τ = 0.01 logit by up to ~0.1 for fp16). Only the forward values are rounded: the gradient is not.
    fp64 queries are never rounded (they ask for an fp64 loss)."""
    if check_query_precision(query_precision) == "bank" and rows.dtype in (torch.float16, torch.bfloat16):
        if query.dtype == torch.float64:
            return None
        return rows.dtype
    return None


def check_embeddings(name: str, x: torch.Tensor, *, like: torch.Tensor | None = None, like_name: str = "") -> None:
    """Raises a clear error unless ``x`` is a finite-shaped (N, D) floating tensor matching ``like``'s shape/device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no features (D = 0)")
    if like is not None:
        if x.shape != like.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but {like_name} has shape {tuple(like.shape)}")
        if x.device != like.device:
            raise ValueError(f"{name} is on {x.device} but {like_name} is on {like.device}")


def is_sharded_bank(bank: torch.Tensor | MemoryBank) -> bool:
    """Whether ``bank`` is one rank's shard of a bank split across ranks (a ``sharded`` MemoryBank, world > 1)."""
    return isinstance(bank, MemoryBank) and bank.is_sharded


@contextmanager
def checked_on_every_rank(bank: torch.Tensor | MemoryBank) -> Iterator[None]:
    """Runs the input checks of a loss over a sharded bank so that a bad input on ONE rank raises on EVERY rank.

    The loss then enters collectives that all ranks must join; a rank raising alone would leave the others waiting
    forever. One all-reduce of a flag, and only for sharded banks (a no-op otherwise).
    """
    if not is_sharded_bank(bank):
        yield
        return
    try:
        yield
    except (ValueError, TypeError):
        agree(False, comm_device(bank.queue))
        raise
    if not agree(True, comm_device(bank.queue)):
        raise ValueError("sharded bank: another rank passed an invalid input to this loss (see its error)")


def bank_rows(bank: torch.Tensor | MemoryBank, query: torch.Tensor, *, shardable: bool = False) -> torch.Tensor:
    """The (K, D) valid rows of a bank (a tensor or a :class:`~fastssl.MemoryBank`), checked against ``query``.

    ``shardable``: the caller merges a sharded bank's shards (the softmax-statistics losses); every other caller
    needs the whole bank and gets a clear error for a shard.
    """
    if is_sharded_bank(bank) and not shardable:
        raise ValueError(
            "this loss needs the whole bank, but the MemoryBank is sharded across ranks: only the softmax losses "
            "(ISD, ReSSL, MoCo InfoNCE) merge shards; top-k methods (MSF, NNCLR, purity) need sharded=False"
        )
    rows = bank.keys if isinstance(bank, MemoryBank) else bank
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"bank must be a torch.Tensor or a fastssl.MemoryBank, got {type(bank).__name__}")
    if rows.dim() != 2:
        raise ValueError(f"bank must have shape (K, D), got {tuple(rows.shape)}")
    if not rows.dtype.is_floating_point:
        raise TypeError(f"bank must be floating point, got {rows.dtype}")
    if rows.shape[1] != query.shape[1]:
        raise ValueError(f"bank has dim {rows.shape[1]} but the embeddings have dim {query.shape[1]}")
    if rows.shape[0] == 0 and not is_sharded_bank(bank):  # a shard's emptiness is agreed on by all ranks in the op
        raise ValueError(
            "bank has no valid rows yet: an init='empty' bank needs an enqueue first (the loss modules enqueue after "
            "the loss, so fill theirs first or build it with init='random', as the official code does)"
        )
    if rows.device != query.device:
        raise ValueError(f"bank is on {rows.device} but the embeddings are on {query.device}")
    return rows


def check_temperature(name: str, tau: float) -> float:
    """τ must be a positive finite number; returns it as a float."""
    if isinstance(tau, (str, bytes, bool)):  # float("0.1") and float(True) would pass silently
        raise TypeError(f"{name} must be a number, got {type(tau).__name__} {tau!r}")
    tau = float(tau)
    if not (tau > 0 and tau < float("inf")):
        raise ValueError(f"{name} must be a positive finite temperature, got {tau}")
    return tau
