"""Level 1: batched. No Python loop: gather every token's own copy of its experts' weights and einsum.

The idea
    Level 0 spends its time in E·K Python iterations and host syncs. Index the weight tensors with the routing
    itself, `w_gate_EHI[expert_ids_TK]` → [T, K, H, I], and the whole layer becomes four einsums over
    fixed shapes: no loop, no sync, a handful of launches whatever E is.

Why it should be faster than level 0
    Launches drop from about 25·E·K once every expert has tokens (E·K, plus about 24 per busy iteration) to
    about 10, and the host never waits for the device. When a forward is dominated by launch gaps and syncs (few
    tokens, many experts), that is most of the time.

What it costs
    Memory and bytes, O(T·K·H·I): every token gets a private copy of two experts' weights. At the `journey` size
    (H=1024, I=2048) that is H·I·2 bytes = 4 MiB of bf16 per (token, slot) and projection; 8192 tokens with K=2 need
    64 GiB for one gathered projection. The einsums become T·K matrix-*vector* products that read those copies once
    each, so the layer is bound by memory bandwidth, not by the tensor cores: each weight byte is used for one token
    instead of being reused across all the tokens an expert gets. At large T it runs out of GPU memory, and the
    benchmark records that as an `OOM` row. Python evaluates each statement's gather, uses it and frees it, so at
    most one [T, K, H, I] copy is alive at a time.

Shared experts (if the config has any) run after the einsums as a separate dense MLP: not fused.

Run: python labs/moe_optimization_journey/level1_batched.py [--preset journey] [--tokens 2048] [--device cuda]
"""

import torch
import torch.nn.functional as F
from moe_benchmark import Claims, MoELevel, run_level_script, stage


class BatchedLevel(MoELevel):
    level = 1
    name = "batched"
    summary = "gather each token's expert weights (w[expert_ids]) and einsum: no loop, O(T·K·H·I) memory"
    # Three weight gathers, four einsums, the activation: about 9 kernels. Past 2^31 elements per gathered copy
    # the gathers and einsums run in pieces (32-bit indexing): about 30.
    claims = Claims(launches="(9 + shared_kernels_min, 11 + shared_kernels_max) if T*K*H*I < 2**31 "
                             "else (30 + shared_kernels_min, 33 + shared_kernels_max)", syncs="0",
                    extra_bytes="T*K*(H*I + 3*I + H)*bytes")

    def forward(self, tokens_TH, routing_weights_TK, expert_ids_TK):
        w = self.weights
        T, K = expert_ids_TK.shape
        x_TKH = tokens_TH[:, None, :].expand(T, K, self.config.hidden)  # a view: each token once per slot
        # (t, k) is the batch of T·K matrix-vector products; the gathered weights are used in their layout. The
        # gathers (this level's permutation: weights to tokens) count in the GEMM stage, inside each einsum's line.
        with stage("expert GEMMs"):
            gate_TKI = torch.einsum("tkh,tkhi->tki", x_TKH, w.w_gate_EHI[expert_ids_TK])
            up_TKI = torch.einsum("tkh,tkhi->tki", x_TKH, w.w_up_EHI[expert_ids_TK])
        with stage("activation"):
            hidden_TKI = self.activation(gate_TKI, up_TKI)
        with stage("expert GEMMs"):
            y_TKH = torch.einsum("tki,tkih->tkh", hidden_TKI, w.w_down_EIH[expert_ids_TK])
        with stage("combine"):
            out_TH = torch.einsum("tkh,tk->th", y_TKH, routing_weights_TK)
        return self.add_shared_experts(out_TH, tokens_TH)

    def activation(self, gate_TKI, up_TKI):
        return F.silu(gate_TKI) * up_TKI  # two kernels: silu writes a temporary, the multiply reads it back


if __name__ == "__main__":
    run_level_script(BatchedLevel)
