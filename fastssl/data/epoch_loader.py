"""Backend-independent loader state: epoch, resume step, sharded batch order, output format."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from fastssl.data.sampler import ShardedBatchOrder
from fastssl.data.sources import Source
from fastssl.data.spec import ViewSpec

Batch = dict[str, Any]


class MultiViewLoader:
    """Iterable over multi-view batches; subclasses supply :meth:`_iter_batches`.

    Iterating yields ``{"views": [V tensors (N, 3, H_v, W_v) float32], "index": (N,) int64, "label": (N,) int64}``
    for the current epoch. Call :meth:`set_epoch` before each epoch (as with DistributedSampler). The ``start_step``
    given to ``make_loader`` (or :meth:`resume`) applies to the next iteration only; ``len(loader)`` is always the
    number of batches in a full epoch, so LR schedules do not shift on resume.

    Attributes:
        backend: "torchvision" or "dali".
        reason: why that backend was chosen (also logged once).
        views: the view specs, in output order.
        device: where the views are delivered.
    """

    backend: str = "?"

    def __init__(
        self,
        source: Source,
        views: list[ViewSpec],
        order: ShardedBatchOrder,
        *,
        start_step: int,
        device: torch.device,
        channels_last: bool,
        on_error: str,
        reason: str,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.source = source
        self.views = views
        self.order = order
        self.device = device
        self.channels_last = channels_last
        self.on_error = on_error
        self.reason = reason
        self.epoch = 0
        self._start_step = 0
        self.resume(0, start_step)

    def __len__(self) -> int:
        return len(self.order)

    @property
    def batch_size(self) -> int:
        return self.order.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration yields (determines shuffle order and augmentation draws)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def resume(self, epoch: int, step: int) -> None:
        """Make the next iteration yield batches ``step, step+1, ...`` of ``epoch`` (later epochs start at 0)."""
        if not 0 <= step <= len(self.order):
            raise ValueError(f"resume step {step} outside [0, {len(self.order)}] batches per epoch")
        self.set_epoch(epoch)
        self._start_step = int(step)

    def __iter__(self) -> Iterator[Batch]:
        start, self._start_step = self._start_step, 0
        return self._iter_batches(self.epoch, start)

    def _iter_batches(self, epoch: int, start_step: int) -> Iterator[Batch]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backend={self.backend!r}, samples={len(self.source)}, views="
            f"{[v.name or v.size for v in self.views]}, batch_size={self.batch_size}, batches={len(self)}, "
            f"rank={self.order.rank}/{self.order.world_size}, device={self.device})"
        )
