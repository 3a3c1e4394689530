"""The training step reads nothing back from the device; its loss and checks are read one step later, exactly."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from device_reads import DeviceReads

from fastssl.train.config import load_config
from fastssl.train.trainer import NonFiniteLossError, Trainer

METHODS = ["mocov2", "isd", "msf", "ressl", "byol", "nnclr", "sdssl"]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@contextmanager
def cuda_sync_debug(mode: str):
    """torch.cuda.set_sync_debug_mode for the block (a no-op at "default")."""
    if mode == "default":
        yield
        return
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", METHODS)
def test_train_step_reads_nothing_and_its_readback_is_the_step_loss(name, device, tmp_path):
    """Every method's step (forward, enqueue, backward, optimizer, EMA) makes no device read: no item/float/int/bool
    and no tolist. The readback then returns that step's loss and tensor metrics bit for bit (oracle: the tensors the
    method returned, read directly). On a GPU this also runs the pinned-memory copy and its event."""
    trainer = Trainer(load_config(f"tiny_{name}", [f"run.out_dir={tmp_path}", f"run.device={device}"]))
    returned = []
    real_loss = trainer.method.loss

    def spy(views, labels, step):
        loss, metrics = real_loss(views, labels, step)
        returned.append((loss.detach().clone(), {k: v for k, v in metrics.items()}))
        return loss, metrics

    trainer.method.loss = spy
    batches = iter(trainer.loader)
    readbacks = []
    for _ in range(3):
        batch = next(batches)  # the loader's own seed draw is a CPU read, outside the step
        # After the first step: the optimizer has its state, whose `step` counters are host tensors by design.
        host = tuple(state["step"] for state in trainer.optimizer.state.values() if "step" in state)
        # On a GPU, CUDA's sync debug mode also catches implicit synchronizations the counters cannot see
        # (nonzero, a pageable copy, a blocking allocator call).
        sync_debug = "error" if device == "cuda" and readbacks else "default"
        with DeviceReads(host) as reads, cuda_sync_debug(sync_debug):
            readbacks.append(trainer.train_step(batch))
        trainer.global_step += 1
        trainer.step_in_epoch += 1
        if len(readbacks) > 1:
            assert (reads.scalars, reads.tolist) == (0, 0)
    for index, (readback, (loss, metrics)) in enumerate(zip(readbacks, returned, strict=True)):
        result = trainer.finish(readback)
        assert (result.step, result.batch) == (index, index)
        assert result.loss == float(loss)
        for key, value in metrics.items():
            assert result.metrics[key] == float(value), key
        assert "lr" in result.metrics and "momentum" in result.metrics
    if name == "msf":
        assert "purity" in returned[0][1] and isinstance(returned[0][1]["purity"], torch.Tensor)


def test_all_zero_teacher_keys_stop_with_the_step_named(tmp_path):
    """A collapsed teacher whose keys are all zero has a finite loss (F.normalize maps 0 to 0) but no direction to
    store: the bank's deferred check stops the run at that step, keeping the checkpoint before it."""
    trainer = Trainer(load_config("tiny_isd", [f"run.out_dir={tmp_path}", "run.checkpoint_every=1"]))
    real_teacher = trainer.method.teacher

    def collapsed(x):
        out = real_teacher(x)
        return out * 0 if trainer.global_step == 3 else out

    trainer.method.teacher = collapsed
    with pytest.raises(NonFiniteLossError, match=r"all-zero teacher key row .* at step 3 .*step_000000003.pt"):
        trainer.fit()


def test_a_bad_step_is_read_before_the_next_checkpoint(tmp_path):
    """With checkpoints every 2 steps, a NaN loss at step index 1 is found when step 2 is checkpointed, before the
    write: the last checkpoint stays the one before it (none here), and the steps read so far are logged."""
    trainer = Trainer(load_config("tiny_mocov2", [f"run.out_dir={tmp_path}", "run.checkpoint_every=2"]))
    real_loss = trainer.method.loss

    def poisoned(views, labels, step):
        loss, metrics = real_loss(views, labels, step)
        return (loss * float("nan") if step == 1 else loss), metrics

    trainer.method.loss = poisoned
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 1 .*Last good checkpoint: none"):
        trainer.fit()
    assert not list((tmp_path / "tiny_mocov2" / "checkpoints").glob("*.pt"))


def test_an_error_after_an_unread_bad_step_names_that_step(tmp_path):
    """A NaN loss at step 2, then an exception in step 3 before step 2 was read: the run reports the NaN step (the
    likely cause), chained to the exception, and hands the banks back in their immediate mode."""
    trainer = Trainer(load_config("tiny_isd", [f"run.out_dir={tmp_path}", "run.checkpoint_every=100"]))
    real_loss = trainer.method.loss

    def failing(views, labels, step):
        if step == 3:
            raise RuntimeError("loader or device error in step 3")
        loss, metrics = real_loss(views, labels, step)
        return (loss * float("nan") if step == 2 else loss), metrics

    trainer.method.loss = failing
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 2 ") as info:
        trainer.fit()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert trainer.banks and all(bank.value_checks == "immediate" for bank in trainer.banks)


def test_readback_keeps_fp64_values_and_classifies_them_in_their_own_dtype():
    """fp64 keys of magnitude 1e-50 or 1e39 are fine (the immediate check accepts them), and an fp64 loss of 1e300
    comes back exactly: nothing is rounded through fp32 before it is classified or read."""
    from fastssl.bank import value_problem
    from fastssl.train.step_readback import OK, StepReadback

    stats = torch.tensor([1e-50, 1e39], dtype=torch.float64)
    assert value_problem(*stats.tolist()) is None
    loss = torch.tensor(1e300, dtype=torch.float64)
    result = StepReadback(0, 0, 0, loss, {"purity": torch.tensor(0.1, dtype=torch.float64)}, [stats, None]).read()
    assert (result.problem, result.loss, result.metrics["purity"]) == (OK, 1e300, 0.1)


def test_loading_a_state_dict_drops_pending_deferred_checks():
    from fastssl import MemoryBank

    bank = MemoryBank(8, 3, dtype=torch.float32, value_checks="deferred")
    good = MemoryBank(8, 3, dtype=torch.float32).state_dict()
    bank.enqueue(torch.full((2, 3), float("nan")))
    bank.load_state_dict(good)
    bank.enqueue(torch.ones(1, 3))
    assert bank.take_value_stats().tolist() == [1.0, 1.0]
