"""The training loop shared by every recipe: data → method → AMP step → EMA → logs, checkpoints, kNN monitor.

Exact resume: a checkpoint holds the model, teacher, heads, bank (+ labels, pointer), loss-module counters, optimizer,
grad scaler, schedule position, RNG states and the data position (epoch, batch). The torchvision loader draws every
augmentation from (seed, epoch, sample index), so a resumed deterministic CPU run reproduces the uninterrupted run's
losses exactly. The DALI loader resumes at the same batch with the same images but draws its augmentations from DALI's
sequential stream, reseeded from (seed, epoch, rank, start step): after a mid-epoch resume they differ from the
uninterrupted run's (same distribution), so its losses do too.

No device read inside a step: each step's loss, metrics and bank checks come back one step late (step_readback.py),
and every step is read before anything is evaluated, saved or reported as finished.
"""

from __future__ import annotations

import pickle
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn

from fastssl.bank import MemoryBank
from fastssl.collectives import agree, comm_device
from fastssl.data import make_loader, resolve_views
from fastssl.data.presets import RECIPES, get_views
from fastssl.train.bank_shards import gather_bank_shards, restore_bank_shards
from fastssl.train.checkpoint import (
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from fastssl.train.config import ConfigError, TrainConfig
from fastssl.train.datasets import monitor_classes, monitor_splits, training_source
from fastssl.train.distributed import DistContext, setup_distributed, teardown_distributed
from fastssl.train.methods import Method, build_method
from fastssl.train.optim import build_optimizer, lr_at, momentum_at, scaled_lr
from fastssl.train.run_log import RunLog
from fastssl.train.step_readback import OK, StepReadback, StepResult, describe


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the message names the step and the last good checkpoint."""


def _views(config: TrainConfig):
    views = config.data.views
    if isinstance(views, str):
        return get_views(views) if views in RECIPES else resolve_views(views)
    flat = []
    for name in views:
        flat += get_views(name) if name in RECIPES else resolve_views(name)
    return flat


def _seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def _rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain Python values, so checkpoints load with ``torch.load(weights_only=True)``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Builds everything from a validated config; :meth:`fit` runs (or resumes) training and returns the metrics."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        run = config.run
        self.ctx: DistContext = setup_distributed(run.device)
        if run.threads:
            torch.set_num_threads(run.threads)
        _seed_everything(run.seed, run.deterministic)
        self.out_dir = Path(run.out_dir) / run.name
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self._build(config)
        # Only now, with everything built, does the run touch its directory.
        self._prepare_run_dir()
        self.log = RunLog(self.out_dir, tensorboard=run.tensorboard, enabled=self.ctx.is_main)

    def _build(self, config: TrainConfig) -> None:
        run = config.run
        views = _views(config)
        self.views = views
        # data.batch_size is the global batch (as in the official scripts), split evenly over the ranks.
        self.global_batch = config.data.batch_size
        if self.global_batch % self.ctx.world_size:
            raise ConfigError(
                f"data.batch_size: the global batch {self.global_batch} does not split evenly over "
                f"{self.ctx.world_size} ranks"
            )
        source = training_source(config.data, seed=run.seed)
        if self.global_batch > len(source):
            raise ConfigError(
                f"data.batch_size: the global batch {self.global_batch} exceeds the {len(source)} training images"
            )
        self.loader = make_loader(
            source,
            views,
            self.global_batch // self.ctx.world_size,
            backend=config.data.backend,
            seed=run.seed,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            device=self.ctx.device,
            channels_last=config.data.channels_last,
            num_workers=config.data.num_workers,
            verbose=self.ctx.is_main,
        )
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"data.batch_size: the global batch {self.global_batch} exceeds the {len(source)} training images"
            )
        self.total_steps = run.epochs * self.steps_per_epoch
        if run.max_steps is not None:
            self.total_steps = min(self.total_steps, run.max_steps)

        # Warm-ups given in epochs become steps now that the epoch length is known.
        config.optim.warmup_steps += round(config.optim.warmup_epochs * self.steps_per_epoch)
        config.method.warmup_steps += round(config.method.warmup_epochs * self.steps_per_epoch)
        config.optim.warmup_epochs = config.method.warmup_epochs = 0.0
        try:
            method = build_method(config)
        except ValueError as error:  # a setting only the built model can reject; its message names the key
            if not str(error).startswith(("model.", "method.")):
                raise
            raise ConfigError(str(error)) from error
        self.method: Method = method.to(self.ctx.device)
        # Banks check their keys' values a step late, with the loss (step_readback.py): no device read inside a step.
        # Set here (train_step alone runs deferred too) and restored when fit ends.
        self.banks = [module for module in self.method.modules() if isinstance(module, MemoryBank)]
        self._bank_modes = [(bank, bank.value_checks) for bank in self.banks]
        for bank in self.banks:
            bank.value_checks = "deferred"
        if hasattr(self.method, "set_total_steps"):
            self.method.set_total_steps(self.total_steps)
        if config.data.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        if config.model.sync_bn and self.ctx.world_size > 1:
            self.method = nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
        self.base_lr = scaled_lr(config.optim, self.global_batch)
        # fp16: a fused AdamW keeps the GradScaler's inf check on the device (no read per step)
        fused = config.run.amp == "fp16"
        self.optimizer = build_optimizer(self.method, config.optim, self.global_batch, fused=fused)
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=run.amp == "fp16")
        self.model: nn.Module = self.method
        if self.ctx.world_size > 1:
            # Banks are identical on every rank by construction (they all-gather) or deliberately different
            # (sharded), so buffers are not broadcast.
            self.model = nn.parallel.DistributedDataParallel(
                self.method,
                device_ids=[self.ctx.device.index] if self.ctx.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        if config.model.compile:
            # In place (nn.Module.compile): the parameter names stay those of the uncompiled backbone, so checkpoints
            # resume and evaluate with compilation on or off.
            self.method.backbone.compile()
        self.global_step = self.epoch = self.step_in_epoch = 0
        self._unsaved = True  # state changed since the last checkpoint (or there is none yet)
        self._budget_voted = False  # a rank's time budget ran out (distributed: read from the step readbacks)
        self.knn_history: list[dict[str, Any]] = []
        mean, std = views[0].mean, views[0].std
        self.monitor = monitor_splits(
            config.data,
            seed=run.seed,
            mean=mean,
            std=std,
            image_size=views[0].size,
            classes=monitor_classes(config.data, source),
        )

    def _prepare_run_dir(self) -> None:
        """A fresh run (no ``run.resume``) never mixes with an earlier run in its directory, whose newer checkpoints
        would outlive its own under ``keep_last`` and whose scalars would share its curves: it refuses, or with
        ``run.overwrite`` removes the earlier run's outputs (only the files a run writes)."""
        run = self.config.run
        earlier = [p.name for p in (self.out_dir / "scalars.csv", self.out_dir / "metrics.json") if p.exists()]
        earlier += [p.name for p in list_checkpoints(self.checkpoint_dir)]
        refuse = bool(earlier) and not run.resume and not run.overwrite
        if self.ctx.world_size > 1:  # every rank raises if any rank would (so none waits in a collective alone)
            refuse = not agree(not refuse, comm_device(torch.empty(0, device=self.ctx.device)))
        if refuse:
            shown = ", ".join(earlier[:3]) + (", …" if len(earlier) > 3 else "")
            raise ConfigError(
                f"run.name: {self.out_dir} holds an earlier run ({shown}); continue it with --resume auto, start "
                "over with run.overwrite=true, or choose another run.name or run.out_dir"
            )
        if earlier and not run.resume and run.overwrite and self.ctx.is_main:
            for name in ("scalars.csv", "metrics.json", "curves.png"):
                (self.out_dir / name).unlink(missing_ok=True)
            shutil.rmtree(self.out_dir / "tensorboard", ignore_errors=True)
            for path in list_checkpoints(self.checkpoint_dir):
                path.unlink()

    def _drop_newer_checkpoints(self, resumed: Path) -> None:
        """Resuming from an older checkpoint of this run abandons the newer ones, which ``keep_last`` would keep in
        place of the resumed run's own (and ``--resume auto`` would pick later): refuse, or with ``run.overwrite``
        delete them."""
        newer = [p for p in list_checkpoints(self.checkpoint_dir) if checkpoint_step(p) > self.global_step]
        refuse = bool(newer) and not self.config.run.overwrite
        if self.ctx.world_size > 1:
            refuse = not agree(not refuse, comm_device(torch.empty(0, device=self.ctx.device)))
        if refuse:
            raise ConfigError(
                f"run.resume: {resumed} is at step {self.global_step}, but {self.checkpoint_dir} holds newer "
                f"checkpoints ({', '.join(p.name for p in newer)}); run.overwrite=true deletes them and goes on from "
                "the older one"
            )
        if self.ctx.is_main:
            for path in newer:
                path.unlink()

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.method.state_dict(),
            "backbone": self.method.backbone.state_dict(),  # what `fastssl eval` loads
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "global_step": self.global_step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "rng": _rng_state(),
            "knn_history": self.knn_history,
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state["method"])
        restore_bank_shards(self.method, state.get("bank_shards"))  # rank 0's shard above -> this rank's own
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.global_step, self.epoch, self.step_in_epoch = state["global_step"], state["epoch"], state["step_in_epoch"]
        self.knn_history = state.get("knn_history", [])
        _set_rng_state(state["rng"])

    def save(self) -> Path | None:
        """Checkpoints the current state, unless nothing changed since the last checkpoint (an epoch end that is also
        a ``checkpoint_every`` step and the end of training writes once). Every rank must call it."""
        if not self._unsaved:  # the same decision on every rank: it depends on steps and evaluations only
            return None
        shards = gather_bank_shards(self.method)  # a collective: every rank takes part, rank 0 writes
        self._unsaved = False
        if not self.ctx.is_main:
            return None
        state = self.state_dict()
        if shards is not None:
            state["bank_shards"] = shards
        return save_checkpoint(state, self.checkpoint_dir, self.global_step, keep_last=self.config.run.keep_last)

    def maybe_resume(self) -> Path | None:
        resume = self.config.run.resume
        if not resume:
            return None
        path = latest_checkpoint(self.checkpoint_dir) if resume == "auto" else Path(resume)
        if path is None:  # nothing to resume yet: a fresh start (scalars of a run that never checkpointed go)
            self.log.rewind(-1)
            if self.ctx.is_main:
                print(f"fastssl train: no checkpoint in {self.checkpoint_dir} yet: starting from scratch")
            return None
        if not path.is_file():
            raise ConfigError(f"run.resume: checkpoint {str(path)!r} does not exist")
        try:
            state = load_checkpoint(path)
        except (pickle.UnpicklingError, EOFError, KeyError, RuntimeError, ValueError) as error:  # what torch.load
            # raises for a file that is not a checkpoint (a truncated or foreign file); OSErrors stay themselves
            raise ConfigError(f"run.resume: {str(path)!r} is not a fastssl checkpoint ({error!r})") from error
        try:
            self.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError) as error:
            if isinstance(error, torch.OutOfMemoryError):
                raise
            lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
            first = " ".join(lines[:2])[:300] if lines else type(error).__name__
            raise ConfigError(
                f"run.resume: {str(path)!r} does not fit this config (was the model or method changed?): {first}"
            ) from error
        saved_batch = state.get("config", {}).get("data", {}).get("batch_size")
        if saved_batch is not None and saved_batch != self.config.data.batch_size and self.ctx.is_main:
            print(
                f"fastssl train: warning: {path} was written with data.batch_size={saved_batch}, this run has "
                f"{self.config.data.batch_size} (the global batch since 2026-11-23; per rank before): the epoch "
                "length and the learning rate follow the new value"
            )
        self._unsaved = False
        self._drop_newer_checkpoints(path)
        # Scalars logged after this checkpoint (by the interrupted run) would be logged again: drop them.
        self.log.rewind(self.global_step)
        if self.ctx.is_main:
            print(f"fastssl train: resumed from {path} at step {self.global_step} (epoch {self.epoch})")
        return path

    # -- evaluation -----------------------------------------------------------------------------------------------
    def knn(self, tag: str) -> dict[str, float] | None:
        """kNN top-1 of each eval backbone (student, teacher) on the monitor splits; rank 0 gets the numbers."""
        if self.monitor is None or not self.config.run.knn_monitor:
            return None
        from fastssl.eval import extract_features, knn_accuracy

        train_data, test_data = self.monitor
        results: dict[str, float] = {}
        backbones = self.method.eval_backbones()
        if not self.config.run.knn_teacher:
            backbones = {"student": backbones["student"]}
        for name, backbone in backbones.items():
            common = dict(device=self.ctx.device, batch_size=512, progress=False)
            train = extract_features(backbone, train_data, desc=f"{name} train", **common)
            test = extract_features(backbone, test_data, desc=f"{name} test", **common)
            if train is not None and test is not None:
                accuracy = knn_accuracy(
                    train.features, train.labels, test.features, test.labels, k=self.config.run.knn_k
                )
                results[name] = accuracy.top1
        self._unsaved = True
        if not self.ctx.is_main:
            return None
        self.knn_history.append({"step": self.global_step, "tag": tag, **results})
        self.log.scalars(self.global_step, {f"knn/{k}": v for k, v in results.items()})
        return results

    # -- the loop -------------------------------------------------------------------------------------------------
    def _autocast(self):
        amp = self.config.run.amp
        if amp == "none":
            return nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)

    def train_step(self, batch: dict[str, Any], stop_vote: bool = False) -> StepReadback:
        """Queues one step (forward, backward, optimizer, EMA) without reading anything back from the device (except
        under fp16 AMP with SGD or LARS, whose GradScaler reads its inf check). Its loss and checks come back through
        the returned readback, which :meth:`finish` reads."""
        config, step = self.config, self.global_step
        lr = lr_at(step, self.total_steps, self.base_lr, config.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        m = momentum_at(step, self.total_steps, config.method)
        if self.method.ema_before_forward:
            self.method.momentum_update(m)
        views = [v.to(self.ctx.device, non_blocking=True) for v in batch["views"]]
        labels = batch["label"].to(self.ctx.device, non_blocking=True)
        self._unsaved = True
        with self._autocast():
            loss, metrics = self.model(views, labels, step)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if not self.method.ema_before_forward:
            self.method.momentum_update(m)
        checks = [bank.take_value_stats() for bank in self.banks]
        where = (step, self.epoch, self.step_in_epoch)
        return StepReadback(*where, loss, {"lr": lr, "momentum": m, **metrics}, checks, stop_vote=stop_vote)

    def finish(self, readback: StepReadback) -> StepResult:
        """Reads a queued step's values; a NaN/inf loss, non-finite teacher keys or an all-zero key row (on any rank)
        stops training naming that step. The trainer reads every step before it checkpoints, evaluates or stops, so
        no checkpoint holds an unchecked step."""
        result = readback.read()
        if result.problem != OK:
            self._stop_non_finite(describe(result), result)
        return result

    def _stop_non_finite(self, what: str, result: StepResult) -> NoReturn:
        last = latest_checkpoint(self.checkpoint_dir)
        raise NonFiniteLossError(
            f"{what} at step {result.step} (epoch {result.epoch}, batch {result.batch}); stopped without saving. "
            f"Last good checkpoint: {last if last else 'none'}"
        )

    def fit(self) -> dict[str, Any]:
        run = self.config.run
        self.maybe_resume()
        # Whether the checkpoint resumed from already holds an evaluation at its step (the same on every rank: all
        # ranks load rank 0's history).
        evaluated_here = any(entry["step"] == self.global_step for entry in self.knn_history)
        if self.global_step == 0:
            self.knn("random init")
        losses: list[float] = []
        progress = None
        if self.ctx.is_main:
            from tqdm.auto import tqdm

            progress = tqdm(
                total=self.total_steps,
                initial=self.global_step,
                desc=f"{run.name}",
                unit="step",
                dynamic_ncols=True,
                mininterval=1.0,
            )
        started = time.perf_counter()
        images_per_step = self.global_batch
        stop_reason = self._stop_reason(started)
        pending: StepReadback | None = None  # the last queued step, read once the next one is queued

        def read_pending() -> None:
            nonlocal pending
            if pending is not None:
                result = self.finish(pending)
                losses.append(result.loss)
                self._report(result, img_s, progress)
                self._budget_voted |= result.stop_vote
                pending = None

        img_s = 0.0
        try:
            while stop_reason is None and self.epoch < run.epochs:
                self.loader.resume(self.epoch, self.step_in_epoch)
                tick = time.perf_counter()
                for batch in self.loader:
                    queued = self.train_step(batch, stop_vote=self._time_up(started))
                    read_pending()  # the previous step: the GPU has finished it while this one was queued
                    pending = queued
                    self.global_step += 1
                    self.step_in_epoch += 1
                    if self.step_in_epoch == self.steps_per_epoch:
                        self.epoch, self.step_in_epoch = self.epoch + 1, 0
                    now = time.perf_counter()
                    img_s, tick = images_per_step / max(now - tick, 1e-9), now
                    stop_reason = self._stop_reason(started)
                    knn_due = bool(run.knn_every) and self.global_step % run.knn_every == 0
                    save_due = bool(run.checkpoint_every) and self.global_step % run.checkpoint_every == 0
                    if stop_reason is not None or knn_due or save_due or self.step_in_epoch == 0:
                        read_pending()  # nothing is evaluated or saved before its step is checked
                    if stop_reason is not None:
                        break  # the final evaluation and checkpoint follow the loop
                    # evaluate before checkpointing, so a checkpoint holds every evaluation logged up to its step
                    if knn_due:
                        self.knn(f"step {self.global_step}")
                    if save_due:
                        self.save()
                read_pending()  # a loader that ended early
                if stop_reason is None and self.step_in_epoch == 0:
                    self.save()  # epoch end
        except Exception as error:
            # What surfaced in a later step (a loader error, a CUDA error) may follow a bad step not read yet: name
            # that step, the likely cause, chained to the error.
            unread, pending = (pending, None) if not isinstance(error, NonFiniteLossError) else (None, None)
            if unread is not None:
                try:
                    self.finish(unread)
                except NonFiniteLossError as bad:
                    raise bad from error
                except Exception:  # noqa: BLE001 - the original error is the one to show
                    pass
            raise
        finally:
            if progress is not None:
                progress.close()
            for bank, mode in self._bank_modes:  # library use of the method after training checks immediately again
                bank.value_checks = mode
        elapsed = time.perf_counter() - started
        stop_reason = stop_reason or "finished"
        if losses or not evaluated_here:  # a resumed run that had nothing left to do was evaluated before it stopped
            self.knn("trained")
        self.save()
        result = self.summary(losses, elapsed, stop_reason)
        self.log.close()
        return result

    def _time_up(self, started: float) -> bool:
        budget = self.config.run.time_budget_s
        return budget is not None and time.perf_counter() - started >= budget

    def _stop_reason(self, started: float) -> str | None:
        """Why training stops now, or None to go on. Every rank must decide alike (a rank that stops alone leaves the
        others waiting in a collective): steps are the same everywhere, but clocks are not, so under torch.distributed
        the time budget is a vote carried by the step readbacks (any rank's vote stops all of them at the same step)."""
        run = self.config.run
        if self.global_step >= self.total_steps:
            return "finished"
        if run.stop_at_step is not None and self.global_step >= run.stop_at_step:
            return f"stopped at step {run.stop_at_step} (run.stop_at_step)"
        if self._budget_voted if self.ctx.world_size > 1 else self._time_up(started):
            if run.time_budget_s is None:  # only another rank's config set one
                return "time budget of another rank reached"
            return f"time budget of {run.time_budget_s:g} s reached"
        return None

    def _report(self, result: StepResult, img_s: float, progress) -> None:
        """Scalars every ``log_every`` steps (and the first), and the progress bar every step (rank 0)."""
        if not self.ctx.is_main:
            return
        done, loss, metrics = result.step + 1, result.loss, result.metrics
        if done % self.config.run.log_every == 0 or done == 1:
            scalars = {"train/loss": loss, "train/img_per_s": img_s, **{f"train/{k}": v for k, v in metrics.items()}}
            self.log.scalars(done, scalars)
        if progress is not None:
            shown = {"loss": f"{loss:.4f}", "lr": f"{metrics['lr']:.3g}", "img/s": f"{img_s:.0f}"}
            if "purity" in metrics:
                shown["purity"] = f"{metrics['purity']:.3f}"
            progress.set_postfix(shown, refresh=False)
            progress.update(1)

    def summary(self, losses: list[float], elapsed: float, stop_reason: str) -> dict[str, Any]:
        """The run's result (returned to the caller; on rank 0 also written as metrics.json with the curves PNG)."""
        result = {
            "name": self.config.run.name,
            "method": self.config.method.name,
            "steps": self.global_step,
            "epochs_completed": self.epoch,
            "train_seconds": elapsed,
            "stop_reason": stop_reason,
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "losses": losses,
            "knn_history": self.knn_history,
            "out_dir": str(self.out_dir),
        }
        if not self.ctx.is_main:
            return result
        self.log.write_json("metrics.json", {k: v for k, v in result.items() if k != "losses"})
        if self.config.run.plot:
            self.log.plot(self.out_dir / "curves.png", title=f"{self.config.run.name} ({self.config.method.name})")
        return result


def train(config: TrainConfig) -> dict[str, Any]:
    """Runs one training job (one process of it under torchrun) and returns its metrics."""
    try:
        return Trainer(config).fit()
    finally:
        teardown_distributed()
