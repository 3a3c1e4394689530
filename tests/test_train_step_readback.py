"""The training step reads nothing back from the device; its loss and checks are read one step later, exactly."""

from __future__ import annotations

import pytest
import torch
from device_reads import DeviceReads

from fastssl.train.config import load_config
from fastssl.train.trainer import NonFiniteLossError, Trainer

METHODS = ["mocov2", "isd", "msf", "ressl", "byol", "nnclr", "sdssl"]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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
        with DeviceReads(host) as reads:
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
