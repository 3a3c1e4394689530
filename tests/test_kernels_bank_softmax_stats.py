"""fastssl.kernels.bank_softmax_stats against an fp64 oracle.

On CPU the kernels run in Triton's interpreter with small blocks (fp16, fp32); on a CUDA machine the same cases run
compiled with the production launch configuration, plus bf16 (the interpreter computes bf16 tl.dot wrongly,
triton#11584).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
from conftest import CUDA  # noqa: E402 - conftest has set TRITON_INTERPRET=1 on CPU machines before this import
from fastssl.kernels.bank_softmax_stats import bank_softmax_stats  # noqa: E402
from launch_spy import record_block_dc  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

DEVICES = (["cpu"] if INTERPRET else []) + (["cuda"] if CUDA else [])
DTYPES = [torch.float16, torch.float32, torch.bfloat16]
# μ error is dominated by rounding the softmax weights to the input dtype for the second tensor-core dot.
MU_ATOL = {torch.float32: 2e-6, torch.float16: 3e-4, torch.bfloat16: 3e-3}


def _skip_unsupported(device: str, dtype: torch.dtype) -> None:
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly (triton#11584); bf16 runs on GPU only")
    if device == "cpu" and not INTERPRET:
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")


def _unit(n: int, d: int, dtype: torch.dtype, device: str, gen: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1).to(
        device=device, dtype=dtype
    )


def oracle(
    x: torch.Tensor, inv_tau: torch.Tensor, bank: torch.Tensor, pos: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 materializing LSE and μ of inv_tau[r]·[x_r·pos_r, x_r·b_j] over values [pos_r, b_j]."""
    x, bank, t = x.double().cpu(), bank.double().cpu(), inv_tau.double().cpu()
    logits = x @ bank.T
    values = bank.expand(x.shape[0], -1, -1)
    if pos is not None:
        p = pos.double().cpu()
        logits = torch.cat([(x * p).sum(1, keepdim=True), logits], dim=1)
        values = torch.cat([p[:, None, :], values], dim=1)
    z = logits * t[:, None]
    return torch.logsumexp(z, dim=1), (torch.softmax(z, dim=1)[:, :, None] * values).sum(1)


def _inv_tau(r: int, device: str) -> torch.Tensor:
    # τ from 0.01 to 1, cycling, so every row block mixes very sharp and flat softmaxes.
    taus = torch.tensor([0.01, 0.04, 0.1, 0.2, 1.0], dtype=torch.float32)
    return (1.0 / taus).repeat(r // 5 + 1)[:r].to(device)


# (R, K, D, with positive, num_splits): R and K not multiples of the blocks, K tiny, K = 0 with a positive, splits
# with empty bank ranges, D not a power of two.
CASES_CPU = [
    (5, 37, 32, False, 3),
    (7, 50, 64, True, 4),
    (3, 0, 32, True, 2),
    (9, 3, 32, True, 5),
    (4, 1, 32, False, 1),
    (6, 40, 128, True, 2),
    (4, 29, 48, False, 2),
]
CASES_CUDA = CASES_CPU + [(300, 5000, 128, False, None), (257, 4099, 512, True, None), (512, 20000, 256, True, 37)]


def _cases(device: str) -> list[tuple]:
    return CASES_CPU if device == "cpu" else CASES_CUDA


def _launch_kwargs(device: str) -> dict:
    # Small tiles keep the interpreter fast and make several bank blocks per split.
    return {"block_r": 16, "block_k": 16} if device == "cpu" else {}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_fp64_oracle(device: str, dtype: torch.dtype) -> None:
    _skip_unsupported(device, dtype)
    gen = torch.Generator().manual_seed(0)
    for r, k, d, with_pos, num_splits in _cases(device):
        if dtype == torch.float32 and d > 128:
            continue  # fp32 banks serve D <= 128 (test_rejects_bad_input checks the error)
        x = _unit(r, d, dtype, device, gen)
        bank = _unit(k, d, dtype, device, gen)
        pos = _unit(r, d, dtype, device, gen) if with_pos else None
        inv_tau = _inv_tau(r, device)
        lse, mu = bank_softmax_stats(x, inv_tau, bank, pos, num_splits=num_splits, **_launch_kwargs(device))
        assert lse.dtype == torch.float32 and mu.dtype == torch.float32
        assert lse.shape == (r,) and mu.shape == (r, d)
        lse_ref, mu_ref = oracle(x, inv_tau, bank, pos)
        case = f"R={r} K={k} D={d} pos={with_pos} splits={num_splits}"
        torch.testing.assert_close(lse.double().cpu(), lse_ref, rtol=2e-6, atol=1e-5, msg=lambda m, c=case: f"{c}: {m}")
        torch.testing.assert_close(
            mu.double().cpu(), mu_ref, rtol=0, atol=MU_ATOL[dtype], msg=lambda m, c=case: f"{c}: {m}"
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bank_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_queries_over_16bit_bank_keep_fp32_logits(device: str, bank_dtype: torch.dtype) -> None:
    """fp32 queries (what fastssl.functional passes) over a 16-bit bank: the query is split into 16-bit terms, so
    the LSE has fp32 accuracy at τ = 0.01 although the tensor-core operands are 16-bit."""
    _skip_unsupported(device, bank_dtype)
    gen = torch.Generator().manual_seed(1)
    r, k, d = (6, 45, 64) if device == "cpu" else (300, 7000, 128)
    x = _unit(r, d, torch.float32, device, gen)
    bank = _unit(k, d, bank_dtype, device, gen)
    pos = _unit(r, d, torch.float32, device, gen)
    inv_tau = _inv_tau(r, device)
    lse, mu = bank_softmax_stats(x, inv_tau, bank, pos, num_splits=2, **_launch_kwargs(device))
    lse_ref, mu_ref = oracle(x, inv_tau, bank, pos)
    torch.testing.assert_close(lse.double().cpu(), lse_ref, rtol=2e-6, atol=1e-5)
    torch.testing.assert_close(mu.double().cpu(), mu_ref, rtol=0, atol=MU_ATOL[bank_dtype])


# (R, K, D, with positive, block_dc): logits dot streamed in D-chunks, with a masked last chunk where D is no multiple.
CHUNKED_CPU = [(5, 37, 40, True, 16), (4, 29, 40, False, 32)]


@pytest.fixture
def launched_block_dc(monkeypatch) -> list[int]:
    """The BLOCK_DC constexpr of every partial-kernel launch (so a test can tell the chunked path ran)."""
    import fastssl.kernels.bank_softmax_stats as module

    return record_block_dc(monkeypatch, module)


CHUNKED_CUDA = CHUNKED_CPU + [(257, 4099, 512, True, 64), (130, 3000, 320, False, 64)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_d_chunked_logits_match_fp64_oracle(device: str, dtype: torch.dtype, launched_block_dc: list[int]) -> None:
    """Streaming s = x·bᵀ in D-chunks (the query re-read per bank tile) gives the oracle's LSE and μ."""
    _skip_unsupported(device, dtype)
    gen = torch.Generator().manual_seed(6)
    for r, k, d, with_pos, block_dc in CHUNKED_CPU if device == "cpu" else CHUNKED_CUDA:
        if dtype == torch.float32 and d > 128:
            continue
        x, bank = _unit(r, d, dtype, device, gen), _unit(k, d, dtype, device, gen)
        pos = _unit(r, d, dtype, device, gen) if with_pos else None
        inv_tau = _inv_tau(r, device)
        lse, mu = bank_softmax_stats(x, inv_tau, bank, pos, num_splits=3, block_dc=block_dc, **_launch_kwargs(device))
        lse_ref, mu_ref = oracle(x, inv_tau, bank, pos)
        case = f"R={r} K={k} D={d} pos={with_pos} block_dc={block_dc}"
        assert launched_block_dc[-1] == block_dc, case
        torch.testing.assert_close(lse.double().cpu(), lse_ref, rtol=2e-6, atol=1e-5, msg=lambda m, c=case: f"{c}: {m}")
        torch.testing.assert_close(
            mu.double().cpu(), mu_ref, rtol=0, atol=MU_ATOL[dtype], msg=lambda m, c=case: f"{c}: {m}"
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bank_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_d_chunked_fp32_queries_keep_fp32_logits(
    device: str, bank_dtype: torch.dtype, launched_block_dc: list[int]
) -> None:
    """Split fp32 queries streamed in D-chunks: fp32-accurate LSE at τ = 0.01 (each chunk by Horner's rule)."""
    _skip_unsupported(device, bank_dtype)
    gen = torch.Generator().manual_seed(7)
    r, k, d, block_dc = (6, 45, 40, 16) if device == "cpu" else (300, 7000, 500, 64)
    x, bank = _unit(r, d, torch.float32, device, gen), _unit(k, d, bank_dtype, device, gen)
    pos = _unit(r, d, torch.float32, device, gen)
    inv_tau = _inv_tau(r, device)
    lse, mu = bank_softmax_stats(x, inv_tau, bank, pos, num_splits=2, block_dc=block_dc, **_launch_kwargs(device))
    assert launched_block_dc == [block_dc]
    lse_ref, mu_ref = oracle(x, inv_tau, bank, pos)
    torch.testing.assert_close(lse.double().cpu(), lse_ref, rtol=2e-6, atol=1e-5)
    torch.testing.assert_close(mu.double().cpu(), mu_ref, rtol=0, atol=MU_ATOL[bank_dtype])


def test_block_dc_is_validated_and_capped_at_the_row(launched_block_dc: list[int]) -> None:
    x, bank, inv_tau = torch.randn(2, 32), torch.randn(8, 32), torch.ones(2)
    for block_dc in (8, 24):
        with pytest.raises(ValueError, match="block_dc"):
            bank_softmax_stats(x, inv_tau, bank, block_dc=block_dc)
    if INTERPRET:  # 0 and anything >= BLOCK_D (32 here) run the whole-row path
        for block_dc in (0, 64):
            bank_softmax_stats(x, inv_tau, bank, block_dc=block_dc, block_r=16, block_k=16)
        assert launched_block_dc == [32, 32]


@pytest.mark.parametrize("device", DEVICES)
def test_no_overflow_at_smallest_temperature(device: str) -> None:
    """Logits of 100 (x = b, τ = 0.01) would overflow exp in fp32 without the running max; LSE is exact."""
    _skip_unsupported(device, torch.float32)
    gen = torch.Generator().manual_seed(2)
    bank = _unit(40, 32, torch.float32, device, gen)
    x = bank[[3, 17, 39]].clone()
    inv_tau = torch.full((3,), 100.0, device=device)
    lse, mu = bank_softmax_stats(x, inv_tau, bank, num_splits=3, **_launch_kwargs(device))
    assert torch.isfinite(lse).all() and torch.isfinite(mu).all()
    lse_ref, mu_ref = oracle(x, inv_tau, bank, None)
    assert lse_ref.min() > 99.0
    torch.testing.assert_close(lse.double().cpu(), lse_ref, rtol=2e-6, atol=1e-5)
    torch.testing.assert_close(mu.double().cpu(), mu_ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_deterministic_and_split_invariant(device: str, dtype: torch.dtype) -> None:
    """Two launches give identical bits; other split counts agree to rounding (merge order is fixed, no atomics)."""
    _skip_unsupported(device, dtype)
    gen = torch.Generator().manual_seed(3)
    r, k, d = (11, 70, 32) if device == "cpu" else (300, 9000, 128)
    x, bank, pos = _unit(r, d, dtype, device, gen), _unit(k, d, dtype, device, gen), _unit(r, d, dtype, device, gen)
    inv_tau = _inv_tau(r, device)
    kw = _launch_kwargs(device)
    first = bank_softmax_stats(x, inv_tau, bank, pos, num_splits=3, **kw)
    second = bank_softmax_stats(x, inv_tau, bank, pos, num_splits=3, **kw)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    one_split = bank_softmax_stats(x, inv_tau, bank, pos, num_splits=1, **kw)
    torch.testing.assert_close(one_split[0], first[0], rtol=2e-6, atol=1e-5)
    torch.testing.assert_close(one_split[1], first[1], rtol=0, atol=MU_ATOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_rows_and_bank_view(device: str) -> None:
    """A strided query view and a prefix view of a larger bank (MemoryBank.keys) are read in place."""
    _skip_unsupported(device, torch.float32)
    gen = torch.Generator().manual_seed(4)
    storage = _unit(64, 32, torch.float32, device, gen)
    bank = storage[:45]  # valid prefix: the unwritten rows 45.. must not leak into the softmax
    storage[45:] = 1.0  # garbage that would dominate every softmax if read
    x = _unit(12, 32, torch.float32, device, gen)[::2]
    inv_tau = _inv_tau(6, device)
    lse, mu = bank_softmax_stats(x, inv_tau, bank, num_splits=4, **_launch_kwargs(device))
    lse_ref, mu_ref = oracle(x, inv_tau, bank, None)
    torch.testing.assert_close(lse.double().cpu(), lse_ref, rtol=2e-6, atol=1e-5)
    torch.testing.assert_close(mu.double().cpu(), mu_ref, rtol=0, atol=2e-6)


def test_rejects_bad_input() -> None:
    x = torch.zeros(3, 32)
    with pytest.raises(ValueError, match="empty bank"):
        bank_softmax_stats(x, torch.ones(3), torch.zeros(0, 32))
    with pytest.raises(ValueError, match="feature dims"):
        bank_softmax_stats(x, torch.ones(3), torch.zeros(5, 16))
    with pytest.raises(ValueError, match="inv_tau"):
        bank_softmax_stats(x, torch.ones(4), torch.zeros(5, 32))
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        bank_softmax_stats(x.double(), torch.ones(3), torch.zeros(5, 32))
    with pytest.raises(ValueError, match="D <= 512"):
        bank_softmax_stats(torch.zeros(3, 600), torch.ones(3), torch.zeros(5, 600))
    with pytest.raises(NotImplementedError, match="fp32 banks"):
        bank_softmax_stats(torch.zeros(3, 256), torch.ones(3), torch.zeros(5, 256))


@pytest.mark.skipif(not CUDA, reason="needs a GPU: a bank with more than 2^31 elements (4 GB fp16)")
def test_int64_offsets_beyond_2pow31_elements() -> None:
    """K·D > 2^31: rows past the int32 offset range must be read (queries equal to the last rows dominate)."""
    k, d = 2**22 + 3, 512
    gen = torch.Generator(device="cuda").manual_seed(6)
    bank = torch.nn.functional.normalize(torch.randn(k, d, device="cuda", generator=gen), dim=1).half()
    x = bank[[-1, -2, k // 2]].float()
    inv_tau = torch.tensor([100.0, 25.0, 10.0], device="cuda")
    lse, mu = bank_softmax_stats(x, inv_tau, bank)
    z = (x.double() @ bank.double().T) * inv_tau.double()[:, None]  # (3, K) fp64, 100 MB
    w = torch.softmax(z, dim=1)
    mu_ref = torch.zeros(3, d, dtype=torch.float64, device="cuda")
    for start in range(0, k, 2**20):
        mu_ref += w[:, start : start + 2**20] @ bank[start : start + 2**20].double()
    torch.testing.assert_close(lse.double(), torch.logsumexp(z, dim=1), rtol=2e-6, atol=1e-5)
    torch.testing.assert_close(mu.double(), mu_ref, rtol=0, atol=MU_ATOL[torch.float16])
