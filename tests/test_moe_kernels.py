"""The Triton kernels under TRITON_INTERPRET=1 (set in conftest), on sizes that are not multiples of the block."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import moe_kernels
from moe_kernels import silu_mul


def test_runs_in_the_interpreter():
    assert moe_kernels.interpreting()


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


# --- the MoE grouped GEMM (level 7's kernels) -------------------------------------------------------------------
from moe_model import MoEConfig, init_weights, reference_forward  # noqa: E402
from moe_benchmark import compare_to_reference  # noqa: E402
from moe_kernels import align_tokens, moe_down, moe_gate_up  # noqa: E402


# Level 7's three kernels and two fills, level 9's one program (decode), and level 9's two launches (prefill: the
# counters kept between calls, each call leaving them zero for the next, whose routing differs)
@pytest.mark.parametrize("variant", ["kernels", "one_program", "two_launches"])
# 700·2 pairs: several programs of each kernel; 257 experts: deepseek-v3's routed ones and its shared one
@pytest.mark.parametrize("block_m, T, E", [(16, 45, 6), (32, 45, 6), (16, 700, 6), (16, 1, 6), (16, 45, 257),
                                            (16, 700, 257)])
def test_alignment_pads_each_expert_to_whole_blocks(block_m, T, E, variant):
    generator = torch.Generator().manual_seed(block_m)
    K = 2
    counters = moe_kernels.alignment_counters(E, torch.device("cpu"))
    for call in range(2 if variant == "two_launches" else 1):
        expert_ids = torch.stack([torch.randperm(E - 1, generator=generator)[:K] for _ in range(T)])  # last idle
        expert_ids[:20 + 30 * call, 0] = 2  # and expert 2 crowded: several blocks
        if variant == "two_launches":
            alignment = align_tokens(expert_ids, E, block_m, counters=counters)
            assert not counters[:E].any() and counters[2 * E] == 0  # counts and arrivals: zero for the next call
        else:
            alignment = align_tokens(expert_ids, E, block_m, one_program=variant == "one_program")
        check_alignment(alignment, expert_ids, block_m, E, padding_past_the_end=variant != "two_launches")


def check_alignment(alignment, expert_ids, block_m, E, padding_past_the_end):
    """Every pair once, in its expert's run of whole blocks; padding rows marked T·K (past the padded length too
    where the variant writes them)."""
    sorted_pair_ids, block_expert_ids, padded_starts, _ = alignment
    T, K = expert_ids.shape
    num_pairs = T * K
    assert sorted_pair_ids.numel() % block_m == 0
    assert sorted_pair_ids.numel() >= num_pairs + E * (block_m - 1)
    used = int(padded_starts[-1])  # the padded length
    assert used % block_m == 0
    assert ((sorted_pair_ids[:used] < num_pairs) | (sorted_pair_ids[:used] == num_pairs)).all()
    real = sorted_pair_ids[:used][sorted_pair_ids[:used] < num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs))  # every pair exactly once
    if padding_past_the_end:
        assert (sorted_pair_ids[used:] == num_pairs).all()
    flat = expert_ids.flatten()
    for block, expert in enumerate(block_expert_ids.tolist()):
        rows = sorted_pair_ids[block * block_m:(block + 1) * block_m]
        if block * block_m >= used:
            assert expert == -1
            continue
        pairs = rows[rows < num_pairs]
        assert len(pairs) > 0 and (flat[pairs.long()] == expert).all()  # a block holds one expert's pairs
    counts = torch.bincount(flat, minlength=E)
    padded_counts = (counts + block_m - 1) // block_m * block_m
    assert used == int(padded_counts.sum())
    assert padded_starts.tolist() == [0] + padded_counts.cumsum(0).tolist()  # each run's first row, then the end
    assert E - 1 not in block_expert_ids.tolist()


@triton.jit
def _tile_order_kernel(block_expert_ids_ptr, padded_starts_ptr, out_ptr, num_pid_m, num_pid_n,
                       BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr):
    for tile in range(0, num_pid_m * num_pid_n):
        pid_m, pid_n = moe_kernels._persistent_tile(tile, num_pid_m, num_pid_n, block_expert_ids_ptr,
                                                    padded_starts_ptr, BLOCK_M, GROUP_M, 0)
        tl.store(out_ptr + 2 * tile, pid_m)
        tl.store(out_ptr + 2 * tile + 1, pid_n)


@pytest.mark.parametrize("group_m", [1, 2, 4])
def test_persistent_tile_order_visits_every_tile_once_in_groups_within_one_expert(group_m):
    """Levels 9 and 10 walk their tiles in groups of row blocks that never cross from one expert's run to the
    next: runs of 1, 2, 3 and 5 blocks, an idle expert, and 3 column blocks."""
    block_m, num_pid_n = 16, 3
    expert_ids = torch.tensor([0] * 16 + [1] * 20 + [3] * 40 + [4] * 70).view(-1, 1)  # expert 2 idle
    alignment = align_tokens(expert_ids, 5, block_m)
    num_pid_m = int(alignment.num_padded) // block_m
    assert num_pid_m == 1 + 2 + 3 + 5
    order = torch.empty((num_pid_m * num_pid_n, 2), dtype=torch.int32)
    _tile_order_kernel[(1,)](alignment.block_expert_ids, alignment.padded_starts, order, num_pid_m, num_pid_n,
                             BLOCK_M=block_m, GROUP_M=group_m)
    assert sorted(map(tuple, order.tolist())) == [(m, n) for m in range(num_pid_m) for n in range(num_pid_n)]
    experts = alignment.block_expert_ids
    tile = torch.arange(num_pid_m * num_pid_n)
    assert torch.equal(experts[order[:, 0].long()], experts[tile // num_pid_n])  # in the run tile // num_pid_n names


def test_one_program_alignment_refuses_more_pairs_than_it_was_built_for():
    too_many = torch.zeros((moe_kernels.ONE_PROGRAM_MAX_PAIRS + 1, 1), dtype=torch.int64)
    with pytest.raises(ValueError, match="at most"):
        align_tokens(too_many, 4, 16, one_program=True)


def grouped_case(num_tokens, top_k, expert_ids=None, seed=0, sizes=(48, 80)):
    hidden, intermediate = sizes
    config = MoEConfig(hidden=hidden, intermediate=intermediate, num_experts=4, top_k=top_k, name="kernel-test")
    weights = init_weights(config, "cpu")
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn((num_tokens, hidden), generator=generator).bfloat16()
    if expert_ids is None:
        expert_ids = torch.stack([torch.randperm(4, generator=generator)[:top_k] for _ in range(num_tokens)])
    routing = torch.rand(expert_ids.shape, generator=generator) + 0.1
    routing = (routing / routing.sum(-1, keepdim=True)).bfloat16()
    w13 = torch.cat([weights.w_gate_EHI, weights.w_up_EHI], dim=2).contiguous()
    return weights, tokens, routing, expert_ids, w13


@pytest.mark.parametrize(
    "case",
    ["one_token", "odd_count", "all_on_one_expert", "idle_experts", "top_k_equals_experts", "even_tiles"],
)
def test_grouped_kernel_matches_reference(case):
    num_tokens, top_k, expert_ids = {
        "one_token": (1, 2, None),
        "odd_count": (53, 2, None),
        "all_on_one_expert": (21, 1, torch.full((21, 1), 3)),
        "idle_experts": (19, 2, torch.tensor([[1, 3]] * 19)),
        "top_k_equals_experts": (11, 4, None),
        "even_tiles": (40, 2, None),
    }[case]
    sizes = (64, 128) if case == "even_tiles" else (48, 80)  # tiles divide H and I exactly, or they do not
    weights, tokens, routing, expert_ids, w13 = grouped_case(num_tokens, top_k, expert_ids, sizes=sizes)
    alignment = align_tokens(expert_ids, 4, block_m=16)
    out = moe_down(moe_gate_up(tokens, w13, alignment, top_k), weights.w_down_EIH, routing, alignment).sum(dim=1)
    ref = reference_forward(tokens, weights, routing, expert_ids)
    check = compare_to_reference(out, ref, 2e-2)
    assert check.passed, check.message


# --- levels 9 and 10's persistent TMA kernels: odd shapes, the interpreter runs the tensor descriptors too ----------
@pytest.mark.parametrize("level_key", ["9", "10"])
@pytest.mark.parametrize("hidden, intermediate", [(200, 72), (100, 36), (72, 40)])
@pytest.mark.parametrize("num_tokens, top_k", [(1, 2), (37, 4), (61, 1)])
def test_persistent_tma_level_on_odd_shapes(levels, level_key, hidden, intermediate, num_tokens, top_k):
    """H and I that are not multiples of the tiles, rows whose storage TMA needs padded (100·2 bytes, 36·2 bytes in
    bf16; 200, 100, 72 and 36 bytes in e4m3), T = 1, K = E, and experts left without tokens (61 tokens at K=1 over
    4 experts: routing picks two). Level 10 is checked against its reference on the same quantized values."""
    config = MoEConfig(hidden=hidden, intermediate=intermediate, num_experts=4, top_k=top_k, name="odd")
    weights = init_weights(config, "cpu")
    generator = torch.Generator().manual_seed(num_tokens)
    tokens = torch.randn((num_tokens, hidden), generator=generator).bfloat16()
    expert_ids = torch.stack([torch.randperm(4, generator=generator)[:top_k] for _ in range(num_tokens)])
    if top_k == 1:
        expert_ids = expert_ids % 2  # experts 2 and 3 get nothing
    routing_weights = torch.softmax(torch.randn((num_tokens, top_k), generator=generator), -1).bfloat16()
    level = levels[level_key](config, weights)
    level.prepare()
    out = level.forward(tokens, routing_weights, expert_ids)
    check = compare_to_reference(out, level.reference(tokens, routing_weights, expert_ids), 2e-2)
    assert check.passed, check.message


@pytest.mark.parametrize("num_tokens, top_k, routing", [
    (1, 2, "random"),  # one token
    (16, 4, "random"),  # 64 pairs: the most aligned in registers
    (13, 4, "all_on_one"),  # 52 pairs on one expert: a run of several blocks, three experts idle
    (7, 4, "top_k_equals_experts"),
    (5, 2, "shared"),  # a shared expert: every token's third slot
])
def test_level_9_alignment_in_registers_matches_the_aligned_tensors(levels, monkeypatch, num_tokens, top_k, routing):
    """Up to IN_REGISTERS_MAX_PAIRS pairs each program of level 9's GEMMs aligns the pairs itself; the layer must be
    the one the alignment kernel's tensors give (forced here by lowering the limit to 0), and the reference's."""
    import level9_persistent_tma

    config = MoEConfig(hidden=100, intermediate=72, num_experts=4, top_k=top_k, name="registers",
                       num_shared_experts=int(routing == "shared"))
    weights = init_weights(config, "cpu")
    generator = torch.Generator().manual_seed(num_tokens)
    tokens = torch.randn((num_tokens, 100), generator=generator).bfloat16()
    expert_ids = torch.stack([torch.randperm(4, generator=generator)[:top_k] for _ in range(num_tokens)])
    if routing == "all_on_one":
        expert_ids[:] = 3
    routing_weights = torch.softmax(torch.randn((num_tokens, top_k), generator=generator), -1).bfloat16()
    level = levels["9"](config, weights)
    level.prepare()
    assert num_tokens * (top_k + config.num_shared_experts) <= moe_kernels.IN_REGISTERS_MAX_PAIRS
    in_registers = level.forward(tokens, routing_weights, expert_ids)
    monkeypatch.setattr(level9_persistent_tma, "IN_REGISTERS_MAX_PAIRS", 0)
    from_tensors = level.forward(tokens, routing_weights, expert_ids)
    torch.testing.assert_close(in_registers, from_tensors, atol=0, rtol=0)
    check = compare_to_reference(in_registers, level.reference(tokens, routing_weights, expert_ids), 2e-2)
    assert check.passed, check.message


@pytest.mark.parametrize("choice, value, num_tokens", [
    ("choose_split_k", 2, 5), ("choose_split_k", 3, 5), ("choose_programs_per_sm", 4, 37)])
def test_level_9_down_gemm_on_a_forced_grid_matches_reference(levels, monkeypatch, choice, value, num_tokens):
    """Level 9's down GEMM on grids a GPU picks only at other sizes, so forced here: split_k slices of the reduction
    (I = 72 is 3 steps of 32, so 2 slices are uneven and 3 give each one step), and four programs per SM (every
    tile still computed once, in uneven shares)."""
    monkeypatch.setattr(moe_kernels, choice, lambda *args: value)
    config = MoEConfig(hidden=100, intermediate=72, num_experts=4, top_k=2, name="grid")
    weights = init_weights(config, "cpu")
    generator = torch.Generator().manual_seed(value)
    tokens = torch.randn((num_tokens, 100), generator=generator).bfloat16()
    expert_ids = torch.stack([torch.randperm(4, generator=generator)[:2] for _ in range(num_tokens)])
    routing_weights = torch.softmax(torch.randn((num_tokens, 2), generator=generator), -1).bfloat16()
    level = levels["9"](config, weights)
    level.prepare()
    out = level.forward(tokens, routing_weights, expert_ids)
    check = compare_to_reference(out, level.reference(tokens, routing_weights, expert_ids), 2e-2)
    assert check.passed, check.message


@pytest.mark.parametrize("level_key", ["9", "10"])
def test_down_gemm_sums_over_k_at_decode_and_sets_its_counts_back(levels, monkeypatch, level_key):
    """At decode the down GEMM sums each token's K rows itself (the program storing a token's last row adds them);
    its counts must be back at 0 for the next forward, and the sum must be the one a separate kernel takes."""
    config = MoEConfig(hidden=100, intermediate=72, num_experts=4, top_k=3, name="sum")
    weights = init_weights(config, "cpu")
    level = levels[level_key](config, weights)
    level.prepare()
    for seed in (1, 2):
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randn((9, 100), generator=generator).bfloat16()
        expert_ids = torch.stack([torch.randperm(4, generator=generator)[:3] for _ in range(9)])
        routing_weights = torch.softmax(torch.randn((9, 3), generator=generator), -1).bfloat16()
        summed_in_kernel = level.forward(tokens, routing_weights, expert_ids)
        assert not level.arrivals.any()
        with monkeypatch.context() as patch:
            patch.setattr(level, "decode_arrivals", lambda routing_weights_TK: None)  # y [T, K, H], then a sum
            summed_apart = level.forward(tokens, routing_weights, expert_ids)
        # Within one bf16 step: the interpreter's bf16 cast truncates where torch's sum rounds.
        difference = (summed_in_kernel.float() - summed_apart.float()).abs()
        assert (difference <= 2**-7 * summed_apart.float().abs()).all()


def test_every_down_tile_is_as_wide_as_the_arrival_counts_assume():
    configs = (moe_kernels._persistent_configs(False, gate_up=False)
               + moe_kernels._fp8_configs(False, gate_up=False))
    assert min(config.kwargs["BLOCK_N"] for config in configs) >= moe_kernels.NARROWEST_TILE


# (pairs, experts, H, I): journey at 1 token, 1 pair, 64 and 8192 tokens; qwen3-moe at 1 token; mixtral at 1, 512 and
# 2048 tokens; deepseek-v3 (with its shared expert) at 64.
@pytest.mark.parametrize("num_pairs, num_experts, cols, depth, split_k", [
    (2, 8, 1024, 2048, 2), (1, 8, 1024, 2048, 4), (128, 8, 1024, 2048, 1), (16384, 8, 1024, 2048, 1),
    (8, 128, 2048, 768, 1), (2, 8, 4096, 14336, 2), (1024, 8, 4096, 14336, 2), (4096, 8, 4096, 14336, 1),
    (576, 257, 7168, 2048, 1)])
def test_split_k_only_where_the_tiles_are_few(num_pairs, num_experts, cols, depth, split_k):
    assert moe_kernels.choose_split_k(num_pairs, num_experts, cols, depth, programs=132) == split_k


# (pairs, experts, H, I): qwen3-moe at 1, 64, 512 and 2048 tokens; deepseek-v3 (its shared expert too) at 1 and 64;
# journey at 64; mixtral at 64 (split in two instead).
@pytest.mark.parametrize("num_pairs, num_experts, cols, depth, programs_per_sm", [
    (8, 128, 2048, 768, 1), (512, 128, 2048, 768, 4), (4096, 128, 2048, 768, 4), (16384, 128, 2048, 768, 1),
    (9, 257, 7168, 2048, 4), (576, 257, 7168, 2048, 4), (128, 8, 1024, 2048, 1), (128, 8, 4096, 14336, 1)])
def test_more_programs_per_sm_only_for_many_short_decode_tiles(num_pairs, num_experts, cols, depth, programs_per_sm):
    assert moe_kernels.choose_programs_per_sm(num_pairs, num_experts, cols, depth, sms=132) == programs_per_sm


def test_the_down_grid_rules_know_the_widest_down_tile():  # choose_split_k, choose_programs_per_sm
    assert max(config.kwargs["BLOCK_N"] for config in moe_kernels._persistent_configs(False, gate_up=False)) \
        == moe_kernels.WIDEST_DOWN_TILE


def test_tma_storage_pads_rows_not_shape():
    odd = torch.randn(3, 5, 36).bfloat16()  # 72-byte rows
    stored = moe_kernels.tma_storage(odd)
    assert stored.shape == odd.shape and torch.equal(stored, odd) and stored.stride(1) * 2 % 16 == 0
    even = torch.randn(3, 5, 64).bfloat16()
    assert moe_kernels.tma_storage(even).data_ptr() == even.data_ptr()  # aligned already: no copy


@pytest.mark.parametrize("torch_ops", [False, True], ids=["kernel", "torch ops (timed CPU rows)"])
def test_gather_sum_skips_missing_rows_and_accumulates(torch_ops):
    with moe_kernels.torch_ops_on_cpu() if torch_ops else contextlib.nullcontext():
        check_gather_sum()


def check_gather_sum():
    rows = torch.randn(7, 50).bfloat16()
    index = torch.tensor([[0, -1, 3], [-1, -1, -1], [6, 5, 4]])
    out = moe_kernels.gather_sum(rows, index, torch.empty(3, 50, dtype=torch.bfloat16))
    expected = torch.stack([rows[0].float() + rows[3].float(), torch.zeros(50), rows[4:].float().sum(0)])
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)
    base = torch.ones(3, 50, dtype=torch.bfloat16)
    torch.testing.assert_close(moe_kernels.gather_sum(rows, index, base.clone(), accumulate=True).float(),
                               expected + 1, atol=1e-2, rtol=1e-2)
    assert moe_kernels.gather_sum(rows, index[:0], torch.empty(0, 50)).shape == (0, 50)


@pytest.mark.parametrize("T, slots, H", [(1, 2, 64), (7, 9, 200), (33, 3, 1500)])  # H past one 1024-wide block
def test_sum_slots_is_the_fp32_sum_of_each_tokens_rows(T, slots, H):
    y = torch.randn(T, slots, H).bfloat16()
    out = moe_kernels.sum_slots(y)
    assert out.shape == (T, H) and out.dtype == torch.bfloat16
    # fp32 accumulation and one rounding to bf16 (the interpreter truncates where the GPU rounds: one bf16 step)
    torch.testing.assert_close(out.float(), y.float().sum(dim=1), atol=1e-2, rtol=2 ** -7)


@pytest.mark.parametrize("level_key", ["9", "10"])
def test_prefill_alignment_in_two_launches_leaves_its_counters_for_the_next_forward(levels, monkeypatch, level_key):
    """Past ONE_PROGRAM_MAX_PAIRS pairs levels 9 and 10 align in two launches whose counters are kept between
    forwards (the count's last program sets them back to zero): forced here at a few pairs, two forwards in a row
    with different routing (an idle expert, a crowded one, a shared expert) must each match the reference."""
    import level9_persistent_tma
    import level10_fp8

    for module in (level9_persistent_tma, level10_fp8):
        monkeypatch.setattr(module, "ONE_PROGRAM_MAX_PAIRS", 0, raising=False)
    monkeypatch.setattr(level9_persistent_tma, "IN_REGISTERS_MAX_PAIRS", 0)
    config = MoEConfig(hidden=100, intermediate=72, num_experts=5, top_k=2, name="two launches",
                       num_shared_experts=1)
    weights = init_weights(config, "cpu")
    level = levels[level_key](config, weights)
    level.prepare()
    for seed, idle, crowded in ((1, 4, 0), (2, 0, 3)):
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randn((37, 100), generator=generator).bfloat16()
        allowed = torch.tensor([e for e in range(5) if e != idle])
        expert_ids = torch.stack([allowed[torch.randperm(4, generator=generator)[:2]] for _ in range(37)])
        expert_ids[:12, 0] = crowded
        expert_ids[:12, 1] = (crowded + 1) % 5 if (crowded + 1) % 5 != idle else (crowded + 2) % 5
        routing_weights = torch.softmax(torch.randn((37, 2), generator=generator), -1).bfloat16()
        out = level.forward(tokens, routing_weights, expert_ids)
        check = compare_to_reference(out, level.reference(tokens, routing_weights, expert_ids), 2e-2)
        assert check.passed, check.message
        experts = config.num_experts + config.num_shared_experts
        assert not level.alignment_counters[:experts].any() and level.alignment_counters[2 * experts] == 0
