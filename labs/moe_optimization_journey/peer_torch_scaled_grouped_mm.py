"""FP8 peer: PyTorch's own FP8 grouped GEMM, `torch._scaled_grouped_mm` (CUTLASS on Hopper). Not a level: level
10's yardstick.

What it is
    The bf16 peer (peer_torch_grouped_mm.py) with e4m3 operands and fp32 scales, end to end, in torch ops:
    1. Weights, once in prepare(): `Fp8Experts`, as level 10 stores them: e4m3 values [E, cols, depth] and one
       fp32 scale per output column. Transposed, the values are the column-major [E, depth, cols] operand the
       FP8 kernel requires, with no copy.
    2. Tokens, every forward: `moe_model.quantize_fp8` as torch ops, one scale per token row; then level 4's
       permute gathers the e4m3 rows (as bytes) and each row's scale.
    3. Gate and up: two `torch._scaled_grouped_mm` calls, fp32 accumulation, the row's scale and the column's
       multiplying the accumulator in the epilogue, bf16 out; the slices given by device-side end offsets (`offs`,
       int32), so there is no host sync.
    4. SiLU·up (the lab's kernel, in place), then the hidden quantized again, one scale per row, as level 10 does
       it too (there in one kernel with power-of-two scales, here in torch ops).
    5. Down: a third scaled grouped GEMM, then level 4's combine.
    Shared experts run in the same FP8 grouped GEMMs, as experts E … E+S−1 that every token picks with weight 1
    (levels 7-10 do the same), so the whole layer is FP8.

Why it is here
    It is what a PyTorch user gets for FP8 without writing a kernel, so level 10 has an FP8 yardstick as the bf16
    levels have `torch._grouped_mm`. It is a private API (the leading underscore), rowwise-scaled e4m3 only, bf16
    output only, and runs on compute capability 9.0 and 10.0 alone (Hopper, Blackwell's B200); elsewhere, on the
    CPU, or for a preset in another dtype the row is `skipped`. What it costs next to level 10: the quantizations
    are torch ops, about nine passes each and fp32 temporaries of 12 bytes per element of the hidden, where
    level 10 quantizes each in one kernel; and the gate and up projections reach memory
    in bf16 before SiLU·up reads them back.

Run: python labs/moe_optimization_journey/peer_torch_scaled_grouped_mm.py [--preset mixtral] [--tokens 16384]
         [--device cuda]
"""

import torch
from level4_grouped import combine, permute
from level7_triton_grouped import route_to_shared_experts
from moe_benchmark import Claims, LevelUnavailable, MoELevel, run_level_script, stage

from moe_kernels import silu_mul
from moe_model import (FP8_DTYPE, Fp8Experts, MoEConfig, fp8_layer_weights, fp8_round_trip, quantize_fp8,
                       reference_forward)

# torch's check (aten/src/ATen/native/cuda/Blas.cpp, _scaled_grouped_mm_cuda): sm_90 or sm_100, not "8.9 or newer".
SUPPORTED_CAPABILITIES = ((9, 0), (10, 0))


def unavailable(config: MoEConfig, device: torch.device) -> str | None:
    """Why torch._scaled_grouped_mm cannot run this layer here, or None."""
    if not hasattr(torch, "_scaled_grouped_mm"):
        return f"torch {torch.__version__} has no torch._scaled_grouped_mm"
    if device.type != "cuda":
        return "torch._scaled_grouped_mm runs on CUDA GPUs only (compute capability 9.0 or 10.0)"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) not in SUPPORTED_CAPABILITIES:
        return f"torch._scaled_grouped_mm runs on compute capability 9.0 and 10.0 only, not {major}.{minor}"
    if config.dtype != "bf16":
        return f"torch._scaled_grouped_mm writes bf16 only; this preset computes in {config.dtype}"
    if config.hidden % 16 or config.intermediate % 16:  # its operands' rows must be whole 16-byte units
        return (f"torch._scaled_grouped_mm needs H and I in multiples of 16, "
                f"got H={config.hidden} I={config.intermediate}")
    return None


def fp8_grouped_mm(values, scales, w: Fp8Experts, expert_ends_E):
    """Each expert's slice of the e4m3 rows `values` times its weights, accumulated in fp32, scaled in the epilogue
    by the row's scale (`scales`, one per row) and the column's: [rows, cols] bf16."""
    return torch._scaled_grouped_mm(values, w.values_ECD.transpose(1, 2), scales, w.scales_EC, offs=expert_ends_E,
                                    out_dtype=torch.bfloat16)


class TorchScaledGroupedMMPeer(MoELevel):
    level = "peer-fp8"
    name = "torch_scaled_grouped_mm"
    summary = "FP8 peer, not a level: torch._scaled_grouped_mm (rowwise e4m3) around level 4's permutation"
    fp8 = True
    # Launches: the bf16 peer's (21, 31) without its dense shared-expert MLP, plus two
    # quantize_fp8 of about 9 torch ops each and the gather of the tokens' scales; shared experts: 4 (their ids and
    # weights joined to the routing). Memory, N = T·(K + S) rows: at the hidden's quantization the bf16 gate (SiLU·up
    # in place) and up, 4·N·I, the gathered e4m3 tokens N·H and quantize_fp8's fp32 temporaries, 12·N·I; or, if
    # larger, at the combine: gate, up, the e4m3 hidden, the tokens, y and its weighted copy, 5·N·I + 5·N·H.
    claims = Claims(launches="(40 + 4*min(S, 1), 50 + 4*min(S, 1))", syncs="0",
                    extra_bytes="(max(16*I + H, 5*I + 5*H)*T*(K + S) + T*H, "
                                "max(16*I + H, 5*I + 5*H)*T*(K + S) + 13*T*H + 48*T*(K + S))")

    def prepare(self):
        if reason := unavailable(self.config, self.device):
            raise LevelUnavailable(reason)
        w = self.weights
        # Shared experts, if any, become experts E … E+S−1 of the same tensors: one grouped GEMM runs them all.
        self.w_gate = Fp8Experts.quantize(torch.cat([w.w_gate_EHI, w.w_shared_gate_SHI]))  # [E+S, I, H] e4m3
        self.w_up = Fp8Experts.quantize(torch.cat([w.w_up_EHI, w.w_shared_up_SHI]))
        self.w_down = Fp8Experts.quantize(torch.cat([w.w_down_EIH, w.w_shared_down_SIH]))  # [E+S, H, I] e4m3

    def forward(self, tokens_TH, routing_weights_TK, expert_ids_TK):
        T = tokens_TH.shape[0]
        E = self.config.num_experts + self.config.num_shared_experts
        with stage("permute"):
            routing_weights_TK, expert_ids_TK = route_to_shared_experts(routing_weights_TK, expert_ids_TK, self.config)
            x_values_TH, x_scales_T1 = quantize_fp8(tokens_TH)  # read T·H·2 bytes, write T·H + 4·T
            # Gathered as bytes: float8 indexing kernels came late and unevenly to torch (pytorch/pytorch#133605).
            order_N, token_of_sorted_N, counts_E, x_sorted_NH = permute(x_values_TH.view(torch.uint8),
                                                                       expert_ids_TK, E)
            x_sorted_NH = x_sorted_NH.view(FP8_DTYPE)
            x_scales_N = x_scales_T1[:, 0].index_select(0, token_of_sorted_N)
            expert_ends_E = torch.cumsum(counts_E, 0, dtype=torch.int32)  # stays on the device: no sync
        with stage("expert GEMMs"):
            gate_NI = fp8_grouped_mm(x_sorted_NH, x_scales_N, self.w_gate, expert_ends_E)
            up_NI = fp8_grouped_mm(x_sorted_NH, x_scales_N, self.w_up, expert_ends_E)
        with stage("activation"):
            hidden_NI = silu_mul(gate_NI, up_NI, out=gate_NI)
            h_values_NI, h_scales_N1 = quantize_fp8(hidden_NI)  # one scale per row: this peer holds whole rows
        with stage("expert GEMMs"):
            y_sorted_NH = fp8_grouped_mm(h_values_NI, h_scales_N1[:, 0], self.w_down, expert_ends_E)
        with stage("combine"):
            return combine(y_sorted_NH, routing_weights_TK, order_N, token_of_sorted_N, T)

    def reference(self, tokens_TH, routing_weights_TK, expert_ids_TK):
        """The layer in fp32 on the values the GEMMs multiply: the tokens' e4m3 round trip, the dequantized
        weights, and SiLU·up rounded through e4m3 row by row before the down projection."""
        weights = fp8_layer_weights(self.weights.router_HE, self.w_gate, self.w_up, self.w_down,
                                    self.config.num_experts)
        return reference_forward(fp8_round_trip(tokens_TH), weights, routing_weights_TK, expert_ids_TK,
                                 round_hidden=fp8_round_trip)


if __name__ == "__main__":
    run_level_script(TorchScaledGroupedMMPeer)
