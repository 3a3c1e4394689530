"""Teacher-vs-student kNN monitor (ISD Fig. 4), running MSF purity, and the t-SNE picture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fastssl.eval import PurityMeter, TeacherStudentMonitor, extract_features, knn_accuracy, plot_embedding

PNG = b"\x89PNG\r\n\x1a\n"


def _blobs(n, classes=4, dim=16, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    y = torch.arange(n) % classes
    return torch.utils.data.TensorDataset(centers[y] + noise * torch.randn(n, dim, generator=g), y)


def test_monitor_records_teacher_and_student_knn(tmp_path):
    train, test = _blobs(200, seed=0), _blobs(80, seed=1)
    teacher = nn.Identity()
    torch.manual_seed(0)
    student = nn.Linear(16, 1, bias=False)  # a 1-D projection: much worse neighbours
    student.train()
    monitor = TeacherStudentMonitor(train, test, k=10, every=5, backend="torch", batch_size=64)
    assert [e for e in range(12) if monitor.should_run(e)] == [0, 5, 10]
    for epoch in (0, 5):
        record = monitor.evaluate(epoch, teacher=teacher, student=student)
        assert record["epoch"] == epoch
    assert student.training  # restored after extraction
    for name, model in (("teacher", teacher), ("student", student)):
        f_tr = extract_features(model, train, progress=False)
        f_te = extract_features(model, test, progress=False)
        acc = knn_accuracy(f_tr.features, f_tr.labels, f_te.features, f_te.labels, k=10, backend="torch")
        assert record[f"{name}_top1"] == acc.top1 and record[f"{name}_top5"] == acc.top5
    assert record["teacher_top1"] == 1.0 and record["student_top1"] < 0.9
    assert len(monitor.history) == 2
    restored = TeacherStudentMonitor(train, test)
    restored.load_state_dict(monitor.state_dict())
    assert restored.history == monitor.history
    assert monitor.plot(tmp_path / "fig4.png").read_bytes()[:8] == PNG


def _purity_direct(target, labels, bank, bank_labels, k):
    t = target.double() / target.double().norm(dim=1, keepdim=True)
    b = bank.double() / bank.double().norm(dim=1, keepdim=True)
    idx = torch.sort(t @ b.T, dim=1, descending=True, stable=True).indices[:, :k]
    return (bank_labels[idx] == labels[:, None]).double().mean(1)


def test_purity_meter_is_the_row_weighted_mean_of_direct_purity():
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(300, 8, generator=g), dim=1)  # a MemoryBank stores unit rows
    bank_labels = torch.randint(0, 3, (300,), generator=g)
    meter = PurityMeter(k=5, backend="streaming")
    assert np.isnan(meter.compute())
    per_row = []
    for rows in (slice(0, 40), slice(40, 50)):  # batches of 40 and 10 targets that are in the bank
        target, labels = bank[rows], bank_labels[rows]
        direct = _purity_direct(target, labels, bank, bank_labels, 5)
        assert meter.update(target, labels, bank, bank_labels) == pytest.approx(direct.mean().item(), abs=1e-6)
        per_row.append(direct)
    assert meter.compute() == pytest.approx(torch.cat(per_row).mean().item(), abs=1e-6)
    meter.reset()
    assert np.isnan(meter.compute())


def test_tsne_plot_separates_blobs(tmp_path):
    data = _blobs(120, classes=6, noise=0.2)
    x, y = data.tensors
    res = plot_embedding(x, y, tmp_path / "deep" / "tsne.png", num_classes=3, per_class=15, seed=1, perplexity=5)
    assert res.path.read_bytes()[:8] == PNG
    assert len(res.classes) == 3 and set(np.unique(res.labels)) == set(res.classes)
    assert res.coords.shape == (45, 2)
    # Well-separated blobs stay separated in 2-D: every point's nearest other point has its class.
    d = np.linalg.norm(res.coords[:, None] - res.coords[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert np.all(res.labels[d.argmin(1)] == res.labels)
    with pytest.raises(ValueError, match="do not match"):
        plot_embedding(x, y[:-1], tmp_path / "bad.png")
