"""MSF mean-shift loss and purity: official formula, k = 1 equals BYOL exactly, neighbours chosen by the target."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from backends import TOPK_BACKENDS, device_for

from fastssl import MemoryBank
from fastssl.functional import byol_loss, mean_shift_purity, msf_loss


def official_msf(query, target, queue, topk):
    """train_msf.py's MeanShift.forward after the enqueue, in fp64."""
    query = F.normalize(query.double(), dim=1)
    current_target = F.normalize(target.double(), dim=1)
    queue = queue.double()
    dist_t = 2 - 2 * torch.einsum("bc,kc->bk", [current_target, queue])
    dist_q = 2 - 2 * torch.einsum("bc,kc->bk", [query, queue])
    _, nn_index = dist_t.topk(topk, dim=1, largest=False)
    nn_dist_q = torch.gather(dist_q, 1, nn_index)
    return (nn_dist_q.sum(dim=1) / topk).mean()


@pytest.mark.parametrize("backend", ["reference", *TOPK_BACKENDS])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_official_formula(backend, k):
    torch.manual_seed(k)
    device = device_for(backend)
    bank = MemoryBank(64, 16, dtype=torch.float32, device=device)
    query = torch.randn(6, 16, device=device, requires_grad=True)
    target = torch.randn(6, 16, device=device)
    bank.enqueue(target)  # the official code enqueues before searching
    loss = msf_loss(query, target, bank, k, backend=backend)
    q64 = query.detach().double().requires_grad_()
    expected = official_msf(q64, target, bank.keys, k)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    (g,) = torch.autograd.grad(loss, query)
    (g64,) = torch.autograd.grad(expected, q64)
    torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_k1_equals_byol_exactly(dtype):
    torch.manual_seed(0)
    bank = MemoryBank(50, 32, dtype=dtype)
    query, target = torch.randn(8, 32, dtype=dtype), torch.randn(8, 32, dtype=dtype)
    bank.enqueue(target)
    assert torch.equal(msf_loss(query, target, bank, k=1), byol_loss(query, target))


def test_neighbours_are_chosen_by_the_target_not_the_query():
    """Bank = {target, a row identical to the query}: top-1 by target is the target itself, not the query's twin."""
    e = torch.eye(4)
    query, target = e[[0]], F.normalize(e[[1]] + 0.1 * e[[0]], dim=1)
    bank = torch.cat([target, query])  # query's twin has cos 1 with the query
    loss = msf_loss(query, target, bank, k=1)
    torch.testing.assert_close(loss, byol_loss(query, target))
    assert loss > 1.0  # pulled toward the target's neighbour, far from the query


def test_gradient_flows_to_query_only():
    torch.manual_seed(1)
    bank = torch.randn(20, 8, requires_grad=True)
    query, target = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    gq, gt, gb = torch.autograd.grad(msf_loss(query, target, bank, k=3), (query, target, bank), allow_unused=True)
    assert gq is not None and gt is None and gb is None


def test_byol_closed_form():
    online = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])
    # cosines 1, 0, −1 → distances 0, 2, 4 → mean 2
    assert byol_loss(online, target).item() == pytest.approx(2.0, abs=1e-6)


def test_purity_counts_self_match_and_label_agreement():
    e = torch.eye(3)
    bank = MemoryBank(6, 3, dtype=torch.float32, init="empty", store_labels=True)
    # two clusters: rows near e0 labelled 0 / 0 / 1, rows near e1 labelled 1 / 1
    rows = F.normalize(torch.stack([e[0], e[0] + 0.1 * e[2], e[0] + 0.2 * e[2], e[1], e[1] + 0.1 * e[2]]), dim=1)
    bank.enqueue(rows, torch.tensor([0, 0, 1, 1, 1]))
    target = rows[[0, 3]]
    purity = mean_shift_purity(target, torch.tensor([0, 1]), bank, k=2)
    # target 0: neighbours rows 0 (self, 0) and 1 (0) → 2/2; target 1: rows 3 (self) and 4 → 2/2
    assert purity.item() == 1.0
    purity3 = mean_shift_purity(target, torch.tensor([0, 1]), bank, k=3)
    # target 0: rows 0,1,2 → labels 0,0,1 → 2/3; target 1: rows 3,4 then the nearest of the e0 rows (label 0) → 2/3
    assert purity3.item() == pytest.approx(4 / 6)


def test_purity_needs_labels():
    with pytest.raises(ValueError, match="store_labels"):
        mean_shift_purity(torch.randn(2, 4), torch.zeros(2, dtype=torch.long), MemoryBank(5, 4), k=1)


@pytest.mark.parametrize(
    "labels,bank_labels,match",
    [
        (torch.zeros(2), torch.zeros(5, dtype=torch.long), "labels must be integers, got torch.float32"),
        ([0, 1], torch.zeros(5, dtype=torch.long), "labels must be a torch.Tensor"),
        (torch.zeros(2, dtype=torch.long), torch.zeros(5, dtype=torch.bool), "bank_labels must be integers"),
    ],
)
def test_purity_rejects_labels_that_are_not_integer_tensors(labels, bank_labels, match):
    bank = F.normalize(torch.randn(5, 4), dim=1)
    with pytest.raises(TypeError, match=match):
        mean_shift_purity(torch.randn(2, 4), labels, bank, k=1, bank_labels=bank_labels)
