"""Peer: PyTorch's own grouped GEMM, `torch._grouped_mm` (CUTLASS on Hopper). Not a level: the yardstick.

What it is
    Level 4's `permute` and `combine`, with the per-expert loop between them replaced by PyTorch's grouped
    matrix multiply: one call multiplies each expert's contiguous slice of the sorted tokens by that expert's
    weights, the slices given by device-side end offsets (`offs`, int32 [E]), so there is no host sync and no
    Python loop. Gate, up and down are three grouped GEMMs; SiLU·up is the lab's Triton kernel, in place.

Why it is here
    It is what a PyTorch user gets without writing a kernel, so every table puts the lab's best level next to
    it, the way SGEMM write-ups put cuBLAS next to their kernels. It is a private API (the leading underscore):
    present in torch ≥ 2.8, tuned for bf16 on Hopper and newer; where it is missing the row is `skipped`.

Shared experts (if the config has any) run after the combine as a separate dense MLP: not fused.

Run: python labs/moe_optimization_journey/peer_torch_grouped_mm.py [--preset journey] [--tokens 8192] [--device cuda]
"""

import torch
from level4_grouped import combine, permute
from moe_benchmark import Claims, LevelUnavailable, MoELevel, run_level_script, stage

from moe_kernels import silu_mul


class TorchGroupedMMPeer(MoELevel):
    level = "peer"
    name = "torch_grouped_mm"
    summary = "peer, not a level: torch._grouped_mm (PyTorch's grouped GEMM) around level 4's permutation"
    # Level 4's permute and combine around three grouped GEMMs and the activation.
    claims = Claims(launches="(21 + shared_kernels_min, 31 + shared_kernels_max)", syncs="0",
                    extra_bytes="max(T*K*(3*H + 2*I)*bytes, S*T*(3*I + 2*H)*bytes)")

    def prepare(self):
        if not hasattr(torch, "_grouped_mm"):
            raise LevelUnavailable(f"torch {torch.__version__} has no torch._grouped_mm")

    def forward(self, tokens_TH, routing_weights_TK, expert_ids_TK):
        w = self.weights
        with stage("permute"):
            order_N, token_of_sorted_N, counts_E, x_sorted_NH = permute(tokens_TH, expert_ids_TK,
                                                                       self.config.num_experts)
            expert_ends_E = torch.cumsum(counts_E, 0, dtype=torch.int32)  # stays on the device: no sync
        with stage("expert GEMMs"):
            gate_NI = torch._grouped_mm(x_sorted_NH, w.w_gate_EHI, offs=expert_ends_E)
            up_NI = torch._grouped_mm(x_sorted_NH, w.w_up_EHI, offs=expert_ends_E)
        with stage("activation"):
            hidden_NI = silu_mul(gate_NI, up_NI, out=gate_NI)
        with stage("expert GEMMs"):
            y_sorted_NH = torch._grouped_mm(hidden_NI, w.w_down_EIH, offs=expert_ends_E)
        with stage("combine"):
            out_TH = combine(y_sorted_NH, routing_weights_TK, order_N, token_of_sorted_N, tokens_TH.shape[0])
        return self.add_shared_experts(out_TH, tokens_TH)


if __name__ == "__main__":
    run_level_script(TorchGroupedMMPeer)
