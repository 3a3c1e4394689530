"""How a loss module gets its bank: the one it was given, or a new one it owns."""

from __future__ import annotations

import torch

from fastssl.bank import MemoryBank


def own_or_given_bank(
    bank: MemoryBank | None,
    dim: int | None,
    bank_size: int,
    *,
    dtype: torch.dtype,
    init: str,
    store_labels: bool,
) -> MemoryBank:
    """Returns ``bank`` if given (checking ``dim``), else a new :class:`MemoryBank` of ``bank_size`` × ``dim``."""
    if bank is not None:
        if not isinstance(bank, MemoryBank):
            raise TypeError(f"bank must be a fastssl.MemoryBank, got {type(bank).__name__}")
        if dim is not None and bank.dim != dim:
            raise ValueError(f"bank has dim {bank.dim}, but dim={dim} was given")
        return bank
    if dim is None:
        raise ValueError("give either dim (to build a bank) or bank")
    return MemoryBank(bank_size, dim, dtype=dtype, init=init, store_labels=store_labels)
