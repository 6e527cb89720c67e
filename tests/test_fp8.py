"""FP8 (e4m3) on the CPU: the quantizer and its kernel, the quantized reference, level 10's row and the FP8 peer."""

from unittest import mock

import pytest
import torch
from conftest import make_config

import moe_benchmark
import moe_kernels
from moe_benchmark import make_inputs
from moe_model import (
    FP8_DTYPE,
    FP8_MAX,
    Fp8Experts,
    dequantize_fp8,
    fp8_round_trip,
    init_weights,
    quantize_fp8,
    reference_forward,
)

CPU = torch.device("cpu")


def assert_within_half_a_step(x, values, scales):
    """Each element within half an e4m3 step of x: 2^-4 of its magnitude where e4m3 is normal, and e4m3's
    smallest subnormal step (2^-9, in scaled units) below that."""
    error = (dequantize_fp8(values, scales) - x.float()).abs()
    assert (error <= 2**-4 * x.float().abs() + 2**-10 * scales).all()


@pytest.mark.parametrize("power_of_two", [False, True])
def test_round_trip_per_row(power_of_two):
    x = torch.randn(7, 300, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 7)[:, None]
    values, scales = quantize_fp8(x, power_of_two)
    assert values.dtype == FP8_DTYPE and values.shape == x.shape and scales.shape == (7, 1)
    amax_scales = x.abs().amax(dim=1, keepdim=True) / FP8_MAX
    if power_of_two:  # the power of two at or above amax / 448: at most twice it
        assert (scales >= amax_scales).all() and (scales < 2 * amax_scales).all()
        assert torch.equal(torch.frexp(scales).mantissa, torch.full_like(scales, 0.5))
    else:
        assert torch.equal(scales, amax_scales)
    assert_within_half_a_step(x, values, scales)


def test_zero_rows_and_saturation():
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    x[1] = 0
    x[2, 7], x[2, 9] = 1e4, -1e4  # the row's amax, both signs
    values, scales = quantize_fp8(x)
    dequantized = dequantize_fp8(values, scales)
    assert torch.isfinite(scales).all() and torch.isfinite(dequantized).all()
    assert (values[1].float() == 0).all() and (dequantized[1] == 0).all()
    assert values[2, 7].float() == FP8_MAX and values[2, 9].float() == -FP8_MAX  # amax lands on e4m3's largest
    assert values.float().abs().amax() == FP8_MAX  # and nothing beyond it


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_values_are_row_major_for_a_transposed_input(dtype):
    x_T = torch.randn(40, 32, generator=torch.Generator().manual_seed(2)).to(dtype).T  # [32, 40], column-major
    values, scales = quantize_fp8(x_T)
    assert values.stride(-1) == 1
    expected_values, expected_scales = quantize_fp8(x_T.contiguous())
    assert torch.equal(values.view(torch.uint8), expected_values.view(torch.uint8))
    assert torch.equal(scales, expected_scales)


def test_fp8_experts_index_as_the_dequantized_weights():
    w_EDC = torch.randn(3, 40, 24, generator=torch.Generator().manual_seed(3)).bfloat16()
    experts = Fp8Experts.quantize(w_EDC)
    assert experts.values_ECD.shape == (3, 24, 40) and experts.scales_EC.shape == (3, 24)
    assert experts.shape == w_EDC.shape
    for expert in range(3):
        dequantized = dequantize_fp8(experts.values_ECD[expert], experts.scales_EC[expert, :, None]).T
        assert torch.equal(experts[expert], dequantized) and experts[expert].shape == (40, 24)
        assert_within_half_a_step(w_EDC[expert].T, experts.values_ECD[expert], experts.scales_EC[expert, :, None])


def test_quantize_rows_kernel_is_bit_equal_to_quantize_fp8():
    """Through Triton's interpreter, whose own e4m3 cast does not carry a rounding into the exponent: with
    amax 448 the scale is 1 (a power of two already), and 125.5 (125.4 in bf16) must become 128, not 64."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(6, 64, generator=generator) * torch.logspace(-4, 4, 6)[:, None]
    x[0, :4] = torch.tensor([448.0, 125.4, -125.4, 250.0])
    x = x.bfloat16()
    values, scales = moe_kernels.quantize_rows(x)
    expected_values, expected_scales = quantize_fp8(x, power_of_two=True)
    assert expected_values[0, 1].float() == 128 and expected_values[0, 2].float() == -128
    assert torch.equal(values.view(torch.uint8), expected_values.view(torch.uint8))
    assert torch.equal(scales, expected_scales[:, 0])


def test_quantize_rows_shares_programs_and_stops_at_the_rows_in_use():
    """Several short rows per program (ROWS), and for the hidden a device-side count of the rows in use: rows at
    and past it are neither read nor written."""
    generator = torch.Generator().manual_seed(5)
    x = (torch.randn(37, 48, generator=generator) * 3).bfloat16()
    values, scales = moe_kernels.quantize_rows(x)
    expected_values, expected_scales = quantize_fp8(x, power_of_two=True)
    assert torch.equal(values.view(torch.uint8), expected_values.view(torch.uint8))
    assert torch.equal(scales, expected_scales[:, 0])
    with mock.patch.object(moe_kernels, "QUANTIZE_ELEMENTS_PER_PROGRAM", 4 * 64):  # 4 rows a program
        values, scales = moe_kernels.quantize_rows(x, rows_used=torch.tensor([22], dtype=torch.int32))
    assert torch.equal(values[:22].view(torch.uint8), expected_values[:22].view(torch.uint8))
    assert torch.equal(scales[:22], expected_scales[:22, 0])


@pytest.mark.parametrize("T, H, E, K", [(1, 200, 6, 2), (45, 64, 6, 6), (7, 72, 8, 8)])  # K = E: every expert
def test_align_and_quantize_in_one_launch_equals_the_two_apart(T, H, E, K):
    """Level 10's decode launch (program 0 aligns, the others quantize) gives what align_tokens(one_program=True)
    and quantize_rows give, bit for bit; with 4 rows a program, 45 tokens take 12 quantizing programs."""
    generator = torch.Generator().manual_seed(T)
    expert_ids = torch.stack([torch.randperm(E, generator=generator)[:K] for _ in range(T)])
    tokens = (torch.randn(T, H, generator=generator) * 5).bfloat16()
    with mock.patch.object(moe_kernels, "QUANTIZE_ELEMENTS_PER_PROGRAM", 4 * 64):
        alignment, values, scales = moe_kernels.align_and_quantize_tokens(expert_ids, E, 16, tokens)
        expected_values, expected_scales = moe_kernels.quantize_rows(tokens)
    expected = moe_kernels.align_tokens(expert_ids, E, 16, one_program=True)
    for got, want in zip(alignment, expected):
        assert torch.equal(torch.as_tensor(got), torch.as_tensor(want))
    assert torch.equal(values.view(torch.uint8), expected_values.view(torch.uint8))
    assert torch.equal(scales, expected_scales)


def test_reference_rounds_every_hidden_it_is_given():
    config = make_config(num_shared_experts=1)
    weights = init_weights(config, CPU)
    inputs = make_inputs(config, weights, 9, seed=5)
    plain = reference_forward(inputs.tokens_TH, weights, inputs.routing_weights_TK, inputs.expert_ids_TK)
    assert torch.equal(reference_forward(inputs.tokens_TH, weights, inputs.routing_weights_TK, inputs.expert_ids_TK,
                                         round_hidden=lambda hidden: hidden), plain)
    zeroed = reference_forward(inputs.tokens_TH, weights, inputs.routing_weights_TK, inputs.expert_ids_TK,
                               round_hidden=torch.zeros_like)  # routed and shared experts alike
    assert (zeroed == 0).all()
    rounded = reference_forward(inputs.tokens_TH, weights, inputs.routing_weights_TK, inputs.expert_ids_TK,
                                round_hidden=fp8_round_trip)
    assert 1e-3 < ((rounded - plain).norm() / plain.norm()).item() < 0.1


def test_level_10_row_on_the_cpu(levels, tiny):
    row = moe_benchmark.benchmark(levels["10"], tiny, 13, CPU, warmup=1, repeats=3)
    assert row["status"] == "checked", row["note"]
    assert row["rel_err"] < 2e-2 and 1e-3 < row["quant_err"] < 0.1


# --- the FP8 peer -----------------------------------------------------------------------------------------------
def test_fp8_peer_is_skipped_on_the_cpu(levels, tiny):
    row = moe_benchmark.benchmark(levels["peer-fp8"], tiny, 13, CPU, warmup=1, repeats=3)
    assert row["status"] == "skipped" and "CUDA" in row["note"] and "\n" not in row["note"]
    assert row["launches_claimed"] is not None  # the claims are there for the table, even unmeasured


def emulated_scaled_grouped_mm(mat_a, mat_b, scale_a, scale_b, offs=None, out_dtype=torch.bfloat16):
    """torch._scaled_grouped_mm's 2D × 3D rowwise case as torch documents it, with the layout checks its CUDA
    kernel makes: e4m3 mat_a [rows, depth] row-major with a scale per row; e4m3 mat_b [groups, depth, cols]
    column-major with a scale per column; int32 group ends; bf16 out."""
    assert mat_a.dtype == mat_b.dtype == FP8_DTYPE and offs.dtype == torch.int32 and out_dtype == torch.bfloat16
    assert mat_a.stride(-1) == 1 and mat_b.stride(-2) == 1 and mat_b.stride(-1) > 1
    assert mat_a.shape[1] % 16 == 0 and mat_b.shape[1] % 16 == 0 and mat_b.shape[2] % 16 == 0
    assert scale_a.shape == mat_a.shape[:1] and scale_a.is_contiguous() and scale_a.dtype == torch.float32
    assert scale_b.shape == (mat_b.shape[0], mat_b.shape[2]) and scale_b.stride(-1) == 1
    out = torch.empty((mat_a.shape[0], mat_b.shape[2]), dtype=out_dtype)
    start = 0
    for group, end in enumerate(offs.tolist()):
        rows = mat_a[start:end].float() * scale_a[start:end, None]
        out[start:end] = (rows @ (mat_b[group].float() * scale_b[group])).to(out_dtype)
        start = end
    return out


@pytest.mark.parametrize("num_shared", [0, 1])
def test_fp8_peer_with_an_emulated_kernel(levels, monkeypatch, num_shared):
    """The peer's plumbing (quantization, permutation, scales, offsets, shared experts, its own reference) on
    the CPU, with torch._scaled_grouped_mm replaced by what it computes."""
    peer = levels["peer-fp8"]
    monkeypatch.setattr(torch, "_scaled_grouped_mm", emulated_scaled_grouped_mm, raising=False)
    monkeypatch.setattr(__import__(peer.__module__), "unavailable", lambda config, device: None)
    row = moe_benchmark.benchmark(peer, make_config(num_shared_experts=num_shared), 21, CPU, warmup=1, repeats=3)
    assert row["status"] == "ok", row["note"]
    assert row["rel_err"] < 2e-2 and 1e-3 < row["quant_err"] < 0.1
