"""Streaming == reference on randomized shapes, temperatures and chunk sizes (hypothesis), the issue-2 contract."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastssl.ops.bank_info_nce import bank_info_nce_reference
from fastssl.ops.bank_softmax_stats import bank_softmax_stats_streaming
from fastssl.ops.bank_topk import bank_topk_reference, bank_topk_streaming
from fastssl.ops.soft_bank_cross_entropy import soft_bank_cross_entropy, soft_bank_cross_entropy_reference

shapes = st.tuples(st.integers(1, 9), st.integers(1, 70), st.sampled_from([16, 64, 128]))


def unit(g, rows, dim, dtype=torch.float64):
    return F.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=1).to(dtype)


@settings(max_examples=40, deadline=None)
@given(
    shape=shapes,
    seed=st.integers(0, 2**31 - 1),
    chunk=st.integers(1, 40),
    tau_s=st.floats(0.05, 1.0),
    tau_t=st.floats(0.01, 1.0),
    kl=st.booleans(),
)
def test_soft_cross_entropy_streaming_equals_reference(shape, seed, chunk, tau_s, tau_t, kl):
    n, k, d = shape
    g = torch.Generator().manual_seed(seed)
    s, t, bank = unit(g, n, d).requires_grad_(), unit(g, n, d), unit(g, k, d, torch.float16)
    import fastssl.ops.bank_softmax_stats as stats

    old, stats.DEFAULT_CHUNK = stats.DEFAULT_CHUNK, chunk
    try:
        streaming = soft_bank_cross_entropy(s, t, bank, tau_s, tau_t, kl=kl, reduction="none", backend="streaming")
    finally:
        stats.DEFAULT_CHUNK = old
    reference = soft_bank_cross_entropy_reference(s, t, bank, tau_s, tau_t, kl=kl, reduction="none")
    torch.testing.assert_close(streaming, reference, rtol=1e-10, atol=1e-10)
    weights = torch.rand(n, generator=g, dtype=torch.float64)  # grad_output ≠ 1
    (g_stream,) = torch.autograd.grad(streaming, s, weights)
    (g_ref,) = torch.autograd.grad(reference, s, weights)
    torch.testing.assert_close(g_stream, g_ref, rtol=1e-9, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), chunk=st.integers(1, 40), tau=st.floats(0.01, 1.0))
def test_info_nce_stats_streaming_equals_reference(shape, seed, chunk, tau):
    n, k, d = shape
    g = torch.Generator().manual_seed(seed)
    q, key, bank = unit(g, n, d), unit(g, n, d), unit(g, k, d)
    lse, mu = bank_softmax_stats_streaming(
        q, torch.full((n,), 1 / tau, dtype=torch.float64), bank, key, chunk_size=chunk
    )
    logits = torch.cat([(q * key).sum(1, keepdim=True), q @ bank.T], dim=1) / tau
    values = torch.cat([key[:, None], bank.expand(n, k, d)], dim=1)  # (N, K+1, D)
    torch.testing.assert_close(lse, logits.logsumexp(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mu, (logits.softmax(1)[..., None] * values).sum(1), rtol=1e-10, atol=1e-12)
    rows = bank_info_nce_reference(q, key, bank, tau, reduction="none")
    torch.testing.assert_close(lse - (q * key).sum(1) / tau, rows, rtol=1e-10, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(
    shape=shapes,
    seed=st.integers(0, 2**31 - 1),
    chunk=st.integers(1, 40),
    k=st.integers(1, 70),
    duplicates=st.booleans(),
)
def test_topk_streaming_equals_reference(shape, seed, chunk, k, duplicates):
    n, rows, d = shape
    g = torch.Generator().manual_seed(seed)
    if duplicates:
        # Exact ties across chunk boundaries. Small-integer entries make every dot product exact in any summation
        # order; with general floats, a matmul may round two identical rows differently (SIMD tails), so their
        # "tie" would depend on the kernel rather than on the data.
        bank = torch.randint(-3, 4, (max(1, rows // 3), d), generator=g).float()
        bank = bank[torch.randint(0, bank.shape[0], (rows,), generator=g)]
        query = torch.randint(-3, 4, (n, d), generator=g).float()
    else:
        bank, query = unit(g, rows, d, torch.float32), unit(g, n, d, torch.float32)
    k = min(k, rows)
    v_ref, i_ref = bank_topk_reference(query, bank, k)
    v_str, i_str = bank_topk_streaming(query, bank, k, chunk_size=chunk)
    assert torch.equal(i_ref, i_str)
    torch.testing.assert_close(v_ref, v_str)
