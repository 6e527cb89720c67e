"""Peer: OpenAI's triton_kernels, `matmul_ogs` (the MoE GEMMs vLLM runs for gpt-oss on Hopper). Not a level: level
9's yardstick, the fastest public Triton MoE that issue 12 measured.

What it is
    The layer as triton_kernels' own API builds it, in three steps:
    1. Routing metadata: its `topk`, given the router's choice, packs the pairs into a bitmatrix (one bit per token
       and expert); from that come each pair's place in expert order and back (level 7's alignment, without the
       padding) and the tile schedule of every expert's slice.
    2. Gate|up: one `matmul_ogs` ("outer gather/scatter") gathers each pair's token row as it loads it, multiplies
       by the expert's [H, 2I] weights and applies SiLU·up in its epilogue: a fused activation, here the lab's
       SwiGLU on level 9's interleaved columns (`silu_mul_pairs`; triton_kernels' own `swiglu` is gpt-oss's
       clamped variant, another function).
    3. Down: a second `matmul_ogs` multiplies by the routing weight in its epilogue and scatters each pair's row
       back to token order, then a reduce sums each token's K rows.
    Its GEMMs are persistent Hopper kernels with TMA weight tiles, the tile chosen by heuristics (`opt_flags`: 128 ×
    256 × 64 with 3 stages at every prefill cell measured), the tile loop flattened and marked for warp
    specialization (which Triton 3.6 does not do on Hopper: NOTES.md). Recorded in one CUDA graph and replayed, as
    levels 8-10 are (level 5's `Graphed`): on an H100 the graph ran 4-24x faster than its eager forward at 1 and 8192
    tokens, where the eager one waits on the host, and within 1% of it at mixtral's 16384 (NOTES.md). Shared experts
    run after it as a separate dense MLP: triton_kernels' routing kernels need K a power of two, and K + S is 9 at
    deepseek-v3.

Why it is here
    Issue 12 set level 9's prefill bars at 3% over this library's rates on another H100. Timed beside level 9 on
    the same card, weights and routing, a sweep answers the issue's question directly, on each card it runs on.

Where it runs
    triton_kernels is not on PyPI (a package of that name there is someone else's). It lives in Triton's
    repository (python/triton_kernels), released with each Triton tag; vLLM's wheels vendor a copy
    (vllm/third_party/triton_kernels). Without it, without a CUDA GPU, for a preset in another dtype than bf16 or
    a K that is not a power of two, the row is `skipped` with the reason. The lab's own kernels are in
    moe_kernels.py, a name that does not shadow this package.

Run: python labs/moe_optimization_journey/peer_triton_kernels_matmul_ogs.py [--preset mixtral] [--tokens 16384]
         [--device cuda]
"""

import importlib.util
from importlib import import_module
from pathlib import Path

import torch
import triton
import triton.language as tl
from level5_cudagraphs import Graphed
from moe_benchmark import Claims, LevelUnavailable, MoELevel, run_level_script, stage

from moe_kernels import interleave_gate_up
from moe_model import MoEConfig

INSTALL = ("pip install 'triton_kernels @ git+https://github.com/triton-lang/triton.git@v{version}"
           "#subdirectory=python/triton_kernels' (the tag of the installed triton)")


def unavailable(config: MoEConfig, device: torch.device) -> str | None:
    """Why triton_kernels' matmul_ogs cannot run this layer here, or None."""
    if device.type != "cuda":
        return "OpenAI's triton_kernels runs on CUDA GPUs only"
    if config.dtype != "bf16":
        return f"this peer runs in bf16 only; this preset computes in {config.dtype}"
    if config.top_k & (config.top_k - 1):
        return f"triton_kernels' routing kernels need K a power of two, got K={config.top_k}"
    if installed_at() is None:
        return f"OpenAI's triton_kernels is not installed: {INSTALL.format(version=triton.__version__.split('+')[0])}"
    return None


def installed_at() -> str | None:
    """The folder OpenAI's triton_kernels is imported from (each run's environment.json records it), or None."""
    try:  # finding the submodule imports the package: one of that name that fails to import is not OpenAI's either
        spec = importlib.util.find_spec("triton_kernels.matmul_ogs")
    except Exception:  # ModuleNotFoundError where it has no submodules, anything at all where it is broken
        return None
    return str(Path(spec.origin).parent) if spec else None


@triton.jit
def silu_mul_pairs(acc):
    """matmul_ogs's fused activation: columns 2j and 2j + 1 of a gate|up tile are gate j and up j (level 9's
    interleaving), and out of each pair comes SiLU(gate)·up, computed in fp32."""
    gate, up = tl.split(tl.reshape(acc, (acc.shape[0], acc.shape[1] // 2, 2)))
    gate = gate.to(tl.float32)
    return gate / (1 + tl.exp(-gate)) * up.to(tl.float32)


class MatmulOgsPeer(Graphed, MoELevel):
    level = "peer-ogs"
    name = "triton_kernels_matmul_ogs"
    summary = "peer, not a level: OpenAI's triton_kernels matmul_ogs (vLLM's gpt-oss MoE GEMMs), where installed"
    # Counted on an H100 (NOTES.md): 17-18 kernels in the graph (the routing metadata's, two GEMMs, the reduce), 8-10
    # more for the shared experts' dense MLP. Memory: hidden [N, I] and the down GEMM's rows [N, H] before the
    # reduce, in the graph's pool, which reserves whole segments.
    claims = Claims(launches="(17 + shared_kernels_min, 18 + shared_kernels_max)", syncs="0",
                    extra_bytes="(T*K*(I + H)*bytes, 2*T*(K + S)*(I + H)*bytes + (24 + 16*min(S, 1))*2**20)")

    def prepare(self):
        reason = unavailable(self.config, self.device)
        if reason:
            raise LevelUnavailable(reason)
        self.ogs, self.ragged, self.topk = (import_module(f"triton_kernels.{name}")
                                            for name in ("matmul_ogs", "tensor", "topk"))
        self.silu_mul = self.ogs.FusedActivation(self.ogs.FnSpecs("silu_mul", silu_mul_pairs, (), reduction_n=2), ())
        # [E, H, 2I], column 2j gate j and 2j + 1 up j: one GEMM, and each output column's pair in one tile
        self.w13_interleaved_EH2I = interleave_gate_up(self.weights.w_gate_EHI, self.weights.w_up_EHI)
        super().prepare()  # the graph

    def eager_forward(self, tokens_TH, routing_weights_TK, expert_ids_TK):
        T, K = expert_ids_TK.shape
        E = self.config.num_experts
        with stage("permute"):  # level 7's alignment, in triton_kernels' terms
            # topk, given the ids, packs the bitmatrix and reads each pair's weight from a dense [T, E]. The ids go
            # in int32: its kernel shifts 1 << (id % 32) in the ids' own type, and int16 loses experts 16-31 of
            # each 32 (NOTES.md).
            weights_TE = routing_weights_TK.new_zeros((T, E)).scatter_(1, expert_ids_TK, routing_weights_TK)
            routed = self.topk.topk(weights_TE, K, apply_softmax=False, y_indx=expert_ids_TK.to(torch.int32))
            sorted_of_pair_N = routed.mask_metadata.row_sorted_indx  # pair t·K + k → its place in expert order
            pair_of_sorted_N = routed.mask_metadata.col_sorted_indx  # and back
            slices = self.ragged.make_ragged_tensor_metadata(routed.mask_metadata.col_sum, T * K)  # each expert's tiles
            weight_of_sorted_N = routed.vals.flatten()[pair_of_sorted_N]
            routing = self.ogs.RoutingData(weight_of_sorted_N, slices.slice_sizes, E, K, slices)
        with stage("expert GEMMs"):
            hidden_NI = self.ogs.matmul_ogs(tokens_TH, self.w13_interleaved_EH2I, None, routing,
                                            gather_indx=self.ogs.GatherIndx(pair_of_sorted_N, sorted_of_pair_N),
                                            fused_activation=self.silu_mul)
            out_TH = self.ogs.matmul_ogs(hidden_NI, self.weights.w_down_EIH, None, routing,
                                         scatter_indx=self.ogs.ScatterIndx(sorted_of_pair_N, pair_of_sorted_N),
                                         gammas=weight_of_sorted_N)  # and the sum over each token's K rows
        return self.add_shared_experts(out_TH.view(T, -1), tokens_TH)


if __name__ == "__main__":
    run_level_script(MatmulOgsPeer)
