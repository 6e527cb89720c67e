"""Level 6: torch.compile. Level 4's grouped formulation, with the permutation and the combine compiled.

The idea
    Level 4 is the fastest formulation at the journey's larger scales (level 5 wins where launches dominate), but
    around its GEMMs it runs chains of small eager kernels: the permutation is a sort, a divide, a count and a
    gather; the combine is an index lookup, a multiply and a scatter-add, each a full pass over [T·K, H]. Those two
    stages have shapes fixed by T, so `torch.compile` can trace each into one graph and Inductor can fuse it: the
    routing-weight multiply goes into the scatter-add, the index arithmetic into the gather. The expert loop in
    between stays as level 4 wrote it: cuBLAS GEMMs and the Triton SiLU·up kernel.

    Mode: the default, with `dynamic=True`. `reduce-overhead` adds CUDA graphs, which cannot hold level 4's host
    sync; `max-autotune` tunes GEMM templates, and the compiled stages have no GEMM in them; `dynamic=True` makes
    one symbolic-shape compilation serve every T instead of one compilation per token count.

    Why not compile the expert loop too: each compiled call costs host time for its guards and its wrapper, and
    an expert's slice has a new, data-dependent size every forward. Measured on an H100 with the MLP compiled per
    expert, the layer was 2.3× slower than level 4 at 8192 tokens on `journey`: the GPU waited for the host.
    Compiling the whole layer as one graph needs the per-expert sizes as symbolic values that Dynamo reads off
    the device (`capture_scalar_outputs`), which did not trace through the data-dependent split here.

Why it should be faster than level 4, and what was measured
    Fewer kernels and fewer passes over the sorted activations in the two compiled stages. The GEMMs, which are
    most of the time at large T, do not change, so the prediction was a few percent, not a multiple. The H100 run
    in results/moe_journey/20261125T084707Z-nvidia-h100-80gb-hbm3 says otherwise: level 6 is slower than level 4
    at every scale (2.11 ms against 1.47 at 2048 tokens, 3.27 against 2.97 at 32768). The layer at these sizes
    is bound by host work (level 4's time barely grows from 2048 to 16384 tokens), and each compiled call adds
    its own host cost (guards, the symbolic-shape wrapper) that the fused passes do not win back. Compilation
    pays where device work dominates; here the lesson is to measure it rather than assume it.

What it costs
    Compilation: seconds on the first call (reported in the row's note and excluded from the timing), a C++
    compiler on the CPU, and a less transparent program (TORCH_LOGS=output_code shows what Inductor generated).
    If compilation fails here the level runs eagerly and its row says so.

Shared experts (if the config has any) run after the compiled combine as a separate, uncompiled dense MLP.

Run: python labs/moe_optimization_journey/level6_compiled.py [--preset journey] [--tokens 8192] [--device cuda]
"""

import time

import torch
from level4_grouped import GroupedLevel
from moe_benchmark import run_level_script, stage


def permute(tokens_TH, expert_ids_TK, num_experts: int):
    """Pairs sorted by expert: (order, token of each sorted pair, per-expert counts, sorted tokens [T·K, H])."""
    expert_of_pair = expert_ids_TK.flatten()
    order = torch.argsort(expert_of_pair, stable=True)
    token_of_sorted = order // expert_ids_TK.shape[1]
    # Counted with scatter_add_: bincount's output size depends on the data, which would break the graph.
    counts = torch.zeros(num_experts, dtype=torch.long, device=tokens_TH.device)
    counts.scatter_add_(0, expert_of_pair, torch.ones_like(expert_of_pair))
    return order, token_of_sorted, counts, tokens_TH.index_select(0, token_of_sorted)


def combine(y_sorted, routing_weights_TK, order, token_of_sorted, out_TH):
    """Weight each sorted result and add it into its token's row."""
    return out_TH.index_add_(0, token_of_sorted, y_sorted * routing_weights_TK.flatten()[order, None])


class CompiledLevel(GroupedLevel):
    level = 6
    name = "compiled"
    summary = "level 4 with its permutation and combine compiled by torch.compile (default mode, dynamic shapes)"

    def prepare(self):
        self.permute = torch.compile(permute, dynamic=True)
        self.combine = torch.compile(combine, dynamic=True)
        self.first_call = True

    def grouped_forward(self, tokens_TH, routing_weights_TK, expert_ids_TK):
        with stage("permute"):
            order, token_of_sorted, counts, x_sorted = self.permute(tokens_TH, expert_ids_TK,
                                                                    self.config.num_experts)
            counts_E = counts.tolist()  # the one host sync, as in level 4
        y_sorted = self.grouped_gemm(x_sorted, counts_E)  # level 4's expert loop, unchanged
        with stage("combine"):
            out_TH = self.combine(y_sorted, routing_weights_TK, order, token_of_sorted, torch.zeros_like(tokens_TH))
        return self.add_shared_experts(out_TH, tokens_TH)

    def forward(self, tokens_TH, routing_weights_TK, expert_ids_TK):
        if not self.first_call:
            return self.grouped_forward(tokens_TH, routing_weights_TK, expert_ids_TK)
        # The first call compiles; time it for the note, and fall back to eager if compilation fails here.
        self.first_call = False
        begin = time.perf_counter()
        try:
            out_TH = self.grouped_forward(tokens_TH, routing_weights_TK, expert_ids_TK)
            self.notes.append(f"first call (compilation, cached across runs) took "
                              f"{time.perf_counter() - begin:.1f} s, not timed")
        except Exception as error:  # e.g. no C++ compiler for Inductor's CPU backend
            self.permute, self.combine = permute, combine
            self.notes.append(f"torch.compile failed ({type(error).__name__}), ran eagerly")
            out_TH = self.grouped_forward(tokens_TH, routing_weights_TK, expert_ids_TK)
        return out_TH


if __name__ == "__main__":
    run_level_script(CompiledLevel)
