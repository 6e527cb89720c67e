"""The Triton kernels under TRITON_INTERPRET=1 (set in conftest), on sizes that are not multiples of the block."""

import pytest
import torch
import torch.nn.functional as F

import triton_kernels
from triton_kernels import silu_mul


def test_runs_in_the_interpreter():
    assert triton_kernels.interpreting()


@pytest.mark.parametrize("shape", [(1,), (1023,), (1025,), (7, 333), (3, 5, 129)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_mul_matches_torch(shape, dtype):
    gate, up = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    expected = F.silu(gate.float()) * up.float()
    out = silu_mul(gate, up, block_size=128)  # many blocks, the last one partial
    assert out.shape == gate.shape and out.dtype == dtype
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert ((out.float() - expected).norm() / expected.norm()).item() < tolerance


def test_silu_mul_in_place_and_empty():
    gate, up = torch.randn(2000), torch.randn(2000)
    expected = F.silu(gate) * up
    result = silu_mul(gate, up, out=gate)
    assert result.data_ptr() == gate.data_ptr() and torch.allclose(gate, expected, atol=1e-6)
    assert silu_mul(torch.empty(0, 4), torch.empty(0, 4)).shape == (0, 4)


def test_silu_mul_rejects_bad_arguments():
    with pytest.raises(ValueError, match="differ in shape"):
        silu_mul(torch.randn(3), torch.randn(4))
    with pytest.raises(ValueError, match="contiguous"):
        silu_mul(torch.randn(4, 4).t(), torch.randn(4, 4))
