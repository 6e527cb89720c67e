"""Level 5: CUDA graphs. Make every shape depend on T alone, then record the whole layer once and replay it.

The idea
    A CUDA graph records a sequence of kernel launches with their arguments and replays it with one launch from
    the host. It can only record work whose shapes and addresses are fixed, and nothing in it may wait for the
    host. Level 4 breaks both rules in one place: `counts.tolist()` copies the per-expert counts to the CPU so
    Python can cut slices of data-dependent size. This level removes that sync by giving every expert a buffer
    of fixed capacity. An expert can receive at most T pairs (top-k picks distinct experts, so at most one pair
    per token), so buffers of capacity T drop no token:
        x_ECH [E, T, H]  ← each pair's token written at (its expert, its rank among that expert's pairs)
        three batched GEMMs over all E experts (`torch.bmm`), fused SiLU·up in between
        y_ECH [E, T, H]  → read back at the same (expert, rank), weighted, `index_add_` into the tokens' rows
    The ranks come from level 4's `permute` (the same stable sort, its counts made on the device by
    `scatter_add_`), and the results go back through level 4's `combine`. With no sync left, the layer is
    captured into one graph the first time a T is seen (outside the timing; the capture is in the row's
    first_call_ms) and replayed (`CapturedGraph` below: warm up on a side stream, record under
    `torch.cuda.graph`, then `replay()`).

Where the inputs live
    A graph replays from fixed addresses: it reads its inputs from the buffers it was recorded reading. Inside a
    graph of the whole model this layer's inputs are the previous layer's static output and the router's, already
    in place, and nothing moves. A caller outside a graph hands over tensors of its own, and each call first copies
    them in, all three in one launch: T·H + 2·T·K elements read and written, on an H100 10 µs of level 9's forward
    at journey's 8192 tokens (2.7%) and 5 µs at one token, the launch's host time included (NOTES.md). The benchmark
    times the layer as a model runs it (`Graphed` below, which level 8 uses too): the timing inputs are copied in
    once, and each timed call is the replay alone. The check still hands the graph fresh inputs, and pays the copy.

Why it should be faster than level 4
    No host sync and no launch gaps: level 4 issues about 3·E GEMMs and a dozen other kernels from Python, and
    at small T each is a few microseconds of launch for less work than that. Replaying a graph issues them all
    at once, back to back.

What it costs
    Padding. Buffers sized for the worst case make every expert compute T rows, so the GEMMs do E/K times the useful
    FLOPs (4× on `journey`, 16× on `qwen3-moe`, 32× on `deepseek-v3`) and hold E·T·(2H + 2I) activations. At large T
    that loses to level 4 (by up to E/K, once level 4's own GEMMs run near peak); the table keeps it. The lesson is
    the pair: syncs and launches dominate small batches, padding dominates large ones; level 7's token alignment
    pads each expert only to a GEMM block instead of to T. The output is a static buffer the next replay overwrites;
    read it (or copy it) before calling again. On the CPU there are no graphs: the same sync-free code runs eagerly,
    and the row says so.

Shared experts (if the config has any) run as a separate dense MLP inside the same graph: captured, not
fused.

Run: python labs/moe_optimization_journey/level5_cudagraphs.py [--preset journey] [--tokens 8192] [--device cuda]
"""

from typing import Callable

import torch
from level4_grouped import combine, permute
from moe_benchmark import Claims, Inputs, MoELevel, run_level_script, stage

from moe_kernels import CopyThree, silu_mul


class CapturedGraph:
    """Record `fn(tokens_TH, routing_weights_TK, expert_ids_TK)` into a CUDA graph on the first call for a set of
    input shapes; later calls copy their inputs into the graph's static input buffers (all three in one launch,
    `CopyThree`, where a `copy_` each was three: 4-5 µs less at one token on an H100, NOTES.md; its checks run once
    per capture, since at one token the host's time to issue a call counts too) and replay it with one launch.
    `fn` must never wait for the host. The result is the graph's static output buffer, which the next replay
    overwrites."""

    def __init__(self, fn: Callable[..., torch.Tensor]):
        self.fn = fn
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: tuple[torch.Tensor, ...] = ()
        self.copy_inputs: CopyThree | None = None
        self.static_output: torch.Tensor | None = None

    def capture(self, inputs: tuple[torch.Tensor, ...]) -> None:
        self.graph = None  # let the previous graph's memory pool go first
        self.static_inputs = tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in inputs)
        self.copy_inputs = CopyThree(inputs, self.static_inputs)  # checked here, once per capture
        self.copy_inputs(inputs)
        # Warm up on a side stream: one-time work (cuBLAS handles, Triton compilation and autotuning) must run
        # before capture, not be recorded.
        side_stream = torch.cuda.Stream()
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):
            for _ in range(2):
                self.fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side_stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_output = self.fn(*self.static_inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.graph is None or any(s.shape != t.shape or s.dtype != t.dtype
                                     for s, t in zip(self.static_inputs, inputs)):
            self.capture(inputs)  # once per T, on the first call: outside the timing (the row's first_call_ms)
        else:
            self.copy_inputs(inputs)  # read and write T·H + 2·T·K elements: all but the replay
        return self.replay()

    def replay(self) -> torch.Tensor:
        """The recorded layer on what its input buffers hold now, with one launch."""
        self.graph.replay()
        return self.static_output


class Graphed:
    """Mixed into a level whose `eager_forward` never waits for the host: on a GPU its forward is that, recorded in
    a CUDA graph and replayed, and the clock times the replay alone. On the CPU, where there are no graphs, it runs
    eagerly. (Level 8 records level 7 with it.)"""

    keeps_buffers = True  # the graph's private memory pool

    def prepare(self):
        super().prepare()
        self.graphed_forward = CapturedGraph(self.eager_forward)

    def forward(self, tokens_TH, routing_weights_TK, expert_ids_TK):
        if self.device.type != "cuda":
            return self.eager_forward(tokens_TH, routing_weights_TK, expert_ids_TK)
        return self.graphed_forward(tokens_TH, routing_weights_TK, expert_ids_TK)

    def timed_call(self, inputs: Inputs) -> Callable[[], torch.Tensor]:
        """As a graph of the whole model runs the layer: the timing inputs copied into the graph's buffers once,
        here (capturing it, if this T is new), and each timed call the replay alone."""
        if self.device.type != "cuda":
            return super().timed_call(inputs)
        self.forward(*inputs.as_args())
        return self.graphed_forward.replay


class CudaGraphLevel(Graphed, MoELevel):
    level = 5
    name = "cudagraphs"
    summary = "sync-free fixed-capacity formulation, the whole layer captured in one CUDA graph"
    # 25 kernels in the graph on an H100 (28 at journey's one token; up to 38 where the sort of T·K pairs takes more
    # passes), replayed by one launch, and the shared experts' as every level adds them. Its private pool keeps
    # every intermediate, each expert padded to T rows.
    claims = Claims(launches="(25 + shared_kernels_min, 38 + shared_kernels_max)", syncs="0",
                    extra_bytes="(E*T*(2*H + 2*I)*bytes, E*T*(2*H + 2*I)*bytes + 80*2**20)")

    def prepare(self):
        super().prepare()
        if self.device.type != "cuda":
            self.notes.append("CPU: no CUDA graphs, the sync-free path runs eagerly")

    def eager_forward(self, tokens_TH, routing_weights_TK, expert_ids_TK):
        """The layer with every shape fixed by T: no host sync, nothing a graph cannot record."""
        w = self.weights
        T, K = expert_ids_TK.shape
        E = self.config.num_experts
        with stage("permute"):  # level 4's permute (sync-free: its counts stay on the device)
            order_N, token_of_sorted_N, counts_E, x_sorted_NH = permute(tokens_TH, expert_ids_TK, E)
            expert_sorted_N = expert_ids_TK.flatten()[order_N]
            first_sorted_position_E = torch.cumsum(counts_E, 0) - counts_E
            # Each sorted pair's row in its expert's buffer: its rank among that expert's pairs, < T always.
            rank_N = torch.arange(T * K, device=self.device) - first_sorted_position_E[expert_sorted_N]
            x_ECH = tokens_TH.new_zeros((E, T, self.config.hidden))  # capacity C = T per expert: nothing dropped
            x_ECH[expert_sorted_N, rank_N] = x_sorted_NH  # write E·T·H elements, most of them padding
        with stage("expert GEMMs"):
            gate_ECI, up_ECI = torch.bmm(x_ECH, w.w_gate_EHI), torch.bmm(x_ECH, w.w_up_EHI)
        with stage("activation"):
            hidden_ECI = silu_mul(gate_ECI, up_ECI, out=gate_ECI)
        with stage("expert GEMMs"):
            y_ECH = torch.bmm(hidden_ECI, w.w_down_EIH)
        with stage("combine"):  # level 4's combine, on the real rows read back out of the buffers
            out_TH = combine(y_ECH[expert_sorted_N, rank_N], routing_weights_TK, order_N, token_of_sorted_N, T)
        return self.add_shared_experts(out_TH, tokens_TH)


if __name__ == "__main__":
    run_level_script(CudaGraphLevel)
