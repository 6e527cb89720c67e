"""Level 0: naive. Loop over every (expert, slot) pair in Python and pick its tokens with a boolean mask.

The idea
    The most literal reading of the MoE formula: for expert e and slot k, the tokens whose k-th choice is e are
    `expert_ids_TK[:, k] == e`; run the SwiGLU MLP of expert e on them and add the weighted result back.

What it costs
    E·K loop iterations, and the host waits for the GPU in each: `mask_T.any()` must come back before Python can
    skip an empty slot (E·K syncs per forward), and every iteration that has tokens waits four more times,
    because each boolean index (`tokens_TH[mask_T]`, the routing weights, the read and the write of `out_TH`)
    must count its rows before it can allocate them. Measured on an H100: E·K + 4·(busy iterations) syncs, and
    about 24 kernels per busy iteration (compare, nonzeros, gathers, three matmuls, activation, scatter), so 1056
    syncs for one token on `qwen3-moe` (E=128, K=8), and by the same count about 1,220 kernels. An expert's tokens
    are also split across K separate matmuls instead of one. The arithmetic is right, and the counted FLOPs are
    the minimum; everything around them is overhead, which the later levels remove one by one.

Shared experts (if the config has any) run after the loops as a separate dense MLP: not fused.

Run: python labs/moe_optimization_journey/level0_naive.py [--preset journey] [--tokens 8192] [--device cuda]
"""

import torch
import torch.nn.functional as F
from moe_benchmark import Claims, MoELevel, run_level_script, stage


class NaiveLevel(MoELevel):
    level = 0
    name = "naive"
    summary = "Python loops over experts and top-k slots with boolean masks"
    # E·K (expert, slot) iterations: a compare (1 kernel) and `any` (1 sync) each; the busy ones (uniform routing:
    # E·K·(1 − (1 − 1/E)^T)) 24 kernels more (28 once a nonzero is large enough to take more passes) and 4 syncs,
    # at the lines below. Alive at the peak: one iteration's tokens, gate, up, activation temporaries and result.
    claims = Claims(launches="(E*K + 24*E*K*(1 - (1 - 1/E)**T) + shared_kernels_min, "
                             "E*K + 28*E*K*(1 - (1 - 1/E)**T) + shared_kernels_max)",
                    syncs="E*K + 4*E*K*(1 - (1 - 1/E)**T)",
                    extra_bytes="(max(T/E*(H + 6*I)*bytes, S*T*(3*I + 2*H)*bytes), "
                                "max(2*max(1, T/E)*(2*H + 5*I)*bytes, S*T*(3*I + 2*H)*bytes))")

    @classmethod
    def skip_reason(cls, config, num_tokens):
        iterations = config.num_experts * config.top_k
        if iterations >= 2048 and num_tokens >= 16384:
            return (f"{iterations} (expert, slot) iterations with up to five host syncs each at {num_tokens} "
                    "tokens: skipped to keep the sweep inside its time limit")
        return None

    def forward(self, tokens_TH, routing_weights_TK, expert_ids_TK):
        w = self.weights
        out_TH = torch.zeros_like(tokens_TH)
        for expert in range(self.config.num_experts):
            for slot in range(expert_ids_TK.shape[1]):  # K, as wide as this routing
                with stage("permute"):
                    mask_T = expert_ids_TK[:, slot] == expert
                    if not mask_T.any():  # 1 sync: skip an expert that got no token in this slot
                        continue
                    x = tokens_TH[mask_T]  # [T_e, H]; 1 sync: a boolean index's size is data
                with stage("expert GEMMs"):
                    gate, up = x @ w.w_gate_EHI[expert], x @ w.w_up_EHI[expert]  # [T_e, I] each
                with stage("activation"):
                    hidden = F.silu(gate) * up
                with stage("expert GEMMs"):
                    y = hidden @ w.w_down_EIH[expert]  # [T_e, H]
                with stage("combine"):
                    out_TH[mask_T] += routing_weights_TK[mask_T, slot, None] * y  # 3 syncs: 3 boolean indexings
        return self.add_shared_experts(out_TH, tokens_TH)


if __name__ == "__main__":
    run_level_script(NaiveLevel)
