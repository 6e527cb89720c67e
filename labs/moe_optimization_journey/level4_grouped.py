"""Level 4: grouped. Sort the (token, slot) pairs by expert once; then every expert's tokens are one slice.

The idea
    Level 3 asks "which pairs go to expert e?" E times, with E syncs. Ask once: flatten expert_ids_TK into T·K
    pairs, `argsort` them by expert (stable, so each expert's pairs keep token order), and `bincount` how many
    each expert got. One gather puts the tokens in that order, [T·K, H]; expert e's rows are then the contiguous
    slice [start_e, start_e + count_e), and its SwiGLU MLP is three GEMMs on that slice. The results, still in
    sorted order, are scaled by their routing weights in one multiply and summed back into the tokens' rows by
    one `index_add_`. This "permute → grouped GEMM → un-permute" shape is how production MoE layers are built
    (torchtitan, vLLM, Megatron); the later levels only change how the grouped GEMM and the permutation run.

Why it should be faster than level 3
    One host sync per forward (`counts.tolist()`, needed to cut the slices) instead of E; one gather and one
    scatter instead of E of each; contiguous slices the GEMMs read without any index. The FLOPs and the weight
    bytes are the same as level 3, so the gain is in overhead: largest with many experts and few tokens,
    small where the GEMMs dominate.

What it costs
    A [T·K, H] sorted copy of the tokens, its [T·K, I] hidden activation and its [T·K, H] result:
    O(T·K·(H + I)), about 3× the tokens' size at K=2. Still one host sync per forward, so the layer cannot be
    captured in a CUDA graph (level 5 removes it), and still E launches of each GEMM.

Shared experts (if the config has any) run after the combine as a separate dense MLP: not fused
(they could be: one more slice of every token, as level 7 does).

Run: python labs/moe_optimization_journey/level4_grouped.py [--preset journey] [--tokens 8192] [--device cuda]
"""

import torch
from moe_benchmark import MoELevel, run_level_script, stage

from triton_kernels import silu_mul


class GroupedLevel(MoELevel):
    level = 4
    name = "grouped"
    summary = "sort pairs by expert (argsort + bincount), one GEMM per expert slice, index_add_ combine"
    uses_triton = True

    def forward(self, tokens_TH, routing_weights_TK, expert_ids_TK):
        K = expert_ids_TK.shape[1]
        with stage("permute"):  # pair p = t·K + k; sorting by expert makes every expert's pairs contiguous
            expert_of_pair = expert_ids_TK.flatten()  # [T·K]
            order = torch.argsort(expert_of_pair, stable=True)  # [T·K] pair index, sorted by expert
            token_of_sorted = order // K
            x_sorted = tokens_TH.index_select(0, token_of_sorted)  # [T·K, H]
            counts_E = torch.bincount(expert_of_pair, minlength=self.config.num_experts).tolist()  # the one sync

        y_sorted = self.grouped_gemm(x_sorted, counts_E)

        with stage("combine"):  # un-permute: weight each result, then sum every token's K results into its row
            y_sorted.mul_(routing_weights_TK.flatten()[order, None])
            out_TH = torch.zeros_like(tokens_TH)
            out_TH.index_add_(0, token_of_sorted, y_sorted)
        return self.add_shared_experts(out_TH, tokens_TH)

    def grouped_gemm(self, x_sorted: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
        """[T·K, H]: each expert's SwiGLU MLP on its contiguous slice of the sorted tokens, one slice at a time."""
        w = self.weights
        y_sorted = torch.empty_like(x_sorted)
        start = 0
        for expert, count in enumerate(counts_E):
            if count == 0:
                continue
            rows = slice(start, start + count)
            x = x_sorted[rows]
            with stage("expert GEMMs"):
                gate, up = x @ w.w_gate_EHI[expert], x @ w.w_up_EHI[expert]  # [count, I] each
            with stage("activation"):
                hidden = silu_mul(gate, up, out=gate)
            with stage("expert GEMMs"):
                torch.matmul(hidden, w.w_down_EIH[expert], out=y_sorted[rows])
            start += count
        return y_sorted


if __name__ == "__main__":
    run_level_script(GroupedLevel)
