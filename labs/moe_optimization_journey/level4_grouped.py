"""Level 4: grouped. Sort the (token, slot) pairs by expert once; then every expert's tokens are one slice.

The idea
    Level 3 asks "which pairs go to expert e?" E times, with E syncs. Ask once. `permute` flattens expert_ids_TK
    into N = T·K pairs, `argsort`s them by expert (stable, so each expert's pairs keep token order), counts each
    expert's pairs on the device, and gathers the tokens in that order, [N, H]. Expert e's rows are then the
    contiguous slice [start_e, start_e + count_e), and its SwiGLU MLP is three GEMMs on that slice. `combine`
    weights the sorted results by their routing weights and adds them back into the tokens' rows with one
    `index_add_`. This "permute → grouped GEMM → un-permute" shape is how production MoE layers are built
    (torchtitan, vLLM, Megatron); the later levels change how the grouped GEMM and the permutation run, and
    levels 5 and 6 and the two torch peers call these two functions as they are.

Why it should be faster than level 3
    One host sync per forward (`counts_E.tolist()`, needed to cut the slices) instead of E; one gather and one
    scatter instead of E of each; contiguous slices the GEMMs read without any index. The FLOPs and the weight
    bytes are the same as level 3, so the gain is in overhead: largest with many experts and few tokens,
    small where the GEMMs dominate.

What it costs
    Memory beyond the output: the sorted tokens [N, H], which each expert's down GEMM then overwrites with its
    results (an expert's rows are read by its gate and up GEMMs before its down GEMM writes them), the weighted
    copy `combine` makes, [N, H], and one expert's gate and up, [count_e, I] each: about 2·N·H elements, 4× the
    tokens at K=2. Still one host sync per forward, so the layer cannot be captured in a CUDA graph (level 5
    removes it), and still E launches of each GEMM, 3·E in all plus the activation's E.

Shared experts (if the config has any) run after the combine as a separate dense MLP: not fused
(they could be: one more slice of every token, as level 7 does).

Run: python labs/moe_optimization_journey/level4_grouped.py [--preset journey] [--tokens 8192] [--device cuda]
"""

import torch
from moe_benchmark import Claims, MoELevel, run_level_script, stage

from moe_kernels import silu_mul


def permute(tokens_TH, expert_ids_TK, num_experts: int):
    """The (token, slot) pairs sorted by expert. Pair n = t·K + k. Returns (order_N: pair index of each sorted row,
    token_of_sorted_N, counts_E on the device, x_sorted_NH: each sorted pair's token, [N, H])."""
    expert_of_pair_N = expert_ids_TK.flatten()
    order_N = torch.argsort(expert_of_pair_N, stable=True)  # stable: an expert's pairs keep token order
    token_of_sorted_N = order_N // expert_ids_TK.shape[1]
    # Counted by scatter_add_, which stays on the device (bincount on CUDA reads its max back to the host).
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=tokens_TH.device)
    counts_E.scatter_add_(0, expert_of_pair_N, torch.ones_like(expert_of_pair_N))
    x_sorted_NH = tokens_TH.index_select(0, token_of_sorted_N)  # read N·H, write N·H elements
    return order_N, token_of_sorted_N, counts_E, x_sorted_NH


def combine(y_sorted_NH, routing_weights_TK, order_N, token_of_sorted_N, num_tokens: int):
    """Un-permute: weight each sorted result by its pair's routing weight and add it into its token's row. [T, H]"""
    weighted_NH = y_sorted_NH * routing_weights_TK.flatten()[order_N, None]  # read N·H, write N·H
    out_TH = y_sorted_NH.new_zeros((num_tokens, y_sorted_NH.shape[1]))
    return out_TH.index_add_(0, token_of_sorted_N, weighted_NH)  # read N·H, add into T·H


class GroupedLevel(MoELevel):
    level = 4
    name = "grouped"
    summary = "sort pairs by expert (argsort), one GEMM per expert slice, index_add_ combine"
    # permute: a sort and 8 small kernels; per expert that got pairs 4 (gate, up, activation, down), 6 where cuBLAS
    # splits the gate and up GEMMs; combine: 3.
    claims = Claims(launches="(4*E_used + 11 + shared_kernels_min, 6*E_used + 11 + shared_kernels_max)", syncs="1",
                    extra_bytes="2*T*K*H*bytes + 24*T*K")

    permute = staticmethod(permute)  # level 6 swaps these two for their compiled versions
    combine = staticmethod(combine)

    def forward(self, tokens_TH, routing_weights_TK, expert_ids_TK):
        with stage("permute"):
            order_N, token_of_sorted_N, counts_E, x_sorted_NH = self.permute(tokens_TH, expert_ids_TK,
                                                                            self.config.num_experts)
            counts = counts_E.tolist()  # the one host sync: Python cuts the slices with these sizes
        y_sorted_NH = self.grouped_gemm(x_sorted_NH, counts)
        with stage("combine"):
            out_TH = self.combine(y_sorted_NH, routing_weights_TK, order_N, token_of_sorted_N, tokens_TH.shape[0])
        return self.add_shared_experts(out_TH, tokens_TH)

    def grouped_gemm(self, x_sorted_NH: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """y_sorted_NH [N, H]: each expert's SwiGLU MLP on its contiguous slice of the sorted tokens, one slice at
        a time, written over x_sorted_NH's buffer."""
        w = self.weights
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            x = x_sorted_NH[start:start + count]  # a view: this expert's rows
            with stage("expert GEMMs"):
                gate, up = x @ w.w_gate_EHI[expert], x @ w.w_up_EHI[expert]  # [count, I] each
            with stage("activation"):
                hidden = silu_mul(gate, up, out=gate)
            with stage("expert GEMMs"):
                torch.matmul(hidden, w.w_down_EIH[expert], out=x)  # over x: gate and up have read it already
            start += count
        return x_sorted_NH


if __name__ == "__main__":
    run_level_script(GroupedLevel)
