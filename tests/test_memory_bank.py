"""MemoryBank: FIFO order with wrap-around for any batch size, state_dict round trip, input validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from device_reads import DeviceReads

from fastssl import MemoryBank


def fifo_model(size: int, batches: list[torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    """Oracle: the bank as a Python ring of rows written one at a time."""
    rows: list[torch.Tensor | None] = [None] * size
    ptr = count = 0
    for batch in batches:
        for row in batch:
            rows[ptr] = row
            ptr = (ptr + 1) % size
            count = min(count + 1, size)
    return torch.stack([r for r in rows[:count]]) if count < size else torch.stack(rows), ptr, count


@pytest.mark.parametrize("size,batch_sizes", [(10, [3, 4, 5, 7, 10, 1]), (7, [7, 7, 2]), (5, [1, 1, 1, 1, 1, 1, 3])])
def test_fifo_contents_with_wraparound(size, batch_sizes):
    torch.manual_seed(0)
    bank = MemoryBank(size, 4, dtype=torch.float32, init="empty", store_labels=True)
    batches, label_batches = [], []
    for i, n in enumerate(batch_sizes):
        keys = torch.randn(n, 4)
        labels = torch.arange(n) + 100 * i
        bank.enqueue(keys, labels)
        batches.append(F.normalize(keys, dim=1))
        label_batches.append(labels.float()[:, None])
        expected, ptr, count = fifo_model(size, batches)
        expected_labels, _, _ = fifo_model(size, label_batches)
        assert torch.equal(bank.keys, expected)
        assert torch.equal(bank.labels, expected_labels[:, 0].long())
        assert int(bank.ptr) == ptr and len(bank) == count and bank.is_full == (count == size)


def test_enqueue_writes_in_place_and_normalizes_and_casts():
    bank = MemoryBank(6, 3)  # fp16 default
    storage = bank.queue.data_ptr()
    keys = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, -2.0]], dtype=torch.float64)
    bank.enqueue(keys)
    assert bank.queue.data_ptr() == storage  # no clone of the whole bank
    assert bank.queue.dtype == torch.float16
    assert torch.equal(bank.queue[:2], torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, -1.0]]).half())


def test_random_init_rows_are_unit_vectors_per_row():
    bank = MemoryBank(1000, 8, dtype=torch.float32)
    assert len(bank) == 1000 and bank.is_full
    torch.testing.assert_close(bank.keys.norm(dim=1), torch.ones(1000))
    # per-row normalization, not per-column (the official ISD R18 bug): columns are not unit vectors
    assert not torch.allclose(bank.keys.norm(dim=0), torch.ones(8))


def test_empty_init_exposes_only_written_rows():
    bank = MemoryBank(8, 2, init="empty")
    assert len(bank) == 0 and bank.keys.shape == (0, 2) and not bank.is_full
    bank.enqueue(torch.randn(3, 2))
    assert bank.keys.shape == (3, 2)


def test_state_dict_round_trip():
    torch.manual_seed(1)
    bank = MemoryBank(9, 5, init="empty", store_labels=True)
    bank.enqueue(torch.randn(4, 5), torch.arange(4))
    bank.enqueue(torch.randn(7, 5), torch.arange(7))
    state = bank.state_dict()
    assert set(state) == {"queue", "ptr", "count", "label_queue"}
    restored = MemoryBank(9, 5, init="random", store_labels=True)
    restored.load_state_dict(state)
    for name in state:
        assert torch.equal(getattr(restored, name), getattr(bank, name))
    new_keys = torch.randn(3, 5)
    bank.enqueue(new_keys, torch.arange(3))
    restored.enqueue(new_keys, torch.arange(3))
    assert torch.equal(restored.queue, bank.queue) and int(restored.ptr) == int(bank.ptr)


BAD_INPUTS = [
    ("wrong dim", lambda: (torch.randn(2, 5), None), ValueError, "dim 5"),
    ("wrong rank", lambda: (torch.randn(2, 4, 1), None), ValueError, "shape"),
    ("1-D", lambda: (torch.randn(4), None), ValueError, "shape"),
    ("integer keys", lambda: (torch.ones(2, 4, dtype=torch.long), None), TypeError, "floating point"),
    ("bool keys", lambda: (torch.ones(2, 4, dtype=torch.bool), None), TypeError, "floating point"),
    ("not a tensor", lambda: ([[1.0] * 4], None), TypeError, "torch.Tensor"),
    ("nan", lambda: (torch.tensor([[1.0, float("nan"), 0, 0]]), None), ValueError, "NaN"),
    ("inf", lambda: (torch.tensor([[1.0, float("inf"), 0, 0]]), None), ValueError, "NaN or inf"),
    ("zero row", lambda: (torch.zeros(1, 4), None), ValueError, "all-zero"),
    ("-inf fp16", lambda: (torch.tensor([[1.0, 2, 0, 0], [0, -float("inf"), 1, 0]]).half(), None), ValueError, "inf"),
    (
        "nan beside a zero row",
        lambda: (torch.tensor([[0.0, 0, 0, 0], [float("nan"), 1, 1, 1]]), None),
        ValueError,
        "NaN",
    ),
    (
        "zero row among others",
        lambda: (torch.tensor([[1.0, 2, 3, 4], [0, 0, 0, 0], [0, 0, 1e-30, 0]]), None),
        ValueError,
        "all-zero",
    ),
    ("batch larger than bank", lambda: (torch.randn(7, 4), None), ValueError, "larger than the bank"),
    ("labels wrong length", lambda: (torch.randn(3, 4), torch.arange(2)), ValueError, "labels must have shape"),
    ("float labels", lambda: (torch.randn(3, 4), torch.ones(3)), TypeError, "integers"),
    ("2-D labels", lambda: (torch.randn(3, 4), torch.ones(3, 1, dtype=torch.long)), ValueError, "labels"),
]


@pytest.mark.parametrize("case,make,error,match", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_rejected_and_bank_unchanged(case, make, error, match):
    torch.manual_seed(2)
    bank = MemoryBank(6, 4, init="empty", store_labels=True)
    bank.enqueue(torch.randn(5, 4), torch.arange(5))
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    keys, labels = make()
    with pytest.raises(error, match=match):
        bank.enqueue(keys, labels)
    for name, value in bank.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_labels_without_store_labels_rejected():
    bank = MemoryBank(4, 2)
    before = bank.queue.clone()
    with pytest.raises(ValueError, match="store_labels"):
        bank.enqueue(torch.randn(2, 2), torch.arange(2))
    assert torch.equal(bank.queue, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_keys_on_another_device_rejected():
    bank = MemoryBank(4, 2, device="cuda")
    with pytest.raises(ValueError, match="on cpu"):
        bank.enqueue(torch.randn(2, 2))


def test_keys_on_another_device_rejected_meta():
    # The meta device stands in for "another device" on a CPU-only machine.
    bank = MemoryBank(4, 2)
    before = bank.queue.clone()
    with pytest.raises(ValueError, match="meta"):
        bank.enqueue(torch.randn(2, 2, device="meta"))
    assert torch.equal(bank.queue, before)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"size": 0, "dim": 2}, ValueError),
        ({"size": 4, "dim": 0}, ValueError),
        ({"size": 4, "dim": 2, "dtype": torch.long}, TypeError),
        ({"size": 4, "dim": 2, "init": "zeros"}, ValueError),
    ],
)
def test_bad_construction(kwargs, error):
    with pytest.raises(error):
        MemoryBank(**kwargs)


@pytest.mark.parametrize(
    "dtype,scale,width",
    [
        (torch.float32, 1e30, 3),
        (torch.float32, 1e19, 3),
        (torch.float32, 2.0**59, 1024),  # D·max² overflows fp32 although max² does not
        (torch.float32, 1e-30, 3),
        (torch.float32, 1e-13, 3),  # a norm under F.normalize's eps would come out shorter than 1
        (torch.float64, 1e300, 3),
    ],
)
def test_keys_of_extreme_magnitude_keep_their_direction(dtype, scale, width):
    """A row whose norm F.normalize cannot take (an overflowing squared norm, or one below its eps) keeps its direction
    and unit length (the 3-4-5 triangle gives exact expectations); an ordinary row in the same batch is normalized
    bit for bit as F.normalize does, like the losses' embeddings."""
    bank = MemoryBank(4, width, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    if width == 3:
        extreme = torch.tensor([3.0, -4.0, 0.0], dtype=torch.float64)
    else:
        extreme = torch.ones(width, dtype=torch.float64)
    ordinary = torch.randn(width, dtype=torch.float64)
    keys = torch.stack([extreme * scale, ordinary]).to(dtype)
    bank.enqueue(keys)
    expected = extreme / extreme.norm()
    torch.testing.assert_close(bank.queue[0], expected.to(bank.queue.dtype), rtol=1e-6, atol=1e-7)
    assert torch.equal(bank.queue[1], F.normalize(ordinary.to(dtype)[None], dim=1)[0].to(bank.queue.dtype))


VALUE_CASES = [c for c in BAD_INPUTS if c[3] in ("NaN", "NaN or inf", "all-zero", "inf")]


@pytest.mark.parametrize("case,make,error,match", VALUE_CASES, ids=[c[0] for c in VALUE_CASES])
def test_deferred_value_checks_name_the_same_problem_a_step_later(case, make, error, match):
    """value_checks="deferred" writes without reading, and its stats name exactly the problem the immediate check
    refuses with, accumulated over every batch since the last take (a bad batch between good ones is not missed)."""
    from fastssl.bank import value_problem

    torch.manual_seed(2)
    bank = MemoryBank(16, 4, init="empty", store_labels=True, value_checks="deferred")
    assert bank.take_value_stats() is None
    bank.enqueue(torch.randn(3, 4))
    keys, _ = make()
    bank.enqueue(keys)
    bank.enqueue(torch.randn(2, 4))
    assert len(bank) == 5 + keys.shape[0]  # written: the check comes later
    stats = bank.take_value_stats()
    problem = value_problem(*stats.tolist())
    assert problem is not None and issubclass(problem[0], error) and match in problem[1]
    assert bank.take_value_stats() is None  # taken: reset


def test_deferred_value_stats_of_good_batches_are_their_extremes():
    """Closed form: (smallest row max |entry|, largest |entry|) over the batches, and no problem."""
    from fastssl.bank import value_problem

    bank = MemoryBank(8, 3, dtype=torch.float32, value_checks="deferred")
    bank.enqueue(torch.tensor([[0.5, -2.0, 0.0], [0.0, 0.25, -0.125]]))
    bank.enqueue(torch.tensor([[3.0, 1.0, 1.0]], dtype=torch.float64))
    assert bank.take_value_stats().tolist() == [0.25, 3.0]
    assert value_problem(0.25, 3.0) is None


def test_deferred_enqueue_reads_nothing_back():
    """The point of the deferred mode: no read of a device value inside enqueue (immediate mode reads once)."""
    for mode, expected in (("deferred", 0), ("immediate", 1)):
        bank = MemoryBank(8, 3, dtype=torch.float32, value_checks=mode)
        with DeviceReads() as reads:
            bank.enqueue(torch.randn(2, 3))
        assert (reads.tolist, reads.scalars) == (expected, 0), mode


def test_value_checks_mode_is_validated():
    with pytest.raises(ValueError, match="value_checks must be one of"):
        MemoryBank(4, 2, value_checks="later")
