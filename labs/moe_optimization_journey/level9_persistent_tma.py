"""Level 9: persistent TMA kernels. Level 8's layer, with its two GEMMs rebuilt for Hopper.

The idea
    Level 8 runs level 7's kernels from one CUDA graph, and at large T they sit at 56-88% of the H100's measured
    bf16 rate (the published sweep, from 8192 tokens). Three things hold them there, and Hopper has an answer to
    each; a fourth holds the decode sizes:
    1. Launch shape. Level 7 launches one program per output tile of the most padding T could need: at `journey` with
       8192 tokens, 128-row tiles and 128-wide columns, 136 row blocks × 16 column blocks = 2176 programs over 132 SMs
       (those past the routing's padded rows, about 64 here, return at once), and every program pays its own prologue. A
       persistent grid has one program per SM, each looping over tiles (`for tile in tl.range(program, tiles,
       NUM_PROGRAMS, flatten=True)`): one prologue per SM, and the tile count read on the device from the alignment, so
       no program even visits padding-only tiles. What it does not remove is the tail: the tiles still come in waves of
       132 (the gate/up GEMM at journey's 8192 tokens: about 132 row blocks × 16 = 2112 tiles, 16 waves; the down GEMM
       at qwen3-moe's 64 tokens: 1000 tiles, so 76 programs take an eighth tile while 56 wait, NOTES.md; there it runs
       four programs per SM, below). `flatten=True` lets Triton pipeline the loop over tiles and the loop over depth as
       one, so a tile's epilogue overlaps the next tile's first loads (+6% on qwen3-moe's short reductions, within
       the spread on mixtral: NOTES.md). The tiles run in groups of up to GROUP_M row blocks of one expert, column by
       column, so that the programs running at once share each weight tile in L2 (`_persistent_tile`). Level 7's
       groups count from row 0 and cross from one expert's run into the next, whose weight tiles the next group
       then reads again from memory: at deepseek-v3's 16384 tokens (5 row blocks an expert) its down GEMM took 6.9
       to 15 ms from one forward to the next on an H100, and 6.4 to 7.6 with groups kept within runs (NOTES.md).
    2. Address arithmetic and no asynchronous copy for the weights. Level 7 computes a pointer per weight element
       and loads through the threads. Here each [BLOCK_D, BLOCK_N] weight tile comes by TMA: a tensor descriptor
       `[E, depth, cols]`, made once on the host and recorded with the launch (`tma_descriptor`), and the copy
       engine fetches the box while the warps do the math; past an expert's last row it fills zeros, so any H or I
       works. The gathered token rows still come by pointer loads (their order is the routing's; TMA gather is
       Blackwell-only). The down GEMM's activations are already sorted, so they come by TMA too. So does the gate/up
       GEMM's output: hidden's rows are in the aligned order, and its tile goes out by one TMA store that the warps
       issue and leave, where a pointer store held them until it was written (journey at 8192 tokens −3%, 32768
       −5%, mixtral 16384 −2.6%, qwen3-moe 16384 the same, decode the same; an H100, NOTES.md).
    3. Tile width. Level 7's gate/up tile keeps two fp32 accumulators (gate and up), so it stops at 128 columns of
       each. Interleaving gate and up column by column in one [E, H, 2I] tensor (prepare(), once) makes it one
       accumulator 2·BLOCK_N wide: at BLOCK_N = 128, one wgmma per step on 256 columns (the widest one
       instruction takes), split into gate and up in the epilogue.
    4. Launches at decode. With a few tokens the layer only has to read the touched experts' weights (journey at T=1: 2
       experts × 3·H·I × 2 bytes = 25 MB, about 8 µs at the spec sheet's 3.35 TB/s), and level 8's graph spends longer
       than that on launching: 5 launches align the pairs, and each of its 8 nodes leaves a gap. Level 9 takes them out
       one at a time (journey at T=1 on an H100, before → after, each step its own A/B in NOTES.md but the first, read
       from the sweep that brought it):
       - The alignment in one program up to ONE_PROGRAM_MAX_PAIRS pairs (`align_tokens(..., one_program=True)`):
         the same count, offsets and placement, a barrier among its threads where a kernel boundary stood. With
         it, narrow column tiles (16-32 wide) that keep every SM reading weights, and split-K in the down GEMM
         where even those would leave half the SMs idle (`choose_split_k`; journey: 2 experts × 1024/32 = 64
         tiles for 132 SMs): level 8's 47.2 → 44.0 µs (sweep `20261125T234035Z`).
       - Not kept: Hopper's programmatic dependent launch (each GEMM launched while the kernel before it still
         ran). It saved 2.5 µs at one token while an alignment kernel remained there, but launched early the
         gate/up GEMM's deeper tiles ran 4-10% slower at 64 tokens (mixtral: 1085 µs a forward against 1016); why
         is open (NOTES.md). Every launch is plain.
       - The sum over K, a 3 µs kernel for 2 rows: the down GEMM does it. Each program, its tile's rows stored,
         counts one arrival per row at (token, column tile) with an atomic add; the program whose count is a
         token's last reads that token's rows back from L2 and stores their sum (`_sum_if_last`; the counts,
         zeroed once in prepare(), are set back to 0 by the program that used them): 40.8 → 38.3.
       - The descriptors made on the host (item 2), so that no program writes and fences its own before its
         first load, and the graph's three inputs copied by one launch (level 5's `CapturedGraph`, which level 8
         got at the same time): 38.5 → 30.2-30.8.
       - No alignment launch at all up to IN_REGISTERS_MAX_PAIRS pairs (64: up to 32 tokens on journey and
         mixtral, 8 on qwen3-moe, 7 on deepseek-v3 with its shared expert). Each program of both GEMMs loads the
         pairs' experts and compares every pair with every other in registers ([64, 64] comparisons, no memory,
         no barrier): a pair's row is its expert's run start (the padded runs of the smaller expert ids present)
         plus its rank in the run (`_align_in_registers`). The graph holds 2 kernels: 30.0 → 27.5 (deepseek-v3
         307 → 305).
       Now the host is as slow as the GPU: issuing a forward from outside a graph (the inputs' copy through
       Triton's launcher, then the replay) took it 24-27 µs in an A/B (NOTES.md) and 30-69 µs in the sweeps that
       timed it so (their `host_ms`), so back to back the host sets the pace (level 5's
       copy checks its tensors once per capture, not per call, or it would be 40). The benchmark times the layer
       as a graph of the whole model runs it, the replay alone (level 5's "Where the inputs live": 33 → 28.6 µs
       in the A/B); each row records the host's time to issue it, `host_ms`.
       Past ONE_PROGRAM_MAX_PAIRS the decode sum's trick (count the arrivals; the last program does the serial
       step and leaves the counts as it found them) cuts three of the alignment's five launches: the count's last
       program runs the offsets, the place kernel marks the padding rows, and the counters, kept between calls,
       are left zero, so neither fill is left (`align_tokens(..., counters=...)`): the alignment graphed 14.5 →
       11.6 µs at journey's 8192 tokens, 39.2 → 36.5 at deepseek-v3's 16384, and journey's forward at 2048 tokens
       1.7% faster (an H100, NOTES.md).
    Everything else is level 8's: device-side alignment, SiLU·up and the routing weight in the epilogues, shared
    experts as extra experts, no host sync, the whole layer in one CUDA graph.

Why it should be faster than level 8, counted
    Same FLOPs, and the same bytes but for split-K's partial rows at decode. What changes is how close to the tensor
    cores' rate the GEMMs run: one prologue per SM instead of one per tile, weight loads and a hidden store that cost
    the threads nothing, and twice the work per wgmma instruction on the gate/up side. At decode sizes (a few rows per
    expert) the layer is bound by reading weights; the autotuner picks the tile width per size class (32-128 columns
    at one token, up to 256 from 64 tokens, from a list that starts at 16), and split-K spreads the reads over the SMs
    where even the narrowest tiles would leave half of them idle, and in two slices where the widest tiles make at
    most two rounds over a long reduction (`choose_split_k`: mixtral at 1 to 512 tokens, 1-3% faster on an H100,
    where the last round had held a fraction of the SMs). Where short reductions make many narrow tiles (qwen3-moe
    at 64 and 512 tokens, deepseek-v3 at 1 to 512) one program per SM keeps too few weight bytes in flight, so the
    down GEMM launches four per SM, and as many run at once as fit (`choose_programs_per_sm`: qwen3-moe at 64
    tokens 3.7% faster on an H100, deepseek-v3 0.6-0.8%; level 8's grid of small programs had led both). Launches:
    5 kernels in the graph (9 with a shared expert) at prefill, where level 8 has 8 (12); 3 (7) up to
    ONE_PROGRAM_MAX_PAIRS pairs, 2 (6) up to IN_REGISTERS_MAX_PAIRS; one graph launch, no sync (and one for the
    inputs' copy, called from outside a graph).

What it costs
    Hopper's instructions (TMA and wgmma: compute capability 9.0, the only GPUs it was run on; on an older GPU its
    rows say `skipped`); a second copy of the gate and up weights in the interleaved layout, made once; TMA's rule
    that row strides be 16-byte aligned (`tma_storage` pads a row's storage, not its shape, where H or I needs
    it); a descriptor box per tile shape, which each autotune config sets before it launches (made on the device
    instead, `tl.make_tensor_descriptor`, every program wrote and fenced its own descriptors at the kernel's start:
    3-4 µs of a one-token forward on an H100, NOTES.md). The
    decode sum's counts: 4 bytes per token and 16 columns, for up to ONE_PROGRAM_MAX_PAIRS tokens (3.7 MB at
    H = 7168), kept between calls, and the alignment's counters (3E + 1 ints). On the CPU it runs in Triton's
    interpreter, which executes tensor descriptors too: checked there, not timed.

Where it stops
    Its yardstick, OpenAI's triton_kernels (`matmul_ogs`, persistent TMA kernels of the same design), runs beside it
    where installed (peer-ogs): on one H100 level 9 led it in 26 of 28 cells, by 19-32% at journey's, qwen3-moe's
    and deepseek-v3's prefill bar cells, and the two were level at mixtral (0.98-1.06x; README). At mixtral's
    16384 tokens each GEMM runs at the rate a bare kernel of its design reaches on an H100 (gate/up 685 TF/s against
    700, down 727 against 717-721), and that is cuBLAS's rate on these shapes: given all the rows as one dense
    matrix, with none of MoE's gather, padding or sum, cuBLAS ran mixtral's two GEMMs at 684 TF/s on a heated H100,
    the down one alone at 712-716 on a cooler one (NOTES.md; the harness's ceiling, an 8192³ matmul at a run's
    start, is a cool card's square GEMM). The harness now times those dense GEMMs in turn with the levels: in the
    seven H100 sweeps with it the whole of level 9 ran at 94-100% of them at mixtral's 16384 tokens. Warp
    specialization did not add to it: written by hand in Gluon, a warp that issues every TMA load beat neither
    Triton's own pipeline nor the same kernel without it, and Triton 3.6's `warp_specialize=True` stops the compiler
    on level 9's loops. What is left is MoE's own work. At journey's 8192 tokens the gathered gate/up GEMM took 221
    µs where cuBLAS's dense one takes 203 (before its hidden went by TMA), the down GEMM 121 against 98, and the
    inputs' copy, the alignment and the sum 43 µs more. The tiles also compute level 7's padding (11.5% more rows
    than pairs at deepseek-v3's 16384 tokens): 64-row tiles, with half of it, ran 13-34% slower at the four prefill
    cells (each weight tile then serves half as many rows, NOTES.md).

Run: python labs/moe_optimization_journey/level9_persistent_tma.py [--preset journey] [--tokens 8192] [--device cuda]
"""

import torch
from level7_triton_grouped import PADDED_HIDDEN_AND_Y_BYTES
from level8_triton_graphed import TritonGraphedLevel
from moe_benchmark import Claims, LevelUnavailable, run_level_script

import moe_kernels
from moe_kernels import (IN_REGISTERS_MAX_PAIRS, ONE_PROGRAM_MAX_PAIRS, PairsToAlign, alignment_counters,
                         align_tokens, arrival_counts, choose_block_m, interleave_gate_up, moe_down_persistent,
                         moe_gate_up_persistent, tma_storage)


class PersistentTmaLevel(TritonGraphedLevel):
    level = 9
    name = "persistent_tma"
    summary = "level 8 with persistent Hopper GEMMs: TMA weight tiles, gate|up interleaved into one wide accumulator"
    # Level 8's kernels, but the alignment: 2 of them, not 5; up to ONE_PROGRAM_MAX_PAIRS pairs 1, and the down
    # GEMM sums over K itself; up to IN_REGISTERS_MAX_PAIRS none (the GEMMs align).
    claims = Claims(launches=f"2 + (T*(K + S) > {IN_REGISTERS_MAX_PAIRS}) + 2*(T*(K + S) > {ONE_PROGRAM_MAX_PAIRS})"
                             " + 4*min(S, 1)", syncs="0",
                    extra_bytes=f"({PADDED_HIDDEN_AND_Y_BYTES}, 2*({PADDED_HIDDEN_AND_Y_BYTES}) + 24*2**20)")

    def prepare(self):
        if self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) < (9, 0):
            raise LevelUnavailable("TMA and wgmma need a Hopper GPU (compute capability 9.0) or newer")
        super().prepare()  # level 7's [E, H, 2I] gate|up (shared experts appended) and level 8's graph
        _, H, two_I = self.w13_EH2I.shape
        # Column 2j is gate j, column 2j + 1 is up j: one accumulator holds both, split in the epilogue.
        self.w13_interleaved_EH2I = tma_storage(interleave_gate_up(*self.w13_EH2I.split(two_I // 2, dim=2)))
        self.w_down_EIH = tma_storage(self.w_down_EIH)
        del self.w13_EH2I  # level 7's layout: not read here
        # Decode: the down GEMM sums each token's rows itself, counting their arrivals here (zeroed once).
        self.arrivals = arrival_counts(ONE_PROGRAM_MAX_PAIRS, H, self.device)
        # Prefill: the alignment's counts, cursors and arrivals, zeroed once and left zero by each call.
        self.alignment_counters = alignment_counters(self.config.num_experts + self.config.num_shared_experts,
                                                     self.device)

    def align(self, tokens_TH, expert_ids_TK, num_experts):
        num_pairs = expert_ids_TK.numel()
        block_m = choose_block_m(num_pairs, num_experts)
        if num_pairs <= IN_REGISTERS_MAX_PAIRS:  # no launch: each GEMM program aligns the pairs itself
            return PairsToAlign.of(expert_ids_TK, num_experts, block_m), tokens_TH
        if num_pairs <= ONE_PROGRAM_MAX_PAIRS:  # 1 launch, not 5
            return align_tokens(expert_ids_TK, num_experts, block_m, one_program=True), tokens_TH
        return align_tokens(expert_ids_TK, num_experts, block_m, counters=self.alignment_counters), tokens_TH  # 2

    def gate_up(self, tokens_TH, alignment, K):
        return moe_gate_up_persistent(tokens_TH, self.w13_interleaved_EH2I, alignment, K)

    def down(self, hidden_PI, routing_weights_TK, alignment):
        return moe_down_persistent(hidden_PI, self.w_down_EIH, routing_weights_TK, alignment,
                                   arrivals=self.decode_arrivals(routing_weights_TK))

    def decode_arrivals(self, routing_weights_TK):
        """The counts that make the down GEMM sum over K itself (y [T, 1, H]), up to ONE_PROGRAM_MAX_PAIRS pairs:
        there the sum's own launch costs more than its work. Past that, none: y [T, K, H] and a sum."""
        return self.arrivals if routing_weights_TK.numel() <= ONE_PROGRAM_MAX_PAIRS else None

    def after_first_call(self):
        return moe_kernels.describe_tuned_configs(moe_kernels._moe_gate_up_persistent_kernel,
                                                  moe_kernels._moe_down_persistent_kernel)


if __name__ == "__main__":
    run_level_script(PersistentTmaLevel)
