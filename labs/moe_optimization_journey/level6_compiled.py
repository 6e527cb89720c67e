"""Level 6: torch.compile. Level 4, with its `permute` and `combine` functions compiled.

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
    Compilation: seconds on the first call (the row's `first_call_ms`, outside the timing), a C++
    compiler on the CPU, and a less transparent program (TORCH_LOGS=output_code shows what Inductor generated).
    If compilation fails here the level runs eagerly and its row says so.

Shared experts (if the config has any) run after the compiled combine as a separate, uncompiled dense MLP.

Run: python labs/moe_optimization_journey/level6_compiled.py [--preset journey] [--tokens 8192] [--device cuda]
"""

import torch
from level4_grouped import GroupedLevel, combine, permute
from moe_benchmark import Claims, run_level_script


class CompiledLevel(GroupedLevel):
    level = 6
    name = "compiled"
    summary = "level 4 with its permute and combine functions compiled by torch.compile (default mode, dynamic shapes)"
    # Level 4's count less one: Inductor fused two of the combine's kernels, and the sort stays a library call.
    claims = Claims(launches="(4*E_used + 10 + shared_kernels_min, 6*E_used + 10 + shared_kernels_max)", syncs="1",
                    extra_bytes="2*T*K*H*bytes + 24*T*K")

    def prepare(self):
        self.permute = torch.compile(permute, dynamic=True)
        self.combine = torch.compile(combine, dynamic=True)
        self.compiled_once = False

    def forward(self, tokens_TH, routing_weights_TK, expert_ids_TK):
        if self.compiled_once:
            return super().forward(tokens_TH, routing_weights_TK, expert_ids_TK)
        self.compiled_once = True  # the first call compiles: if that fails here, run level 4's eager functions
        try:
            return super().forward(tokens_TH, routing_weights_TK, expert_ids_TK)
        except Exception as error:  # e.g. no C++ compiler for Inductor's CPU backend
            self.permute, self.combine = permute, combine
            self.notes.append(f"torch.compile failed ({type(error).__name__}), ran eagerly")
            return super().forward(tokens_TH, routing_weights_TK, expert_ids_TK)


if __name__ == "__main__":
    run_level_script(CompiledLevel)
