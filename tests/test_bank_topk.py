"""Exact top-k against the bank: indices equal the stable-sort oracle, ties go to the lower index."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from backends import TOPK_BACKENDS
from conftest import DEVICE

import fastssl.ops.bank_topk as topk_module
from fastssl import MemoryBank
from fastssl.functional import bank_topk


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(topk_module, "DEFAULT_CHUNK", 9)


def oracle(query, bank, k):
    """fp64 similarities, ranked by (value desc, index asc) with Python's sort — independent of torch.sort."""
    sims = (F.normalize(query.double().cpu(), dim=1) @ bank.double().cpu().T).tolist()
    values, indices = [], []
    for row in sims:
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
        indices.append(order)
        values.append([row[j] for j in order])
    return torch.tensor(values, dtype=torch.float64), torch.tensor(indices)


@pytest.mark.parametrize("backend", ["reference", *TOPK_BACKENDS])
@pytest.mark.parametrize(
    "n,k_bank,d,k", [(1, 1, 16, 1), (7, 40, 16, 5), (5, 100, 64, 17), (3, 70, 32, 64), (4, 33, 128, 33)]
)
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.float16])
def test_matches_oracle(backend, n, k_bank, d, k, bank_dtype, small_chunks):
    g = torch.Generator().manual_seed(n * k_bank + k)
    query = torch.randn(n, d, generator=g).to(DEVICE)
    bank = F.normalize(torch.randn(k_bank, d, generator=g), dim=1).to(DEVICE, bank_dtype)
    values, indices = bank_topk(query, bank, k, backend=backend)
    expected_values, expected_indices = oracle(query, bank, k)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64 and values.shape == (n, k)
    assert torch.equal(indices.cpu(), expected_indices)
    torch.testing.assert_close(values.double().cpu(), expected_values, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", *TOPK_BACKENDS])
def test_ties_go_to_the_lower_index(backend, small_chunks):
    """A bank with many exact duplicates across chunk boundaries: equal values must list lower indices first.

    Small-integer vectors (used as given, normalize=False) make every dot product exact in any summation order, so the
    ties are in the data and not an accident of how a matmul rounds two identical rows."""
    g = torch.Generator().manual_seed(0)
    distinct = torch.randint(-3, 4, (4, 16), generator=g).float()
    pattern = torch.tensor([3, 1, 0, 2, 1, 1, 3, 0, 2, 1, 0, 3, 1, 2, 0, 1, 1, 3, 2, 0, 1, 3, 3, 1, 0])
    bank = distinct[pattern].to(DEVICE)
    query = distinct[[1, 3, 0]].to(DEVICE)
    _, indices = bank_topk(query, bank, 12, normalize=False, backend=backend)
    for row, q in zip(indices.cpu(), [1, 3, 0], strict=True):
        matches = (pattern == q).nonzero().flatten().tolist()
        assert row[: len(matches)].tolist() == matches[:12]


def test_memory_bank_input_and_k_validation():
    bank = MemoryBank(20, 8, init="empty", dtype=torch.float32)
    bank.enqueue(torch.randn(6, 8))
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 6\]"):
        bank_topk(torch.randn(2, 8), bank, 7)
    with pytest.raises(ValueError, match="k must be"):
        bank_topk(torch.randn(2, 8), bank, 0)
    values, indices = bank_topk(torch.randn(2, 8), bank, 6)
    assert sorted(indices[0].tolist()) == list(range(6))  # only valid rows are searched


def test_streaming_chunks_equal_reference_on_large_random_bank():
    g = torch.Generator().manual_seed(1)
    query = torch.randn(16, 32, generator=g)
    bank = F.normalize(torch.randn(5000, 32, generator=g), dim=1)
    v_ref, i_ref = bank_topk(query, bank, 10, backend="reference")
    v_str, i_str = topk_module.bank_topk_streaming(F.normalize(query, dim=1), bank, 10, chunk_size=777)
    assert torch.equal(i_ref, i_str)
    torch.testing.assert_close(v_ref, v_str)


@pytest.mark.parametrize("backend", ["reference", *TOPK_BACKENDS])
def test_nan_scores_rank_last_on_every_backend(backend, small_chunks):
    """NaN similarities rank below every number on every backend (the Triton kernel never selects one): NaN bank rows
    are no one's neighbours, a NaN query's values are all NaN, and nothing fails."""
    g = torch.Generator().manual_seed(3)
    bank = F.normalize(torch.randn(30, 16, generator=g), dim=1)
    bank[[4, 21]] = float("nan")
    query = torch.randn(3, 16, generator=g)
    query[1] = float("nan")
    values, indices = bank_topk(query.to(DEVICE), bank.to(DEVICE), 5, backend=backend)
    values, indices = values.cpu(), indices.cpu()
    assert values[1].isnan().all()
    finite = torch.tensor([j for j in range(30) if j not in (4, 21)])
    for row in (0, 2):
        sims = F.normalize(query[row : row + 1].double(), dim=1) @ bank[finite].double().T
        assert indices[row].tolist() == finite[sims[0].argsort(descending=True, stable=True)[:5]].tolist()
        torch.testing.assert_close(values[row].double(), sims[0].sort(descending=True).values[:5], rtol=0, atol=1e-5)


def test_streaming_chunk_with_ties_across_the_kth_place_lists_the_lowest_indices():
    """Within one chunk far wider than k, 600 exact copies of the best row: torch.topk may return any 5 of them (on
    CPU it does not return the first five), the streaming backend must return the lowest five indices."""
    g = torch.Generator().manual_seed(5)
    query = F.normalize(torch.randn(2, 16, generator=g), dim=1)
    bank = F.normalize(torch.randn(1000, 16, generator=g), dim=1) * 0.5  # every other similarity is at most 0.5
    bank[300:900] = query[0]
    values, indices = topk_module.bank_topk_streaming(query, bank, 5, chunk_size=1000)
    assert indices[0].tolist() == [300, 301, 302, 303, 304]
    torch.testing.assert_close(values[0], torch.ones(5), rtol=0, atol=1e-6)
    assert torch.equal(indices, oracle(query, bank, 5)[1])


def test_streaming_chunk_with_nan_rows_keeps_every_finite_neighbour():
    """torch.topk ranks NaN first: three NaN rows in an 8-row chunk would take three of its five places. The streaming
    backend ranks them last and returns the five finite rows (the chunk is wider than k + 1)."""
    g = torch.Generator().manual_seed(6)
    query = F.normalize(torch.randn(1, 16, generator=g), dim=1)
    bank = F.normalize(torch.randn(8, 16, generator=g), dim=1)
    bank[[0, 3, 6]] = float("nan")
    _, indices = topk_module.bank_topk_streaming(query, bank, 5, chunk_size=8)
    finite = [1, 2, 4, 5, 7]
    sims = (query.double() @ bank[finite].double().T)[0]
    assert indices[0].tolist() == [finite[j] for j in sims.argsort(descending=True).tolist()]
