"""Level 10: FP8 experts. Level 9's layer with e4m3 operands: half the bytes per weight, twice the tensor-core rate.

The idea
    An H100's tensor cores multiply e4m3 (FP8: 1 sign, 4 exponent, 3 mantissa bits) at twice their bf16 rate
    (measured, dense 8192³: NOTES.md), and an e4m3 weight is one byte where bf16 is two. Level 9's kernels with
    FP8 operands, accumulating in fp32:
    1. Weights, once in prepare(): e4m3 values with one fp32 scale per output column (amax over the reduction /
       448), stored K-major, [E, cols, depth], the layout Hopper's FP8 instruction reads (moe_model.Fp8Experts).
       Per column rather than in 128×128 blocks (DeepSeek-V3's checkpoints): a column's scale is constant along
       the reduction, so it multiplies the finished fp32 accumulator once, in the epilogue, and the main loop stays
       level 9's; blocks would need a scale per step, and random weights have no outlier blocks to isolate.
    2. Tokens, every forward: one small kernel quantizes each token row with its own scale (read T·H·2 bytes,
       write T·H + 4·T; at decode in the alignment's launch, below); the gate/up kernel gathers the e4m3 rows as
       level 9 gathers bf16 ones.
    3. Gate/up epilogue: the fp32 accumulator times the token's scale and the column's, then SiLU·up, written in
       bf16 as level 9 writes it, by one TMA store (1.4-2.5% off the prefill forward on an H100, NOTES.md).
    4. The hidden, quantized as the tokens are, by the same kernel: one scale per row (read P·I·2 bytes, write
       P·I + 4·P). No gate/up tile sees a whole row, hence the pass. What it buys: every scale of the down GEMM is
       now constant along its reduction, so its main loop is one unbroken chain on the tensor cores and the row's
       scale, the column's and the routing weight all wait for the epilogue. The alternative, a scale per
       128-column tile quantized in the gate/up epilogue (DeepSeek-V3's activation blocks), saves the pass but
       makes the down kernel scale each 128-deep step's partial product before adding it, and the tensor cores
       wait for every step: that down kernel ran at 780 TF/s on an H100 where the gate/up kernel ran at 1370 (NOTES.md).
    Everything else is level 9's (persistent grid, TMA tiles, shared experts fused, one CUDA graph) but three
    things at decode. The alignment always has a launch of its own, since the tokens' quantization needs one and
    shares it (level 9 aligns up to IN_REGISTERS_MAX_PAIRS pairs in registers). The down GEMM has no split-K. And
    the tile list has 256-deep shapes: a K-major weight tile reads each weight row in runs of BLOCK_D bytes, so
    256-deep steps read 256 contiguous bytes as level 9's 128-deep bf16 steps do (mixtral at one token 179 → 168
    µs on an H100, NOTES.md).

Why it should beat level 9, counted
    Prefill: the same FLOPs at up to twice the rate; the GEMMs' operands halve (weights, gathered rows and the
    down GEMM's hidden, one byte each). The hidden's pass takes some of that back: the gate/up epilogue writes it
    in bf16 (2 bytes an element), the pass reads that and writes e4m3 (2 + 1), the down GEMM reads 1: 6 bytes an
    element against level 9's 4. Decode: the layer reads the touched experts' weights and little else, and those
    bytes halve: mixtral at one token reads 2 experts × 3·H·I = 352 M weights, 705 MB in bf16 and 352 MB in e4m3,
    about 0.23 against 0.12 ms at 3 TB/s.
    Launches: level 9's graph plus two quantizations (tokens, hidden): 7 kernels (11 with a shared expert) at
    prefill, replayed by one launch (and the inputs' copy before it, called from outside a graph). At decode the
    tokens' quantization shares the one-program alignment's launch (program 0 aligns, the others quantize: neither
    reads what the other writes) and the down GEMM sums over K as level 9's does, 4 (8): mixtral at one token
    168 → 161 µs on an H100 (NOTES.md). Syncs: none.

Why store the weights in FP8 (the seed's "native FP8 weights: works, but no speedup observed at 8K")
    Converting bf16 weights to e4m3 inside every forward reads 2 bytes and writes 1 per weight before the GEMM reads the
    byte again: 4 bytes per weight against bf16's 2. On an H100, quantize_fp8 as torch ops took 10.3 ms for mixtral's
    gate weights alone (0.47 G weights; NOTES.md), about 31 ms for all three projections, against 9.8 ms for this whole
    layer at 16384 tokens in the published sweep; even a fused conversion would move 4.2 GB, about 1.4 ms at 3 TB/s, 9x
    that sweep's one-token forward. Stored once in FP8 the weights cost 1 byte per forward, and then FP8 pays twice: at
    prefill the tensor-core rate (1.74x and 1.70x level 9 on mixtral and deepseek-v3 at 16384 tokens in the published
    sweep on one H100, 1.50x on qwen3-moe, whose short reductions leave the bf16 bytes of y, its sum and the hidden's
    pass a larger share), at decode the halved weight bytes (mixtral at one token 150.4 µs against level 9's 253.4). The
    numbers and what holds them below 2x: NOTES.md ("Level 10").

What it costs
    Accuracy: each e4m3 value is off by up to half a step, 2^-4 of its magnitude, on the tokens, the weights and the
    hidden; the row's `quant_err` is the output's error against the bf16 layer's fp32 reference (6.6-7.0% on these
    random weights in the published sweep, 6.4-6.6% on the FP8 peer's rows), while `rel_err` checks the kernels against
    a reference computed on the same quantized values (0.8-1.5% at prefill: Hopper's FP8 instruction adds at reduced
    precision across the whole reduction; promoting to fp32 after every 128-deep step cut that to 0.4% and cost a third
    of the speed, so it is not done). Finer scales (one per 128 weights along the reduction, or per 32 as MX formats do)
    cut the error where magnitudes vary inside a column, as in real checkpoints whose outlier channels stretch a
    per-column scale; they cost a scale multiply per step. Hardware: level 9's, a Hopper GPU (FP8 alone would take
    sm_89). Memory: one byte per weight plus 4 per column, beside the bf16 weights the harness keeps for the other
    levels; the hidden twice, in bf16 and in e4m3. Decode: two more launches in the graph than level 9's two (the
    alignment with the tokens' quantization, and the hidden's pass), so at one token on journey, whose weights are few,
    level 10 is no faster than level 9 (30.4 against 28.3 µs on one H100 in `20261126T162834Z`, both host-bound).

Run: python labs/moe_optimization_journey/level10_fp8.py [--preset mixtral] [--tokens 16384] [--device cuda]
"""

import torch
from level7_triton_grouped import PADDED_ROWS
from level9_persistent_tma import PersistentTmaLevel
from moe_benchmark import Claims, run_level_script

import moe_kernels
from moe_kernels import (ONE_PROGRAM_MAX_PAIRS, align_and_quantize_tokens, choose_block_m, moe_down_fp8,
                         moe_gate_up_fp8, quantize_rows, tma_storage)
from moe_model import Fp8Experts, fp8_layer_weights, fp8_round_trip, reference_forward

# hidden [P, I] bf16, its e4m3 values [P, I] and row scales [P] fp32, y [N, H], the tokens [T, H] in e4m3 and their
# scales [T] fp32.
FP8_INTERMEDIATES_BYTES = f"{PADDED_ROWS}*(2*I + I + 4) + T*(K + S)*H*bytes + T*(H + 4)"


class Fp8Level(PersistentTmaLevel):
    level = 10
    name = "fp8"
    summary = "level 9 with FP8 (e4m3) operands: a scale per weight column, per token and per hidden row"
    fp8 = True
    # Level 9's kernels, and two quantizations (the tokens, the hidden); at decode the tokens' rides in the
    # alignment's launch.
    claims = Claims(launches=f"4 + 3*(T*(K + S) > {ONE_PROGRAM_MAX_PAIRS}) + 4*min(S, 1)", syncs="0",
                    extra_bytes=f"({FP8_INTERMEDIATES_BYTES}, 2*({FP8_INTERMEDIATES_BYTES}) + 24*2**20)")

    def prepare(self):
        # Level 9's, its check for a Hopper GPU included: gate|up interleaved [E, H, 2I] and down [E, I, H], shared
        # experts appended.
        super().prepare()
        self.w13 = self.quantize(self.w13_interleaved_EH2I)  # [E, 2I, H] e4m3 and [E, 2I] scales
        self.w_down = self.quantize(self.w_down_EIH)  # [E, H, I] e4m3 and [E, H] scales
        del self.w13_interleaved_EH2I, self.w_down_EIH  # the bf16 copies: not read here

    @staticmethod
    def quantize(w_EDC: torch.Tensor) -> Fp8Experts:
        experts = Fp8Experts.quantize(w_EDC)
        return Fp8Experts(tma_storage(experts.values_ECD), experts.scales_EC)  # TMA: rows of whole 16 bytes

    def align(self, tokens_TH, expert_ids_TK, num_experts):
        """Level 9's alignment, and the tokens in e4m3 with a scale each: at decode one launch does both (program 0
        aligns, the others quantize; never level 9's alignment in registers, which would leave the quantization a
        launch of its own), at prefill the quantization is one launch of its own."""
        num_pairs = expert_ids_TK.numel()
        if num_pairs > ONE_PROGRAM_MAX_PAIRS:
            alignment, _ = super().align(tokens_TH, expert_ids_TK, num_experts)
            return alignment, quantize_rows(tokens_TH)
        alignment, x_values_TH, x_scales_T = align_and_quantize_tokens(
            expert_ids_TK, num_experts, choose_block_m(num_pairs, num_experts), tokens_TH)
        return alignment, (x_values_TH, x_scales_T)

    def gate_up(self, tokens, alignment, K):
        x_values_TH, x_scales_T = tokens  # [T, H] e4m3 and [T] fp32
        return moe_gate_up_fp8(x_values_TH, x_scales_T, self.w13, alignment, K)

    def down(self, hidden_PI, routing_weights_TK, alignment):
        # One launch, as for the tokens; the rows past the alignment's padded length hold nothing.
        hidden_values_PI, hidden_scales_P = quantize_rows(hidden_PI, rows_used=alignment.num_padded)
        return moe_down_fp8(hidden_values_PI, hidden_scales_P, self.w_down, routing_weights_TK, alignment,
                            arrivals=self.decode_arrivals(routing_weights_TK))

    def reference(self, tokens_TH, routing_weights_TK, expert_ids_TK):
        """The layer in fp32 on the values the kernels multiply: the tokens' e4m3 round trip, the dequantized
        weights, and SiLU·up stored in bf16, then rounded through e4m3 (activations: a power-of-two scale per
        row)."""
        gate, up = self.w13.select(cols=slice(0, None, 2)), self.w13.select(cols=slice(1, None, 2))  # interleaved
        weights = fp8_layer_weights(self.weights.router_HE, gate, up, self.w_down, self.config.num_experts)
        return reference_forward(fp8_round_trip(tokens_TH, power_of_two=True), weights, routing_weights_TK,
                                 expert_ids_TK,
                                 round_hidden=lambda hidden: fp8_round_trip(hidden.bfloat16(), power_of_two=True))

    def after_first_call(self):
        return moe_kernels.describe_tuned_configs(moe_kernels._moe_gate_up_fp8_kernel,
                                                  moe_kernels._moe_down_fp8_kernel)


if __name__ == "__main__":
    run_level_script(Fp8Level)
