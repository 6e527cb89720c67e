"""Peer: PyTorch's own grouped GEMM, `torch._grouped_mm` (CUTLASS on Hopper). Not a level: the yardstick.

What it is
    The permute → grouped GEMM → un-permute shape of level 4, with the per-expert loop replaced by PyTorch's
    grouped matrix multiply: one call multiplies each expert's contiguous slice of the sorted tokens by that
    expert's weights, the slices given by device-side end offsets (`offs`, int32 [E]), so there is no host sync
    and no Python loop. Gate, up and down are three grouped GEMMs; SiLU·up is the lab's Triton kernel, in place;
    the combine is a multiply and `index_add_`, as in level 4.

Why it is here
    It is what a PyTorch user gets without writing a kernel, so every table puts the lab's best level next to
    it, the way SGEMM write-ups put cuBLAS next to their kernels. It is a private API (the leading underscore):
    present in torch ≥ 2.8, tuned for bf16 on Hopper and newer; where it is missing the row is `skipped`.

Shared experts (if the config has any) run after the combine as a separate dense MLP: not fused.

Run: python labs/moe_optimization_journey/peer_torch_grouped_mm.py [--preset journey] [--tokens 8192] [--device cuda]
"""

import torch
from moe_benchmark import LevelUnavailable, MoELevel, run_level_script, stage

from triton_kernels import silu_mul


class TorchGroupedMMPeer(MoELevel):
    level = "peer"
    name = "torch_grouped_mm"
    summary = "peer, not a level: torch._grouped_mm (PyTorch's grouped GEMM) around level 4's permutation"
    uses_triton = True

    def prepare(self):
        if not hasattr(torch, "_grouped_mm"):
            raise LevelUnavailable(f"torch {torch.__version__} has no torch._grouped_mm")

    def forward(self, tokens_TH, routing_weights_TK, expert_ids_TK):
        w, K = self.weights, expert_ids_TK.shape[1]
        with stage("permute"):
            expert_of_pair = expert_ids_TK.flatten()
            order = torch.argsort(expert_of_pair, stable=True)
            token_of_sorted = order // K
            counts = torch.zeros(self.config.num_experts, dtype=torch.int32, device=self.device)
            counts.scatter_add_(0, expert_of_pair, torch.ones_like(expert_of_pair, dtype=torch.int32))
            expert_ends = torch.cumsum(counts, 0, dtype=torch.int32)  # stays on the device: no sync
            x_sorted = tokens_TH.index_select(0, token_of_sorted)  # [T·K, H]
        with stage("expert GEMMs"):
            gate = torch._grouped_mm(x_sorted, w.w_gate_EHI, offs=expert_ends)  # [T·K, I]
            up = torch._grouped_mm(x_sorted, w.w_up_EHI, offs=expert_ends)
        with stage("activation"):
            hidden = silu_mul(gate, up, out=gate)
        with stage("expert GEMMs"):
            y_sorted = torch._grouped_mm(hidden, w.w_down_EIH, offs=expert_ends)  # [T·K, H]
        with stage("combine"):
            y_sorted.mul_(routing_weights_TK.flatten()[order, None])
            out_TH = torch.zeros_like(tokens_TH).index_add_(0, token_of_sorted, y_sorted)
        return self.add_shared_experts(out_TH, tokens_TH)


if __name__ == "__main__":
    run_level_script(TorchGroupedMMPeer)
