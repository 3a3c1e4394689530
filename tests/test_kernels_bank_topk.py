"""fastssl.kernels.bank_topk against an fp64 stable-sort oracle.

Integer-valued inputs (multiples of 1/4) make every dot product exact in fp16/bf16/fp32 whatever the summation order,
so values and indices must match the oracle exactly, including the many ties (lower index first). Continuous random
inputs check values to rounding. Every selection case runs with both algorithms (the one-pass scan and the two-pass
tile search), which must also agree bit for bit. On CPU the kernels run in Triton's interpreter with small blocks; on
CUDA the same cases run compiled with the production configuration, plus bf16 (triton#11584 keeps bf16 off the
interpreter).
"""

from __future__ import annotations

import os
from dataclasses import astuple

import pytest
import torch

pytest.importorskip("triton")
from conftest import CUDA  # noqa: E402 - conftest has set TRITON_INTERPRET=1 on CPU machines before this import
from fastssl.kernels.bank_topk import ALGORITHMS, bank_topk  # noqa: E402
from launch_spy import record_block_dc  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = (["cpu"] if INTERPRET else []) + (["cuda"] if CUDA else [])
DTYPES = [torch.float16, torch.float32, torch.bfloat16]


def _skip_unsupported(device: str, dtype: torch.dtype) -> None:
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly (triton#11584); bf16 runs on GPU only")


def oracle(query: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 similarities, stable descending sort: equal values keep ascending index order."""
    sims = query.double().cpu() @ bank.double().cpu().T
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
    return sims.gather(1, order), order


def _quarters(n: int, d: int, dtype: torch.dtype, device: str, gen: torch.Generator) -> torch.Tensor:
    """Entries in {-0.5, -0.25, 0, 0.25, 0.5}: dot products are exact and ties are frequent."""
    return (torch.randint(-2, 3, (n, d), generator=gen).double() / 4).to(device=device, dtype=dtype)


def _launch_kwargs(device: str) -> dict:
    return {"block_n": 16, "block_k": 16} if device == "cpu" else {}


# (N, K, D, k, num_splits): N, K not block multiples; k = 1, 5, 17, 64 (padded to 1, 8, 32, 64); k = K; splits
# with empty bank ranges; D not a power of two.
CASES_CPU = [
    (5, 37, 32, 5, 3),
    (7, 150, 64, 17, 4),
    (3, 70, 32, 64, 2),
    (9, 3, 32, 1, 2),
    (9, 3, 32, 3, 5),
    (4, 40, 48, 5, 1),
    (3, 33, 128, 5, 2),
]
CASES_CUDA = CASES_CPU + [(300, 70000, 128, 10, None), (257, 5000, 512, 64, None), (1000, 65536, 256, 1, 50)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_exact_with_ties_to_lower_index(device: str, dtype: torch.dtype, algorithm: str) -> None:
    _skip_unsupported(device, dtype)
    gen = torch.Generator().manual_seed(0)
    for n, num_keys, d, k, num_splits in CASES_CPU if device == "cpu" else CASES_CUDA:
        if dtype == torch.float32 and d > 128:
            continue  # fp32 banks serve D <= 128 (test_rejects_bad_input checks the error)
        query = _quarters(n, d, dtype, device, gen)
        bank = _quarters(num_keys, d, dtype, device, gen)
        values, indices = bank_topk(
            query, bank, k, num_splits=num_splits, algorithm=algorithm, **_launch_kwargs(device)
        )
        assert values.dtype == torch.float32 and indices.dtype == torch.int64
        assert values.shape == indices.shape == (n, k)
        ref_values, ref_indices = oracle(query, bank, k)
        case = f"N={n} K={num_keys} D={d} k={k} splits={num_splits}"
        assert torch.equal(values.double().cpu(), ref_values), case
        assert torch.equal(indices.cpu(), ref_indices), case


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_continuous_values_match_to_rounding(device: str, dtype: torch.dtype, algorithm: str) -> None:
    """Random unit vectors: values equal the fp64 top-k to fp32 rounding and the indices point at those values."""
    gen = torch.Generator().manual_seed(1)
    n, num_keys, d, k = (6, 90, 64, 17) if device == "cpu" else (256, 100000, 128, 10)
    unit = lambda m: torch.nn.functional.normalize(torch.randn(m, d, generator=gen, dtype=torch.float64), dim=1)
    query, bank = unit(n).to(device, dtype), unit(num_keys).to(device, dtype)
    values, indices = bank_topk(query, bank, k, num_splits=3, algorithm=algorithm, **_launch_kwargs(device))
    ref_values, _ = oracle(query, bank, k)
    torch.testing.assert_close(values.double().cpu(), ref_values, rtol=0, atol=2e-6)
    sims = query.double().cpu() @ bank.double().cpu().T
    torch.testing.assert_close(sims.gather(1, indices.cpu()), values.double().cpu(), rtol=0, atol=2e-6)
    assert (values[:, 1:] <= values[:, :-1]).all()
    assert all(len(set(row)) == k for row in indices.cpu().tolist())


@pytest.mark.parametrize("device", DEVICES)
def test_result_independent_of_splits_and_blocks(device: str) -> None:
    """Keys are unique (value, index) pairs, so the selection is a function of the candidate set: bit-identical
    across split counts, tile sizes, repeated launches and the two algorithms."""
    gen = torch.Generator().manual_seed(2)
    query, bank = _quarters(10, 32, torch.float32, device, gen), _quarters(120, 32, torch.float32, device, gen)
    runs = [
        bank_topk(query, bank, 5, num_splits=1, block_n=16, block_k=16),
        bank_topk(query, bank, 5, num_splits=1, block_n=16, block_k=16),
        bank_topk(query, bank, 5, num_splits=4, block_n=16, block_k=32),
        bank_topk(query, bank, 5, num_splits=7, block_n=16, block_k=16),
        bank_topk(query, bank, 5, num_splits=1, block_n=16, block_k=16, algorithm="two_pass"),
        bank_topk(query, bank, 5, num_splits=4, block_n=16, block_k=32, algorithm="two_pass"),
        bank_topk(query, bank, 5, num_splits=7, block_n=16, block_k=16, algorithm="two_pass"),
    ]
    for values, indices in runs[1:]:
        assert torch.equal(values, runs[0][0]) and torch.equal(indices, runs[0][1])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_negative_and_signed_zero_values_order(algorithm: str) -> None:
    """The float->int key transform orders negative, zero and positive values like the floats (ties: lower index)."""
    device = DEVICES[0] if DEVICES else pytest.skip("no Triton device")
    query = torch.ones(1, 16, device=device)
    # Dot products: -2, -0.5, 0, 0 (a -0.0 entry still sums to +0.0), 1.5, -2 (tie with index 0), 0.25.
    rows = [-2.0, -0.5, 0.0, -0.0, 1.5, -2.0, 0.25]
    bank = torch.zeros(len(rows), 16, device=device)
    bank[:, 0] = torch.tensor(rows)
    values, indices = bank_topk(query, bank, 7, num_splits=2, algorithm=algorithm, **_launch_kwargs(device))
    assert indices.cpu().tolist() == [[4, 6, 2, 3, 1, 0, 5]]
    assert values.cpu().tolist() == [[1.5, 0.25, 0.0, 0.0, -0.5, -2.0, -2.0]]


def test_rejects_bad_input() -> None:
    q = torch.zeros(3, 32)
    with pytest.raises(ValueError, match="k must be"):
        bank_topk(q, torch.zeros(4, 32), 5)
    with pytest.raises(ValueError, match="k must be"):
        bank_topk(q, torch.zeros(4, 32), 0)
    with pytest.raises(ValueError, match="feature dims"):
        bank_topk(q, torch.zeros(4, 16), 1)
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        bank_topk(q.double(), torch.zeros(4, 32), 1)
    with pytest.raises(NotImplementedError, match="fp32 banks"):
        bank_topk(torch.zeros(3, 256), torch.zeros(4, 256), 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bank_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fp32_queries_over_16bit_bank(device: str, bank_dtype: torch.dtype, algorithm: str) -> None:
    """fp32 queries split into 16-bit terms: values match the fp64 top-k to fp32 rounding."""
    _skip_unsupported(device, bank_dtype)
    gen = torch.Generator().manual_seed(5)
    n, num_keys, d, k = (5, 60, 64, 5) if device == "cpu" else (256, 50000, 128, 10)
    query = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1).float()
    bank = torch.nn.functional.normalize(torch.randn(num_keys, d, generator=gen, dtype=torch.float64), dim=1)
    query, bank = query.to(device), bank.to(device, bank_dtype)
    values, indices = bank_topk(query, bank, k, num_splits=2, algorithm=algorithm, **_launch_kwargs(device))
    ref_values, _ = oracle(query, bank, k)
    torch.testing.assert_close(values.double().cpu(), ref_values, rtol=0, atol=2e-6)
    sims = query.double().cpu() @ bank.double().cpu().T
    torch.testing.assert_close(sims.gather(1, indices.cpu()), values.double().cpu(), rtol=0, atol=2e-6)


# (N, K, D, k, block_dc): D-chunked dots (block_dc < BLOCK_D), with a masked last chunk where D is no multiple of it.
CHUNKED_CPU = [(5, 37, 48, 5, 16), (4, 50, 40, 8, 32), (3, 30, 40, 3, 16)]


@pytest.fixture
def launched_block_dc(monkeypatch) -> list[int]:
    """The BLOCK_DC constexpr of every partial-kernel launch (so a test can tell the chunked path ran)."""
    import fastssl.kernels.bank_topk as module

    return record_block_dc(monkeypatch, module)


CHUNKED_CUDA = CHUNKED_CPU + [(256, 20000, 512, 10, 64), (100, 9000, 320, 64, 64)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_d_chunked_dot_exact_with_ties(
    device: str, dtype: torch.dtype, launched_block_dc: list[int], algorithm: str
) -> None:
    """Streaming the dot in D-chunks (the query re-read per bank tile) selects exactly what the fp64 oracle does."""
    _skip_unsupported(device, dtype)
    gen = torch.Generator().manual_seed(8)
    for n, num_keys, d, k, block_dc in CHUNKED_CPU if device == "cpu" else CHUNKED_CUDA:
        if dtype == torch.float32 and d > 128:
            continue
        query, bank = _quarters(n, d, dtype, device, gen), _quarters(num_keys, d, dtype, device, gen)
        values, indices = bank_topk(
            query, bank, k, num_splits=3, block_dc=block_dc, algorithm=algorithm, **_launch_kwargs(device)
        )
        ref_values, ref_indices = oracle(query, bank, k)
        case = f"N={n} K={num_keys} D={d} k={k} block_dc={block_dc}"
        assert launched_block_dc[-1] == block_dc, case
        assert torch.equal(values.double().cpu(), ref_values), case
        assert torch.equal(indices.cpu(), ref_indices), case


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bank_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_d_chunked_fp32_queries_over_16bit_bank(
    device: str, bank_dtype: torch.dtype, launched_block_dc: list[int]
) -> None:
    """Split fp32 queries streamed in D-chunks keep fp32-accurate values (each chunk by Horner's rule, then summed)."""
    _skip_unsupported(device, bank_dtype)
    gen = torch.Generator().manual_seed(9)
    n, num_keys, d, k, block_dc = (5, 60, 48, 5, 16) if device == "cpu" else (256, 50000, 512, 10, 64)
    query = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1).float()
    bank = torch.nn.functional.normalize(torch.randn(num_keys, d, generator=gen, dtype=torch.float64), dim=1)
    query, bank = query.to(device), bank.to(device, bank_dtype)
    values, indices = bank_topk(query, bank, k, num_splits=2, block_dc=block_dc, **_launch_kwargs(device))
    assert launched_block_dc == [block_dc]
    ref_values, _ = oracle(query, bank, k)
    torch.testing.assert_close(values.double().cpu(), ref_values, rtol=0, atol=2e-6)
    sims = query.double().cpu() @ bank.double().cpu().T
    torch.testing.assert_close(sims.gather(1, indices.cpu()), values.double().cpu(), rtol=0, atol=2e-6)


def test_block_dc_is_validated_and_capped_at_the_row(launched_block_dc: list[int]) -> None:
    query, bank = torch.randn(2, 32), torch.randn(8, 32)
    for block_dc in (8, 24):
        with pytest.raises(ValueError, match="block_dc"):
            bank_topk(query, bank, 2, block_dc=block_dc)
    if INTERPRET:  # 0 and anything >= BLOCK_D (32 here) run the whole-row path
        for block_dc in (0, 64):
            bank_topk(query, bank, 2, block_dc=block_dc, block_n=16, block_k=16)
        assert launched_block_dc == [32, 32]


@pytest.mark.skipif(not CUDA, reason="needs a GPU: a bank with more than 2^31 elements (4 GB fp16)")
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_int64_offsets_beyond_2pow31_elements(algorithm: str) -> None:
    """K·D > 2^31: the best matches sit in rows past the int32 offset range."""
    k, d = 2**22 + 3, 512
    gen = torch.Generator(device="cuda").manual_seed(7)
    bank = torch.nn.functional.normalize(torch.randn(k, d, device="cuda", generator=gen), dim=1).half()
    query = bank[[-1, -2, -3]].float()
    values, indices = bank_topk(query, bank, 4, algorithm=algorithm)
    assert indices[:, 0].tolist() == [k - 1, k - 2, k - 3]
    sims = torch.cat([query.double() @ chunk.double().T for chunk in bank.split(2**20)], dim=1)
    ref_values = torch.sort(sims, dim=1, descending=True, stable=True).values[:, :4]
    # The queries are fp16 rows (exact products), so the only error is fp32 accumulation of D = 512 products of unit
    # vectors: at most D·2^-24·Σ|q_i b_i| <= 3.1e-5 (an H100 measured 2.03e-6, over the 2e-6 the D <= 128 tests use).
    torch.testing.assert_close(values.double(), ref_values, rtol=0, atol=d * 2**-24)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_rows_without_k_selectable_scores_get_in_range_placeholders(device: str, algorithm: str) -> None:
    """NaN scores (a NaN query) and -inf scores are never selected; the unfilled slots come back as NaN with the
    slot's index, like a stable sort of an all-NaN row, so downstream gathers never see an out-of-range index."""
    d, k = 32, 5
    gen = torch.Generator().manual_seed(3)
    bank = torch.randn(40, d, generator=gen)
    bank[3:, 0] = float("inf")  # with query[1, 0] = -1 every row from 3 on scores -inf: only 3 selectable
    bank[3:, 1:] = 0.0
    query = torch.zeros(3, d)
    query[0] = float("nan")
    query[1, 0] = -1.0
    query[2] = torch.randn(d, generator=gen)
    query, bank = query.to(device), bank.to(device)
    values, indices = bank_topk(query, bank, k, num_splits=3, algorithm=algorithm, **_launch_kwargs(device))
    values, indices = values.cpu(), indices.cpu()
    assert indices.min() >= 0 and indices.max() < bank.shape[0]
    assert torch.isnan(values[0]).all() and indices[0].tolist() == [0, 1, 2, 3, 4]
    assert torch.isfinite(values[1, :3]).all() and torch.isnan(values[1, 3:]).all()
    assert sorted(indices[1, :3].tolist()) == [0, 1, 2] and indices[1, 3:].tolist() == [3, 4]
    ref_values, ref_indices = oracle(query[2:].cpu().float(), bank.cpu().float(), k)  # a finite row is unaffected
    assert torch.equal(indices[2:], ref_indices)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_equal_tile_maxima_resolve_to_the_lowest_indices(device: str, algorithm: str) -> None:
    """Every 16-row tile holds one score of 1 (at row 16t + 5) among ties of 0.25: every tile has the same maximum,
    so the two-pass search's tile choice rests on its tie rule (lower tile first) alone. The answer is the first k
    tiles' maxima for every split count, and a bank of one constant value gives indices 0..k-1."""
    query = torch.ones(3, 16, device=device)
    bank = torch.full((200, 16), 0.25 / 16, device=device)  # 13 tiles of 16 rows (the CPU block), the last partial
    bank[5::16] = 1.0 / 16
    for num_splits in (1, 3, 5):
        kwargs = {"num_splits": num_splits, "algorithm": algorithm, **_launch_kwargs(device)}
        values, indices = bank_topk(query, bank, 4, **kwargs)
        assert indices.cpu().tolist() == [[5, 21, 37, 53]] * 3, num_splits
        assert (values.cpu() == 1.0).all()
        values, indices = bank_topk(query, torch.full_like(bank, 0.25), 6, **kwargs)
        assert indices.cpu().tolist() == [list(range(6))] * 3, num_splits
        assert (values.cpu() == 4.0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_two_pass_visits_only_each_rows_top_tiles(device: str, monkeypatch) -> None:
    """First pass against a tile-level oracle: per row, the k tiles of largest maximum (ties: lower tile), their
    k-th maximum as the floor; the second pass's work list is each row block's distinct tiles, ascending."""
    import fastssl.kernels.bank_topk as module

    captured = {}
    original = module._candidate_tiles

    def spy(tile_values, tile_ids, block_n):
        captured.update(tile_values=tile_values.cpu(), tile_ids=tile_ids.cpu(), block_n=block_n)
        out = original(tile_values, tile_ids, block_n)
        captured.update(zip(("tiles", "tile_counts", "floor"), (t.cpu() for t in out), strict=True))
        return out

    monkeypatch.setattr(module, "_candidate_tiles", spy)
    gen = torch.Generator().manual_seed(11)
    n, num_keys, d, k, block_k = 20, 200, 32, 3, 16  # 13 tiles, the last one partial; two row blocks of 16
    query, bank = _quarters(n, d, torch.float32, device, gen), _quarters(num_keys, d, torch.float32, device, gen)
    values, indices = bank_topk(query, bank, k, num_splits=3, block_n=16, block_k=block_k, algorithm="two_pass")
    assert torch.equal(indices.cpu(), oracle(query, bank, k)[1])

    sims = query.double().cpu() @ bank.double().cpu().T
    tile_max = torch.nn.functional.pad(sims, (0, 13 * block_k - num_keys), value=float("-inf"))
    tile_max = tile_max.view(n, 13, block_k).amax(dim=2)
    order = torch.sort(tile_max, dim=1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(captured["tile_ids"], order)
    assert torch.equal(captured["tile_values"].double(), tile_max.gather(1, order))
    kth_max = tile_max.gather(1, order)[:, -1].float()
    assert torch.equal(captured["floor"], kth_max - (kth_max.abs() * 2**-20 + 2**-40))  # just under it
    for block in range(2):
        expected = sorted(set(order[16 * block : 16 * (block + 1)].flatten().tolist()))
        count = int(captured["tile_counts"][block])
        assert captured["tiles"][block, :count].tolist() == expected
        assert (captured["tiles"][block, count:] == torch.iinfo(torch.int32).max).all()


def test_rejects_unknown_algorithm() -> None:
    with pytest.raises(ValueError, match="algorithm"):
        bank_topk(torch.zeros(2, 32), torch.zeros(4, 32), 1, algorithm="three_pass")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "x_dtype,bank_dtype",
    [(torch.float32, torch.float16), (torch.float16, torch.float16), (torch.float32, torch.bfloat16)],
    ids=str,
)
def test_two_pass_equals_one_pass_bit_for_bit_on_continuous_scores(
    device: str, x_dtype: torch.dtype, bank_dtype: torch.dtype
) -> None:
    """With rounded (continuous) scores, the two-pass search must still return the one-pass result exactly: both
    passes score tiles through one function, so a tile's fp32 scores are identical in each kernel (on a GPU this
    checks the compiled kernels agree; the exact-valued tests above cannot, since their dots are exact anyway)."""
    _skip_unsupported(device, bank_dtype)
    from fastssl.kernels.bank_topk import pick_config
    from fastssl.kernels.dot_precision import device_arch, dot_plan

    gen = torch.Generator().manual_seed(12)
    for n, num_keys, d, k in [(7, 300, 32, 5)] if device == "cpu" else [
        (256, 200_000, 128, 10), (256, 100_000, 512, 10), (100, 50_000, 512, 64), (300, 60_000, 128, 100)
    ]:  # fmt: skip
        query = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
        bank = torch.nn.functional.normalize(torch.randn(num_keys, d, generator=gen, dtype=torch.float64), dim=1)
        query, bank = query.to(device, x_dtype), bank.to(device, bank_dtype)
        if device == "cpu":
            launch = {"block_n": 16, "block_k": 16, "num_splits": 3}
        else:  # the two-pass config for both (TWO_PASS_SM90 may differ from the one-pass table's)
            cfg = pick_config(d, dot_plan(x_dtype, bank_dtype), device_arch(query.device), "two_pass")
            launch = dict(zip(("block_n", "block_k", "num_warps", "num_stages", "block_dc"), astuple(cfg), strict=True))
            launch["block_n"] = None  # the launcher's rows per program for this k
        one = bank_topk(query, bank, k, algorithm="one_pass", **launch)
        two = bank_topk(query, bank, k, algorithm="two_pass", **launch)
        case = f"N={n} K={num_keys} D={d} k={k}"
        assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1]), case
        ref_values, _ = oracle(query, bank, k)
        torch.testing.assert_close(two[0].double().cpu(), ref_values, rtol=0, atol=d * 2**-24, msg=case)


def _selectable_oracle(query: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 scores, NaN and -inf dropped, stable descending sort; unfilled slots NaN with the slot's index."""
    values, indices = [], []
    for row in (query.double().cpu() @ bank.double().cpu().T).tolist():
        ranked = sorted((-v, j) for j, v in enumerate(row) if v == v and v != float("-inf"))[:k]
        values.append([-v for v, _ in ranked] + [float("nan")] * (k - len(ranked)))
        indices.append([j for _, j in ranked] + list(range(len(ranked), k)))
    return torch.tensor(values, dtype=torch.float64), torch.tensor(indices)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_non_finite_scores_and_floor_edges(device: str, algorithm: str) -> None:
    """(a) +inf scores in more tiles than k (the two-pass floor is +inf) with +inf ties inside tiles; (b) NaN scores
    mixed with finite ones inside tiles (ignored by the tile maxima and never selected); (c) two rows of one block
    whose ties sit in each other's candidate tiles."""
    d = 16
    gen = torch.Generator().manual_seed(13)
    bank_a = torch.zeros(100, d)
    bank_a[:, 0] = 1.0
    bank_a[[3, 7, 20, 40, 41, 70, 99], 0] = float("inf")
    query_a = torch.zeros(2, d)
    query_a[:, 0] = torch.tensor([1.0, -1.0])
    bank_b = _quarters(90, d, torch.float32, "cpu", gen)
    bank_b[::3, 1] = float("nan")
    query_b = _quarters(5, d, torch.float32, "cpu", gen)
    query_b[:, 1] = 1.0
    query_b[2, 1] = 0.0  # 0 · NaN is NaN too
    bank_c = torch.full((160, d), 0.0)
    bank_c[:, :2] = 0.5
    bank_c[[130, 131], 0] = 2.0  # row 0's best: tile 8 (of 16 rows); its other ties are everywhere
    bank_c[5, 1] = 2.0  # row 1's best: tile 0
    query_c = torch.zeros(2, d)
    query_c[0, 0] = query_c[1, 1] = 1.0
    for query, bank, k, num_splits in ((query_a, bank_a, 4, 3), (query_b, bank_b, 6, 2), (query_c, bank_c, 3, 4)):
        kwargs = {"num_splits": num_splits, "algorithm": algorithm, **_launch_kwargs(device)}
        values, indices = bank_topk(query.to(device), bank.to(device), k, **kwargs)
        ref_values, ref_indices = _selectable_oracle(query, bank, k)
        assert torch.equal(indices.cpu(), ref_indices)
        torch.testing.assert_close(values.double().cpu(), ref_values, rtol=0, atol=0, equal_nan=True)


def test_candidate_tiles_with_unfilled_rows_and_padding() -> None:
    """The second pass's work list from synthetic first-pass output: NaN (unfilled) slots contribute no tile and give
    a -inf floor; repeats within a row block appear once; padded rows of the last block add nothing."""
    from fastssl.kernels.bank_topk import _candidate_tiles

    nan = float("nan")
    tile_values = torch.tensor([[3.0, 2.0, 1.0], [5.0, nan, nan], [2.0, 2.0, 2.0], [0.0, -1.0, float("inf")]])
    tile_values[3] = torch.tensor([float("inf"), float("inf"), float("inf")])
    tile_ids = torch.tensor([[4, 0, 9], [9, 0, 0], [1, 2, 3], [7, 8, 12]])
    tiles, counts, floor = _candidate_tiles(tile_values, tile_ids, block_n=2)  # blocks {0, 1} and {2, 3}
    pad = torch.iinfo(torch.int32).max
    assert tiles.tolist() == [[0, 4, 9, pad, pad, pad], [1, 2, 3, 7, 8, 12]]
    assert counts.tolist() == [3, 6]
    assert floor[1] == float("-inf") and floor[3] == float("inf")
    assert floor[0] == 1.0 - (2**-20 + 2**-40) and floor[2] == 2.0 - (2 * 2**-20 + 2**-40)
    tiles, counts, floor = _candidate_tiles(tile_values[:3], tile_ids[:3], block_n=2)  # row 3 is padding now
    assert tiles.tolist() == [[0, 4, 9, pad, pad, pad], [1, 2, 3, pad, pad, pad]] and counts.tolist() == [3, 3]


def test_two_pass_with_one_second_pass_program_per_row_block() -> None:
    """Nine row blocks: the second pass runs one program per block (its whole tile list), still exact."""
    device = DEVICES[0] if DEVICES else pytest.skip("no Triton device")
    gen = torch.Generator().manual_seed(14)
    query, bank = _quarters(130, 16, torch.float32, device, gen), _quarters(64, 16, torch.float32, device, gen)
    values, indices = bank_topk(query, bank, 3, algorithm="two_pass", **_launch_kwargs(device))
    ref_values, ref_indices = oracle(query, bank, 3)
    assert torch.equal(values.double().cpu(), ref_values) and torch.equal(indices.cpu(), ref_indices)
