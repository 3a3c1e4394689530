"""fastssl.kernels.unit_rows (the bank losses' prologue) against F.normalize in fp64.

On CPU the kernel runs in Triton's interpreter, on a CUDA machine compiled; bf16 rows run on both (the kernel has no
tl.dot, whose bf16 form the interpreter gets wrong).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from conftest import CUDA  # noqa: E402 - conftest has set TRITON_INTERPRET=1 on CPU machines before this import
from fastssl.kernels.unit_rows import unit_rows  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = (["cpu"] if INTERPRET else []) + (["cuda"] if CUDA else [])


# (R_a, R_b, D, a dtype, b dtype): row counts that are not block multiples, R_b = 0, D not a power of two (and one
# block row), mixed dtypes (fp32 queries with fp16 keys).
CASES = [
    (5, 5, 32, torch.float32, torch.float32),
    (3, 70, 40, torch.float16, torch.float16),
    (9, 0, 16, torch.float32, torch.float32),
    (4, 4, 512, torch.bfloat16, torch.bfloat16),
    (6, 6, 100, torch.float32, torch.float16),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}+{c[1]}x{c[2]}-{str(c[3])[6:]}-{str(c[4])[6:]}")
def test_normalized_rows_norms_and_temperatures(device: str, case: tuple) -> None:
    r_a, r_b, d, a_dtype, b_dtype = case
    gen = torch.Generator().manual_seed(0)
    a = (torch.randn(r_a, d, generator=gen, dtype=torch.float64) * 3).to(device, a_dtype)
    b = torch.randn(r_b, d, generator=gen, dtype=torch.float64).to(device, b_dtype)
    if r_a > 2:
        a[1] = 0  # zero row: the ε clamp is the denominator, the row stays zero
    x_hat, norm, inv_tau = unit_rows(a, b, 10.0, 25.0)
    stacked = torch.cat([a.double(), b.double()]).cpu()
    ref = F.normalize(stacked, dim=1)
    assert x_hat.dtype == norm.dtype == inv_tau.dtype == torch.float32
    torch.testing.assert_close(x_hat.double().cpu(), ref, rtol=0, atol=3e-7)
    torch.testing.assert_close(norm.double().cpu(), stacked.norm(dim=1), rtol=3e-7, atol=0)
    assert inv_tau.cpu().tolist() == [10.0] * r_a + [25.0] * r_b


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same D"):
        unit_rows(torch.zeros(2, 4), torch.zeros(2, 5), 1.0, 1.0)
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        unit_rows(torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4), 1.0, 1.0)
