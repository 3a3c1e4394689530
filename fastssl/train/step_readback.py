"""One training step's numbers, read back to the host a step late so the step itself never waits for the GPU.

Every ``float(loss)`` or validation read inside a step makes the host wait for all queued GPU work; the host then
queues the rest of the step (the loss kernels, the backward) while the GPU idles, so the loss's host time is added to
the step instead of hidden behind the backbone's queued kernels. The trainer instead packs the step's loss, its tensor
metrics and the banks' deferred value checks (``MemoryBank(value_checks="deferred")``) into one small tensor, starts
its copy to pinned host memory without waiting, and reads it after the next step is queued, when the GPU has long
finished it. Under torch.distributed the problem code is all-reduced (MAX) first, so every rank stops at the same step.

A bad step is therefore found one step late. Nothing is saved in between: the trainer reads the pending step before
every checkpoint, evaluation and stop, so the last checkpoint is always of a checked step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastssl.collectives import comm_device, distributed_world

# Problem codes; the largest is reported (and kept by the all-reduce across ranks). Bad teacher keys outrank the loss,
# which they make non-finite too: they name the cause.
OK, NON_FINITE_LOSS, ZERO_KEY_ROW, NON_FINITE_KEYS = 0, 1, 2, 3
MESSAGES = {
    ZERO_KEY_ROW: "an all-zero teacher key row (a collapsed teacher)",
    NON_FINITE_KEYS: "non-finite teacher keys",
    NON_FINITE_LOSS: "non-finite loss",
}


@dataclass
class StepResult:
    """What a step's readback holds on the host."""

    step: int  # the step's index (0-based global step)
    epoch: int
    batch: int  # its batch index within the epoch
    loss: float
    metrics: dict[str, float]
    problem: int  # worst problem code over this rank's values and (distributed) every rank's
    own_problem: int  # this rank's own
    stop_vote: bool = False  # some rank voted to stop (its time budget ran out)


class StepReadback:
    """Packs one step's device values and copies them to the host without waiting.

    Args:
        step, epoch, batch: where the step is (for the messages).
        loss: () loss tensor of the step.
        metrics: name → float or 0-d/1-element tensor (tensors are read back with the loss).
        value_stats: the banks' ``take_value_stats()`` results (None entries are skipped).
        stop_vote: this rank wants to stop (its time budget ran out); the vote is all-reduced with the problem code,
            so every rank learns it at the same step and they stop together.
    """

    def __init__(
        self,
        step: int,
        epoch: int,
        batch: int,
        loss: torch.Tensor,
        metrics: dict[str, float | torch.Tensor],
        value_stats: list[torch.Tensor | None],
        stop_vote: bool = False,
    ) -> None:
        self.where = (step, epoch, batch)
        self.host_metrics = {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
        self.tensor_names = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
        # Classified in their own dtypes (fastssl.bank.value_problem's rule, on the device), packed as fp64 so fp64
        # values are neither misclassified nor rounded on the way back.
        loss = loss.detach().reshape(1)
        code = torch.where(torch.isfinite(loss), OK, NON_FINITE_LOSS)
        for stats in value_stats:
            if stats is None:
                continue
            keys_code = torch.where(
                ~torch.isfinite(stats[1:]), NON_FINITE_KEYS, torch.where(stats[:1] == 0, ZERO_KEY_ROW, OK)
            )
            code = torch.maximum(code, keys_code.to(code.device))
        agreed = torch.cat([code, torch.full_like(code, int(stop_vote))])  # a fill, not a host-to-device copy
        if distributed_world() > 1:
            shared = agreed.to(comm_device(agreed), copy=True)
            dist.all_reduce(shared, op=dist.ReduceOp.MAX)
            agreed = shared.to(code.device)
        metric_values = [metrics[k].detach().reshape(1).to(loss.device) for k in self.tensor_names]
        packed = torch.cat([v.to(torch.float64) for v in (loss, code, agreed, *metric_values)])
        if packed.is_cuda:
            self.host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self.host.copy_(packed, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(torch.cuda.current_stream(packed.device))
        else:
            self.host, self.ready = packed, None

    def read(self) -> StepResult:
        """Waits for this step's copy (long done when the next step is already queued) and returns its values."""
        if self.ready is not None:
            self.ready.synchronize()
        values = self.host.tolist()
        loss, own, worst, stop_vote, *tensor_metrics = values
        step, epoch, batch = self.where
        metrics = {**self.host_metrics, **dict(zip(self.tensor_names, tensor_metrics, strict=True))}
        return StepResult(step, epoch, batch, loss, metrics, int(worst), int(own), bool(stop_vote))


def describe(result: StepResult) -> str:
    """The stop message's first part: what went wrong (on this rank, or on another one)."""
    if result.own_problem == OK:
        return f"{MESSAGES[result.problem]} on another rank"
    if result.own_problem == NON_FINITE_LOSS:
        return f"non-finite loss ({result.loss})"
    return MESSAGES[result.own_problem]
