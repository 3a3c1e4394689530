"""kNN evaluation: exact neighbours, identical predictions across backends, vote rules against direct formulas."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fastssl.eval import KNNAccuracy, knn_accuracy, knn_classify, nearest_neighbors, rank_classes
from fastssl.eval.neighbors import _faiss

CPU_BACKENDS = ["torch"] + (["faiss-cpu"] if _faiss() is not None else [])
REPO = Path(__file__).resolve().parents[1]


def _random(n_train=3000, n_test=200, dim=48, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(n_train, dim, generator=g).to(dtype)
    test = torch.randn(n_test, dim, generator=g).to(dtype)
    labels = torch.randint(0, 10, (n_train,), generator=g)
    return train, labels, test


def _clustered(n_train=3000, n_test=200, dim=48, classes=8, dtype=torch.float16, seed=1):
    """Tight clusters plus exact duplicates: many near-ties, the hard case for cross-backend agreement."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g)
    labels = torch.randint(0, classes, (n_train,), generator=g)
    train = centers[labels] + 0.02 * torch.randn(n_train, dim, generator=g)
    train[500:600] = train[499]  # 101 identical rows
    labels[500:600] = labels[499]
    test_labels = torch.randint(0, classes, (n_test,), generator=g)
    test = centers[test_labels] + 0.02 * torch.randn(n_test, dim, generator=g)
    test[:4] = train[499]
    return train.to(dtype), labels, test.to(dtype), test_labels


def _oracle_topk(train: torch.Tensor, test: torch.Tensor, k: int) -> torch.Tensor:
    """fp64 materialized cosine similarities, stable descending sort (ties -> lower index)."""
    a = train.double() / train.double().norm(dim=1, keepdim=True)
    b = test.double() / test.double().norm(dim=1, keepdim=True)
    return torch.sort(b @ a.T, dim=1, descending=True, stable=True).indices[:, :k]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("data", ["random", "clustered"])
def test_backends_agree_exactly_and_match_oracle(dtype, data):
    if data == "random":
        train, labels, test = _random(dtype=dtype)
    else:
        train, labels, test, _ = _clustered(dtype=dtype)
    k = 20
    results = {b: nearest_neighbors(train, test, k, backend=b, chunk_size=700) for b in CPU_BACKENDS}
    oracle = _oracle_topk(train, test, k)
    for name, res in results.items():
        assert res.backend == name
        # Near-ties in random fp16 data may order differently in the oracle's GEMM only when two similarities are
        # within fp64 rounding; none occur with these seeds, so demand exact index equality.
        assert torch.equal(res.indices, oracle), name
        assert torch.all(res.similarities[:, :-1] >= res.similarities[:, 1:])
    first = results[CPU_BACKENDS[0]]
    for res in results.values():
        assert torch.equal(res.similarities, first.similarities)
    for weighted in (True, False):
        preds = [
            knn_classify(train, labels, test, k=k, weighted=weighted, backend=b, chunk_size=700, seed=3)
            for b in CPU_BACKENDS
        ]
        for p in preds[1:]:
            assert torch.equal(p, preds[0])


def test_duplicates_beyond_candidate_pool_resolve_to_lowest_indices():
    # 101 identical train rows and a query equal to them: every backend proposes an arbitrary 48 of the tied rows,
    # certification fails, and the exhaustive canonical pass must return the 20 lowest indices.
    train, _, test, _ = _clustered()
    for backend in CPU_BACKENDS:
        res = nearest_neighbors(train, test[:4], 20, backend=backend)
        assert torch.equal(res.indices, torch.arange(499, 519).expand(4, -1)), backend
        assert torch.all(res.similarities == res.similarities[:, :1])


def _weighted_vote_direct(sims: np.ndarray, neighbor_labels: np.ndarray, num_classes: int, T: float) -> np.ndarray:
    preds = []
    for s_row, y_row in zip(sims, neighbor_labels, strict=True):
        score = [sum(np.exp(s / T) for s, y in zip(s_row, y_row, strict=True) if y == c) for c in range(num_classes)]
        preds.append(int(np.argmax(score)))  # argmax: first (lowest) class among equal scores
    return np.array(preds)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_weighted_vote_equals_direct_formula(temperature):
    train, labels, test = _random(n_train=800, n_test=150, dim=16, dtype=torch.float32, seed=5)
    k = 15
    pred = knn_classify(train, labels, test, k=k, temperature=temperature, backend="torch")
    idx = _oracle_topk(train, test, k)
    a = train.double() / train.double().norm(dim=1, keepdim=True)
    b = test.double() / test.double().norm(dim=1, keepdim=True)
    sims = torch.gather(b @ a.T, 1, idx).numpy()
    expected = _weighted_vote_direct(sims, labels[idx].numpy(), 10, temperature)
    np.testing.assert_array_equal(pred.numpy(), expected)


def test_weighted_vote_small_temperature_does_not_overflow():
    train, labels, test = _random(n_train=400, n_test=50, dim=8, dtype=torch.float32, seed=2)
    pred = knn_classify(train, labels, test, k=10, temperature=1e-4, backend="torch")
    # T → 0 makes the vote the label of the single nearest neighbour.
    nearest = labels[_oracle_topk(train, test, 1)[:, 0]]
    assert torch.equal(pred, nearest)


def test_majority_vote_counts_and_seeded_tie_breaking():
    # Two train points per query direction with different labels: k=2 always ties between the two labels.
    g = torch.Generator().manual_seed(0)
    base = torch.randn(500, 32, generator=g)
    train = torch.cat([base, base + 1e-3 * torch.randn(500, 32, generator=g)])
    labels = torch.cat([torch.zeros(500, dtype=torch.long), torch.ones(500, dtype=torch.long)])
    test = base + 1e-4 * torch.randn(500, 32, generator=g)
    a = knn_classify(train, labels, test, k=2, weighted=False, seed=7, backend="torch")
    b = knn_classify(train, labels, test, k=2, weighted=False, seed=7, backend="torch")
    c = knn_classify(train, labels, test, k=2, weighted=False, seed=8, backend="torch")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Fair coin among the tied classes: 500 draws, mean within 5 standard deviations of 1/2.
    assert abs(a.double().mean().item() - 0.5) < 5 * 0.5 / np.sqrt(500)
    # k=3 has no ties with two classes: the prediction is the plain mode, whatever the seed.
    train3 = torch.cat([train, base + 2e-3 * torch.randn(500, 32, generator=g)])
    labels3 = torch.cat([labels, torch.ones(500, dtype=torch.long)])
    for seed in (0, 1):
        pred = knn_classify(train3, labels3, test, k=3, weighted=False, seed=seed, backend="torch")
        idx = _oracle_topk(train3, test, 3)
        mode = torch.mode(labels3[idx], dim=1).values
        assert torch.equal(pred, mode)


def test_knn_accuracy_top1_top5_against_direct_count():
    train, labels, test, test_labels = _clustered(n_train=1500, n_test=300, classes=8, dtype=torch.float32, seed=4)
    labels_noisy = labels.clone()
    labels_noisy[::3] = (labels_noisy[::3] + 1) % 8
    acc = knn_accuracy(train, labels_noisy, test, test_labels, k=20, backend="torch")
    assert isinstance(acc, KNNAccuracy)
    idx = _oracle_topk(train, test, 20)
    a = train.double() / train.double().norm(dim=1, keepdim=True)
    b = test.double() / test.double().norm(dim=1, keepdim=True)
    sims = torch.gather(b @ a.T, 1, idx)
    weights = torch.exp(sims / 0.07)
    scores = torch.zeros(300, 8, dtype=torch.float64).scatter_add_(1, labels_noisy[idx], weights)
    top5 = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :5]
    voted = scores.gather(1, top5) > 0  # a class nobody voted for is no guess
    assert acc.top1 == pytest.approx((top5[:, 0] == test_labels).double().mean().item(), abs=0)
    assert acc.top5 == pytest.approx(((top5 == test_labels[:, None]) & voted).any(1).double().mean().item(), abs=0)
    assert acc.num_test == 300 and acc.k == 20 and acc.backend == "torch"


@pytest.mark.parametrize("weighted", [True, False])
def test_top5_credits_only_classes_that_got_a_vote(weighted):
    """With k = 1 each query votes for one class, so top-5 equals top-1: unvoted classes (score 0) used to fill the
    other four slots, by class id (weighted) or at random (majority), crediting e.g. every class-0 query."""
    train, labels, test, test_labels = _clustered(n_train=600, n_test=200, classes=10, dtype=torch.float32, seed=6)
    acc = knn_accuracy(train, labels, test, torch.zeros_like(test_labels), k=1, weighted=weighted, backend="torch")
    assert acc.top5 == acc.top1
    ranked = rank_classes(torch.ones(2, 3), torch.tensor([[4, 4, 2], [1, 1, 1]]), 10, weighted=weighted)
    assert ranked.tolist() == [[4, 2, -1, -1, -1], [1, -1, -1, -1, -1]]


def test_numpy_inputs_and_auto_logs_backend(caplog):
    train, labels, test = _random(n_train=500, n_test=40, dim=16, dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="fastssl.eval.neighbors"):
        pred_np = knn_classify(train.numpy(), labels.numpy(), test.numpy(), k=5)
    assert "kNN backend: auto -> " in caplog.text
    assert torch.equal(pred_np, knn_classify(train, labels, test, k=5, backend="torch"))


def test_bad_inputs_give_clear_errors():
    train, labels, test = _random(n_train=100, n_test=10, dim=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="train_labels has 99 entries but train_features has 100 rows"):
        knn_classify(train, labels[:99], test)
    with pytest.raises(ValueError, match="k=101 is larger than the number of train features"):
        knn_classify(train, labels, test, k=101)
    bad = test.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="test_features contains NaN or inf \\(first at row 3\\)"):
        knn_classify(train, labels, bad)
    with pytest.raises(TypeError, match="must share a dtype"):
        knn_classify(train, labels, test.half())
    with pytest.raises(ValueError, match="feature dimensions differ"):
        knn_classify(train, labels, test[:, :4])
    zero = train.clone()
    zero[7] = 0
    with pytest.raises(ValueError, match="row 7 is all zeros"):
        knn_classify(zero, labels, test)
    with pytest.raises(TypeError, match="integer tensor"):
        knn_classify(train, labels.float(), test)
    with pytest.raises(ValueError, match="negative labels"):
        knn_classify(train, labels - 1, test)
    with pytest.raises(TypeError, match="floating-point"):
        knn_classify(train.long(), labels, test.long())
    with pytest.raises(ValueError, match="backend must be one of"):
        knn_classify(train, labels, test, backend="annoy")
    with pytest.raises(ValueError, match="temperature must be positive"):
        knn_classify(train, labels, test, temperature=0.0)
    with pytest.raises(ValueError, match="test_labels has 9 entries"):
        knn_accuracy(train, labels, test, labels[:9])


_TRITON_SCRIPT = textwrap.dedent(
    """
    import torch
    from fastssl.eval import knn_classify, nearest_neighbors
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g)
    y = torch.randint(0, 4, (96,), generator=g)
    train = (centers[y] + 0.05 * torch.randn(96, 16, generator=g)).half()
    train[10:40] = train[9]
    y[10:40] = y[9]
    test = (centers[torch.randint(0, 4, (12,), generator=g)] + 0.05 * torch.randn(12, 16, generator=g)).half()
    test[0] = train[9]
    a = nearest_neighbors(train, test, 5, backend="triton")
    b = nearest_neighbors(train, test, 5, backend="torch")
    assert a.backend == "triton"
    assert torch.equal(a.indices, b.indices) and torch.equal(a.similarities, b.similarities)
    for weighted in (True, False):
        pa = knn_classify(train, y, test, k=5, weighted=weighted, backend="triton")
        pb = knn_classify(train, y, test, k=5, weighted=weighted, backend="torch")
        assert torch.equal(pa, pb)
    print("OK")
    """
)


@pytest.mark.skipif(not (REPO / "kernels" / "bank_topk.py").exists(), reason="Triton top-k kernel not written yet")
def test_triton_backend_agrees_under_interpreter():
    # The interpreter flag must be set before the kernels import, hence a fresh process.
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")


def test_collapsed_features_beyond_the_exhaustive_budget_warn(monkeypatch, caplog):
    import fastssl.eval.neighbors as nb

    train, _, test = _random(n_train=1200, n_test=3, dim=16, dtype=torch.float16)
    train[100:1100] = train[0]  # a collapsed majority: 1001 identical rows, more than the last candidate pool (768)
    test[:] = train[0]
    exact = nearest_neighbors(train, test, 20, backend="torch")  # within budget: exhaustive, lowest indices
    assert torch.equal(exact.indices[0], torch.tensor([0, *range(100, 119)]))
    monkeypatch.setattr(nb, "_EXHAUSTIVE_BUDGET", 0)
    with caplog.at_level(logging.WARNING, logger="fastssl.eval.neighbors"):
        res = nearest_neighbors(train, test, 20, backend="torch")
    assert "near-tied neighbours" in caplog.text
    # Still 20 distinct rows of the tied group, with their (equal) canonical similarity.
    tied = {0, *range(100, 1100)}
    assert all(len(set(row.tolist())) == 20 and set(row.tolist()) <= tied for row in res.indices)
    assert torch.equal(res.similarities, exact.similarities)


def test_certification_survives_a_backend_with_perturbed_scores(monkeypatch):
    # A proposer whose scores carry noise up to its declared ε must still yield the exact canonical top-k.
    import fastssl.eval.neighbors as nb

    def noisy(train, test, k, chunk_size):
        v, i, eps = nb._propose_torch(train, test, k, chunk_size)
        g = torch.Generator().manual_seed(0)
        return v + (torch.rand(v.shape, generator=g) - 0.5) * 1e-3, i, eps + 1e-3

    monkeypatch.setitem(nb._PROPOSERS, "torch", noisy)
    train, _, test = _random(n_train=2000, n_test=100, dim=24, dtype=torch.float32, seed=9)
    assert torch.equal(nearest_neighbors(train, test, 10, backend="torch").indices, _oracle_topk(train, test, 10))
