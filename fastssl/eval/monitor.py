"""Training-time monitors: teacher-vs-student kNN accuracy (ISD Fig. 4) and running MSF purity (MSF Fig. 4).

ISD (Tejankar et al. 2021, arXiv:2104.08894) evaluates both the momentum teacher and the student with a nearest
neighbour classifier every 10 epochs and finds the teacher ahead while the learning rate is large.
:class:`TeacherStudentMonitor` does that on a small labelled bank/query pair and keeps the history, which it can plot.

MSF (Koohpayegani et al. 2021, arXiv:2105.07269) tracks the purity of the k bank neighbours of each target, which is
free when the bank stores labels; :class:`PurityMeter` averages :func:`fastssl.functional.mean_shift_purity` over the
batches of an epoch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastssl.eval.features import extract_features
from fastssl.eval.knn import knn_accuracy


class TeacherStudentMonitor:
    """kNN accuracy of the teacher and the student on a fixed labelled split, every ``every`` epochs.

    Args:
        train_data: labelled data whose features form the kNN bank (map-style dataset or iterable of
            (images, labels) batches, as :func:`~fastssl.eval.extract_features` takes).
        test_data: labelled queries.
        k: neighbours.
        weighted: exp(s/T)-weighted vote (True) or majority vote.
        temperature: T of the weighted vote.
        every: evaluate when ``epoch % every == 0`` (and whenever :meth:`evaluate` is called directly).
        backend: kNN backend.
        batch_size, num_workers, amp: feature extraction settings.

    Under ``torch.distributed`` every rank must call :meth:`evaluate` (extraction is sharded); rank 0 gets the
    record, the others None.
    """

    def __init__(
        self,
        train_data: Iterable | torch.utils.data.Dataset,
        test_data: Iterable | torch.utils.data.Dataset,
        *,
        k: int = 20,
        weighted: bool = True,
        temperature: float = 0.07,
        every: int = 10,
        backend: str = "auto",
        batch_size: int = 256,
        num_workers: int = 0,
        amp: bool = True,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.train_data, self.test_data = train_data, test_data
        self.k, self.weighted, self.temperature, self.every, self.backend = k, weighted, temperature, every, backend
        self.extract_kwargs = {"batch_size": batch_size, "num_workers": num_workers, "amp": amp, "progress": False}
        self.history: list[dict[str, float]] = []

    def should_run(self, epoch: int) -> bool:
        return epoch % self.every == 0

    def _accuracy(self, model: nn.Module) -> tuple[float, float] | None:
        train = extract_features(model, self.train_data, **self.extract_kwargs)
        test = extract_features(model, self.test_data, **self.extract_kwargs)
        if train is None or test is None:
            return None
        acc = knn_accuracy(
            train.features,
            train.labels,
            test.features,
            test.labels,
            k=min(self.k, len(train.labels)),
            weighted=self.weighted,
            temperature=self.temperature,
            backend=self.backend,
        )
        return acc.top1, acc.top5

    def evaluate(self, epoch: int, *, teacher: nn.Module, student: nn.Module) -> dict[str, float] | None:
        """Extract features with both backbones, run kNN, append and return the record.

        Returns:
            ``{"epoch", "teacher_top1", "teacher_top5", "student_top1", "student_top5"}`` on rank 0, else None.
        """
        teacher_acc = self._accuracy(teacher)
        student_acc = self._accuracy(student)
        if teacher_acc is None or student_acc is None:
            return None
        record = {
            "epoch": epoch,
            "teacher_top1": teacher_acc[0],
            "teacher_top5": teacher_acc[1],
            "student_top1": student_acc[0],
            "student_top5": student_acc[1],
        }
        self.history.append(record)
        return record

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])

    def plot(self, path: str | os.PathLike) -> Path:
        """Teacher and student top-1 kNN accuracy against epoch (ISD Fig. 4), saved as PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [h["epoch"] for h in self.history]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(epochs, [100 * h["teacher_top1"] for h in self.history], "o-", label="teacher")
        ax.plot(epochs, [100 * h["student_top1"] for h in self.history], "s--", label="student")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{self.k}-NN top-1 accuracy (%)")
        ax.set_title("Teacher vs student (kNN)")
        ax.grid(alpha=0.3)
        ax.legend()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return path


class PurityMeter:
    """Running MSF purity over an epoch: the mean, over all target rows seen since :meth:`reset`, of the fraction
    of each target's k bank neighbours (itself included) that share its label."""

    def __init__(self, k: int = 5, backend: str = "auto") -> None:
        self.k, self.backend = k, backend
        self.reset()

    def reset(self) -> None:
        self._total = 0.0
        self._rows = 0

    @torch.no_grad()
    def update(
        self, target: torch.Tensor, labels: torch.Tensor, bank: Any, bank_labels: torch.Tensor | None = None
    ) -> float:
        """Add one batch (after it was enqueued into the bank); returns the batch's purity.

        Args:
            target: (N, D) target embeddings.
            labels: (N,) int64 labels of the batch.
            bank: (K, D) tensor or :class:`fastssl.MemoryBank` built with ``store_labels=True``.
            bank_labels: (K,) labels when ``bank`` is a tensor.
        """
        from fastssl.functional import mean_shift_purity

        purity = float(mean_shift_purity(target, labels, bank, self.k, bank_labels=bank_labels, backend=self.backend))
        self._total += purity * target.shape[0]
        self._rows += target.shape[0]
        return purity

    def compute(self) -> float:
        """Mean purity since the last reset (NaN before any update)."""
        return self._total / self._rows if self._rows else float("nan")
