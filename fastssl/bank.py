"""The memory bank: a FIFO ring buffer of L2-normalized keys shared by every bank method.

MoCo's queue (He et al. 2020), ISD's and MSF's memory bank, ReSSL's relation buffer and NNCLR's support set are all
this one structure. Unlike the official implementations it accepts any batch size (the tail wraps around instead of
requiring ``size % batch == 0``), can start empty, stores labels for purity / kNN monitoring, and validates its input
before touching anything, so a bad batch leaves the bank exactly as it was.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from fastssl.collectives import all_gather_ints, all_gather_rows, comm_device, distributed_world

INITS = ("random", "empty")
VALUE_CHECKS = ("immediate", "deferred")


class NonFiniteKeysError(ValueError):
    """``MemoryBank.enqueue`` got NaN or inf keys (a diverged model, typically); the bank is unchanged."""


def _positive_int(name: str, value: object) -> int:
    """``value`` as an int ≥ 1; accepts any integer type (numpy's included), not bools or floats."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _norm_safe(keys: torch.Tensor) -> torch.Tensor:
    """``keys`` (B, D) with each row whose norm F.normalize cannot take divided by its largest |entry| first.

    A row overflows when D·max² exceeds the dtype's largest value (its norm is inf, so it would be stored as zeros)
    and is shortened when its norm is below F.normalize's eps = 1e-12 (the norm is at least the largest entry, so
    rows whose largest entry is ≥ 1e-12 are safe). Other rows are returned bit for bit, so they are normalized exactly
    as the losses normalize their embeddings. No device read: the choice is made per row on the device.
    """
    largest = keys.abs().amax(dim=1, keepdim=True)
    high = math.sqrt(torch.finfo(keys.dtype).max / max(1, keys.shape[1])) / 2
    unsafe = (largest > high) | (largest < 1e-12)
    return torch.where(unsafe, keys / largest, keys)


class MemoryBank(nn.Module):
    """FIFO ring buffer of ``size`` unit-norm keys of dimension ``dim``.

    Buffers (all persistent, so a ``state_dict`` round trip restores the bank exactly):
        queue: (size, dim) keys in ``dtype``.
        ptr: () int64, the next row to write.
        count: () int64, the number of valid rows (valid rows are always ``queue[:count]``).
        label_queue: (size,) int64 labels, -1 = unknown (only with ``store_labels=True``).

    Args:
        size: number of rows K.
        dim: key dimension D.
        dtype: storage dtype (fp16 halves the memory and bandwidth of fp32; similarities still accumulate in fp32).
        device: storage device.
        init: ``"random"`` fills every row with a random unit vector (normalized per row — the official ISD R18
            script normalizes along dim 0, a bug not copied here); ``"empty"`` starts with no valid row.
        store_labels: keep an int64 label per row.
        sharded: under torch.distributed, this bank is one rank's shard of a bank split across ranks (``size`` rows
            per rank, size × world rows in all): ``enqueue`` writes only this rank's keys, and the softmax-stats losses
            (ISD, ReSSL, MoCo) merge every shard's (LSE, μ) partials, so the loss is that of the union of the shards.
            The bank then grows with the GPU count at a fixed memory per GPU. Every rank must call the loss. Without
            a process group (or with one rank) it is an ordinary bank.
        value_checks: ``"immediate"`` (default) refuses NaN/inf keys and all-zero rows before writing, which reads
            two numbers back from the device per enqueue (a GPU synchronization). ``"deferred"`` writes without that
            read and accumulates the same two numbers on the device; :meth:`take_value_stats` hands them over and
            :func:`value_problem` names the problem. A bad batch is then written before anyone knows: the training
            loop uses this to check one step later, with its loss, and stops without saving. Shape, dtype and device
            checks stay immediate in both modes. Under torch.distributed the stats cover this rank's own keys only:
            the caller must agree on them across ranks (the trainer all-reduces its problem code), or a rank that
            stops alone leaves the others waiting in the next collective.
    """

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        init: str = "random",
        store_labels: bool = False,
        sharded: bool = False,
        value_checks: str = "immediate",
    ) -> None:
        super().__init__()
        self.sharded = bool(sharded)
        if value_checks not in VALUE_CHECKS:
            raise ValueError(f"value_checks must be one of {VALUE_CHECKS}, got {value_checks!r}")
        self.value_checks = value_checks
        self._value_stats: torch.Tensor | None = None  # deferred mode: (2,) stats of the batches since the last take
        size, dim = _positive_int("size", size), _positive_int("dim", dim)
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if init == "random":
            queue = F.normalize(torch.randn(size, dim, device=device), dim=1).to(dtype)
            count = size
        else:
            queue = torch.zeros(size, dim, dtype=dtype, device=device)
            count = 0
        self.register_buffer("queue", queue)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("count", torch.tensor(count, dtype=torch.long, device=device))
        # Host copies of ptr and count: reading the device buffers would synchronize with the GPU on every loss call
        # and enqueue. The buffers stay authoritative for state_dict; loading one refreshes these.
        self._host_ptr, self._host_count = 0, count
        if store_labels:
            self.register_buffer("label_queue", torch.full((size,), -1, dtype=torch.long, device=device))
        else:
            self.register_buffer("label_queue", None)

    @property
    def is_sharded(self) -> bool:
        """Whether the losses must merge this bank with the other ranks' shards (``sharded`` and world size > 1)."""
        return self.sharded and distributed_world() > 1

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    @property
    def dim(self) -> int:
        return self.queue.shape[1]

    def __len__(self) -> int:
        return self._host_count

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._host_ptr, self._host_count = int(self.ptr), int(self.count)  # one sync per load, none per step
        self._value_stats = None  # pending deferred checks were of the rows just replaced

    @property
    def is_full(self) -> bool:
        return len(self) == self.size

    @property
    def keys(self) -> torch.Tensor:
        """(n_valid, D) view of the valid rows (no copy)."""
        return self.queue if self.is_full else self.queue[: len(self)]

    @property
    def labels(self) -> torch.Tensor | None:
        """(n_valid,) int64 labels of the valid rows (-1 = unknown), or None without ``store_labels``."""
        if self.label_queue is None:
            return None
        return self.label_queue if self.is_full else self.label_queue[: len(self)]

    def extra_repr(self) -> str:
        shard = ", sharded" if self.sharded else ""
        return f"size={self.size}, dim={self.dim}, dtype={self.queue.dtype}, valid={len(self)}{shard}"

    def _check(self, keys: torch.Tensor, labels: torch.Tensor | None) -> tuple[type[Exception], str] | None:
        """The first problem with this batch as (exception type, message), or None. Never raises, so ranks can agree
        before anyone raises."""
        if not isinstance(keys, torch.Tensor):
            return TypeError, f"keys must be a torch.Tensor, got {type(keys).__name__}"
        if keys.dim() != 2:
            return (
                ValueError,
                f"keys must have shape (batch, {self.dim}), got a {keys.dim()}-D tensor of shape {tuple(keys.shape)}",
            )
        if keys.shape[1] != self.dim:
            return ValueError, f"keys have dim {keys.shape[1]}, the bank has dim {self.dim}"
        if not keys.dtype.is_floating_point:
            return (
                TypeError,
                f"keys must be floating point to be normalized and cast to {self.queue.dtype}, got {keys.dtype}",
            )
        if keys.device != self.queue.device:
            return ValueError, f"keys are on {keys.device}, the bank is on {self.queue.device}"
        if self.queue.is_cuda and torch.cuda.is_current_stream_capturing():
            return RuntimeError, (
                "cannot be captured in a CUDA graph: its ring pointer lives on the host (a replay would write the "
                "same rows every time) and its validation reads the keys back; capture the loss, enqueue outside"
            )
        if keys.shape[0] > self.size:
            return ValueError, f"batch of {keys.shape[0]} keys is larger than the bank ({self.size} rows)"
        if keys.shape[0] and self.value_checks == "immediate":
            # One device read of two numbers (each read waits for the GPU to finish the queued work).
            problem = value_problem(*_value_stats(keys).tolist())
            if problem is not None:
                return problem
        if labels is not None:
            if self.label_queue is None:
                return ValueError, "labels were given but the bank was built with store_labels=False"
            if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != keys.shape[0]:
                shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
                return ValueError, f"labels must have shape ({keys.shape[0]},) to match the keys, got {shape}"
            if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
                return TypeError, f"labels must be integers, got {labels.dtype}"
            if labels.device != self.queue.device:
                return ValueError, f"labels are on {labels.device}, the bank is on {self.queue.device}"
        return None

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """L2-normalizes ``keys``, casts them to the bank dtype and writes them in FIFO order.

        Under an initialized torch.distributed process group the keys (and labels) of every rank are all-gathered
        first (batch sizes may differ between ranks), so all ranks end with identical banks; every rank must call
        this. A ``sharded`` bank writes only this rank's keys into its shard. Validation happens on every rank before
        any write, and a bad batch on any rank raises on all ranks.

        Args:
            keys: (B, D) floating-point keys, B ≤ size.
            labels: optional (B,) integer labels (requires ``store_labels=True``); unknown rows get -1 when omitted.

        Raises:
            ValueError / TypeError: naming the problem; the bank is left unchanged.
        """
        problem = self._check(keys, labels)
        distributed = distributed_world() > 1
        counts = None
        if distributed:
            problem, counts = self._agree_on_problem(problem, keys)
        if problem is not None:
            error, message = problem
            raise error(f"MemoryBank.enqueue: {message}")
        if self.value_checks == "deferred" and keys.shape[0]:
            stats = _value_stats(keys)
            previous = None if self._value_stats is None else self._value_stats.to(stats.device)  # after a .to()
            self._value_stats = (
                stats
                if previous is None
                else torch.stack((previous[0].minimum(stats[0]), previous[1].maximum(stats[1])))
            )
        # Normalize in at least fp32 (fp64 keys stay fp64), so a key stored in its own precision is bitwise the
        # normalized key the losses compute: MSF with k=1 then equals BYOL exactly.
        keys = F.normalize(_norm_safe(keys.detach().to(torch.promote_types(keys.dtype, torch.float32))), dim=1)
        keys = keys.to(self.queue.dtype)
        if self.label_queue is not None:
            labels = (
                torch.full((keys.shape[0],), -1, dtype=torch.long, device=keys.device)
                if labels is None
                else labels.detach().to(torch.long)
            )
        if distributed and not self.sharded:
            keys, labels = self._all_gather(keys, labels, counts)
            if keys.shape[0] > self.size:
                raise ValueError(
                    f"MemoryBank.enqueue: the {keys.shape[0]} keys gathered from all ranks exceed the bank "
                    f"({self.size} rows)"
                )
        self._write(keys, labels)

    def _write(self, keys: torch.Tensor, labels: torch.Tensor | None) -> None:
        n, size = keys.shape[0], self.size
        ptr = self._host_ptr
        head = min(n, size - ptr)  # rows that fit before the end of the ring; the rest wrap to row 0
        self.queue[ptr : ptr + head].copy_(keys[:head])
        self.queue[: n - head].copy_(keys[head:])
        if self.label_queue is not None:
            self.label_queue[ptr : ptr + head].copy_(labels[:head])
            self.label_queue[: n - head].copy_(labels[head:])
        self._host_ptr, self._host_count = (ptr + n) % size, min(self._host_count + n, size)
        self.ptr.fill_(self._host_ptr)  # fill_ with a Python number: no device read
        self.count.fill_(self._host_count)

    def take_value_stats(self) -> torch.Tensor | None:
        """Deferred value checks: the (2,) device tensor (smallest row max |entry|, largest |entry|) over the batches
        written since the last call (None if there were none), without reading it; resets. Pass its two numbers to
        :func:`value_problem` on the host."""
        stats, self._value_stats = self._value_stats, None
        return stats

    def _agree_on_problem(
        self, problem: tuple[type[Exception], str] | None, keys: torch.Tensor
    ) -> tuple[tuple[type[Exception], str] | None, list[int]]:
        """All ranks learn whether any rank's batch is bad, so none blocks in the all-gather that follows; a rank whose
        own batch was fine raises the same error type as the worst rank (non-finite keys stop training everywhere
        with the trainer's non-finite message). The same all-gather carries each rank's batch size, so the problem
        code and the row counts cost one device read together."""
        severity = [None, ValueError, NonFiniteKeysError]
        code = 0 if problem is None else (2 if problem[0] is NonFiniteKeysError else 1)
        rows = keys.shape[0] if isinstance(keys, torch.Tensor) and keys.dim() >= 1 else 0
        votes = all_gather_ints([code, rows], comm_device(self.queue))
        agreed = max(v[0] for v in votes)
        if problem is None and agreed:
            return (severity[agreed], "another rank passed an invalid batch (see its error)"), []
        return problem, [v[1] for v in votes]

    def _all_gather(
        self, keys: torch.Tensor, labels: torch.Tensor | None, counts: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Concatenates every rank's batch in rank order (batch sizes may differ between ranks)."""
        keys = all_gather_rows(keys, self.queue.device, counts)[0]
        return keys, None if labels is None else all_gather_rows(labels, self.queue.device, counts)[0]


def _value_stats(keys: torch.Tensor) -> torch.Tensor:
    """(2,) tensor on the keys' device: the smallest of the rows' largest |entries| (0 iff a row is all zero) and the
    largest |entry| (NaN or inf iff an entry is: amax and aminmax propagate NaN). Three launches, no device read."""
    return torch.stack(torch.aminmax(keys.abs().amax(dim=1)))


def value_problem(smallest: float, largest: float) -> tuple[type[Exception], str] | None:
    """The problem that :func:`_value_stats`' two numbers reveal, as (exception type, message), or None."""
    if not math.isfinite(largest):
        return NonFiniteKeysError, "keys contain NaN or inf"
    if smallest == 0:
        return ValueError, "keys contain an all-zero row, which has no direction to normalize"
    return None
