"""Level 7: one Triton grouped GEMM for all experts. Token alignment on the device, two launches, no host sync.

The idea
    Levels 4 to 6 run one cuBLAS GEMM per expert, cut by host-side counts (a sync), with the permutation and the
    combine as separate passes over memory. Here the expert work is two Triton kernel launches whatever E is:
    1. Token alignment (`align_tokens`, three small Triton kernels): group the T·K (token, slot) pairs by expert
       (a histogram, a padded running sum, an atomic cursor per expert) and pad each expert's run to a multiple
       of the tile height BLOCK_M with a sentinel. Every BLOCK_M rows of the sorted list now belong to one
       expert, and the padded list is at most T·K + E·(BLOCK_M − 1) long: a size the host knows from T alone, so
       the grid is fixed and nothing waits for the device's counts.
    2. Gate/up kernel: each program computes one BLOCK_M × BLOCK_N tile of one expert's product. It reads its
       expert id and its rows' token ids from the alignment, loads those token rows straight from tokens_TH (the
       permutation happens inside the GEMM's loads, not as a separate gather), multiplies by both halves of the
       expert's [H, 2I] gate|up weights, and applies SiLU·up to the fp32 accumulators before it writes: the
       un-activated projections never reach memory.
    3. Down kernel: the same tiling over the activations [padded rows, I] and w_down; the epilogue multiplies
       each row by its routing weight and writes it back in (token, slot) order, so the combine is one sum over
       K. (fp32 atomic adds straight into the output were measured too, and were slower: NOTES.md.)
    Tile shapes are autotuned (`triton.autotune`) per (cols, depth, BLOCK_M, pair-count class).

Why it should be faster than levels 4-6
    Launches: 2 GEMM kernels, 3 alignment kernels, 2 fills and the sum, against 3·E GEMMs and a dozen more
    kernels; with E = 128 or 256 that is the difference between a few dozen and several hundred launches.
    Syncs: none (level 4 has one per forward, and the CPU then waits for the GPU before it can issue the GEMMs).
    Bytes: the [T·K, H] gathered copy of the tokens and the [T·K, I] gate and up projections are never written.
    FLOPs: the padding adds at most E·(BLOCK_M − 1) rows, about E·BLOCK_M/2: with the uniform router at the
    prefill sizes, 1.6% more rows on mixtral (16384 tokens), 3.1% on journey (8192), 6.7% on qwen3-moe and
    11.5% on deepseek-v3 (16384: 512 rows an expert). The tensor cores compute them; the FLOPs counted do not.
    With no sync, the whole layer can also be recorded in a CUDA graph: that is level 8. What an H100 measured,
    against `torch._grouped_mm`, per preset and version of the kernels: NOTES.md.

Shared experts
    Fused: each becomes one more expert of the grouped GEMM that every token picks with weight 1, so the dense
    MLP runs in the same two launches as the routed experts (the other levels add it as a separate dense MLP).

What it costs
    Our own GEMM kernels to keep correct and tuned (autotuning takes seconds per shape class on first use, outside
    the timing); a concatenated [E, H, 2I] copy of the gate and up weights made once in `prepare()`; and the
    padding. Triton runs on NVIDIA and AMD GPUs, and on the CPU only in its interpreter.

Run: python labs/moe_optimization_journey/level7_triton_grouped.py [--preset journey] [--tokens 8192] [--device cuda]
"""

import torch
from moe_benchmark import Claims, MoELevel, run_level_script, stage

import moe_kernels
from moe_kernels import align_tokens, choose_block_m, moe_down, moe_gate_up, sum_slots
from moe_model import MoEConfig


# P = N + (E + S)·(BLOCK_M − 1) padded rows at most, N = T·(K + S) pairs; hidden [P, I], y [N, H].
PADDED_ROWS = "padded_rows(T*(K + S), E + S)"
PADDED_HIDDEN_AND_Y_BYTES = f"{PADDED_ROWS}*I*bytes + T*(K + S)*H*bytes"


def route_to_shared_experts(routing_weights_TK: torch.Tensor, expert_ids_TK: torch.Tensor,
                            config: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing with S more slots per token, [T, K + S]: every token also picks each shared expert, numbered
    E … E+S−1 after the routed ones, with weight 1 (4 launches: the ids, the weights and their two joins). Without
    shared experts the routing is returned as it is."""
    if not config.num_shared_experts:
        return routing_weights_TK, expert_ids_TK
    T, E = expert_ids_TK.shape[0], config.num_experts
    shared_ids_TS = torch.arange(E, E + config.num_shared_experts, device=expert_ids_TK.device).expand(T, -1)
    shared_weights_TS = routing_weights_TK.new_ones(shared_ids_TS.shape)
    return (torch.cat([routing_weights_TK, shared_weights_TS], dim=1),
            torch.cat([expert_ids_TK, shared_ids_TS], dim=1))


class TritonGroupedLevel(MoELevel):
    level = 7
    name = "triton_grouped"
    summary = "device-side token alignment + two Triton grouped-GEMM kernels (fused SiLU·up, weighted combine)"
    # Alignment: 3 kernels and 2 fills; the two GEMMs; the sum over K (8). Shared experts: 4 more (their ids and
    # weights joined to the routing). Memory: hidden [P, I], P = N + (E + S)·(BLOCK_M − 1) padded rows, and y [N, H].
    claims = Claims(launches="8 + 4*min(S, 1)", syncs="0", extra_bytes=PADDED_HIDDEN_AND_Y_BYTES)
    interpreter_only = True

    @classmethod
    def skip_reason(cls, config, num_tokens):
        pair_work = num_tokens * (config.top_k + config.num_shared_experts) * config.hidden * config.intermediate
        if moe_kernels.interpreting() and pair_work > 2**25:  # one check: a few seconds up to here
            return ("checking it in the Triton interpreter would take tens of seconds at this size (the tests and "
                    "the smaller sizes check it on the CPU); run it on a GPU")
        return None

    def prepare(self):
        w = self.weights
        # Gate and up side by side, [E, H, 2I]: one weight tensor, read by one kernel. Shared experts, if any,
        # become experts E … E+S−1 of the same tensors, so the grouped GEMM runs them with the routed ones.
        gate = torch.cat([w.w_gate_EHI, w.w_shared_gate_SHI])
        up = torch.cat([w.w_up_EHI, w.w_shared_up_SHI])
        self.w13_EH2I = torch.cat([gate, up], dim=2).contiguous()
        self.w_down_EIH = torch.cat([w.w_down_EIH, w.w_shared_down_SIH]) if self.config.num_shared_experts \
            else w.w_down_EIH

    def forward(self, tokens_TH, routing_weights_TK, expert_ids_TK):
        E = self.config.num_experts + self.config.num_shared_experts
        with stage("permute"):
            routing_weights_TK, expert_ids_TK = route_to_shared_experts(routing_weights_TK, expert_ids_TK, self.config)
            K = expert_ids_TK.shape[1]
            alignment, gate_up_input = self.align(tokens_TH, expert_ids_TK, E)
        # SiLU·up runs in the gate|up kernel's epilogue and the routing weight in the down kernel's: no stage of
        # their own.
        with stage("expert GEMMs"):
            hidden_PI = self.gate_up(gate_up_input, alignment, K)
            y_TKH = self.down(hidden_PI, routing_weights_TK, alignment)
        with stage("combine"):
            # One Triton kernel: read T·K·H·2 bytes, write T·H·2 (torch's y.sum(dim=1), reducing across a middle
            # dimension of K, moved them at 1.3 TB/s on an H100: moe_kernels.py). A sum over one row per token
            # would be a full copy. (Level 9 may split each slot's row in partial rows, y [T, K·split, H]: the
            # same sum adds them.)
            out_TH = sum_slots(y_TKH) if y_TKH.shape[1] > 1 else y_TKH[:, 0]
        return out_TH

    def align(self, tokens_TH, expert_ids_TK, num_experts):
        """The alignment, and the tokens as the gate/up GEMM reads them: here as they are (level 10 quantizes them,
        at decode in the alignment's launch)."""
        block_m = choose_block_m(expert_ids_TK.numel(), num_experts)
        return align_tokens(expert_ids_TK, num_experts, block_m), tokens_TH  # 3 kernels and 2 fills

    def gate_up(self, tokens_TH, alignment, K):
        return moe_gate_up(tokens_TH, self.w13_EH2I, alignment, K)  # one launch; 2 accumulators per tile

    def down(self, hidden_PI, routing_weights_TK, alignment):
        return moe_down(hidden_PI, self.w_down_EIH, routing_weights_TK, alignment)  # one launch

    def after_first_call(self):
        return moe_kernels.describe_tuned_configs()  # the autotuner has chosen by the end of the first call


if __name__ == "__main__":
    run_level_script(TritonGroupedLevel)
