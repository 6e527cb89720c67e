"""Level 8: level 7 recorded in one CUDA graph.

The idea
    Level 7 never waits for the host, so level 5's trick applies without level 5's price: the whole layer (the
    alignment's torch ops, the two Triton kernels, the sum over K) is recorded once per T into a CUDA graph and
    replayed with a single launch (level 5's `Graphed`). Level 5 had to pad every expert to T rows to
    become sync-free; level 7's alignment pads each expert only to a multiple of the tile height.

Why it should be faster than level 7
    Level 7 still issues its 8 kernels (12 with a shared expert) from Python per forward, each a few microseconds
    of host time in torch's and Triton's launch paths, and the GPU is busy for under 10% of a one-token forward
    (measured on an H100). When a forward's device work is that short (decode: a handful of tokens, where the
    layer only has to read the touched experts' weights), the GPU waits for the host between launches, and one
    graph launch removes the wait: the same kernels, and the GPU is busy 60-90% of the replay. Counted on the host
    (each GPU row's `host_ms`; the sweep `20261126T140058Z` and `140602Z`, one H100 box): level 7 takes 309-420 µs
    to issue a forward in 22 of its 28 rows, level 8 31-41 µs in 22 of 28 (the rest are the host's slow spells):
    two launches, the inputs' copy and the replay (those runs timed the copy; the benchmark now times the replay
    alone, as a graph of the whole model runs the layer: level 5's "Where the inputs live").
    At large T the device work dominates, and the graph's kernels take the same time inside it and out (NOTES.md).
    Called from outside a graph it adds one cost: its inputs are copied into its own buffers, T·H·2 bytes read and
    written (measured on an H100: 48 µs of journey's 32768-token forward, 3%).

What it costs
    A graph per distinct T, captured on first use (outside the timing, its time in the row's first_call_ms), holding its
    own memory pool for the intermediates (it reserves whole segments: up to twice what level 7 allocates); the
    output is a static buffer that the next replay overwrites. On the CPU there are no graphs: the level runs level
    7's eager path, checked in Triton's interpreter like level 7 and not timed.

Run: python labs/moe_optimization_journey/level8_triton_graphed.py [--preset journey] [--tokens 1] [--device cuda]
"""

from level5_cudagraphs import Graphed
from level7_triton_grouped import PADDED_HIDDEN_AND_Y_BYTES, TritonGroupedLevel
from moe_benchmark import Claims, run_level_script


class TritonGraphedLevel(Graphed, TritonGroupedLevel):
    level = 8
    name = "triton_graphed"
    summary = "level 7 recorded in one CUDA graph and replayed"
    # Level 7's kernels in one graph; its pool keeps level 7's intermediates and the static inputs and output.
    claims = Claims(launches="8 + 4*min(S, 1)", syncs="0",
                    # level 7's intermediates, kept in the graph's pool, which reserves whole segments: up to twice
                    extra_bytes=f"({PADDED_HIDDEN_AND_Y_BYTES}, 2*({PADDED_HIDDEN_AND_Y_BYTES}) + 24*2**20)")
    eager_forward = TritonGroupedLevel.forward  # the graph records level 7's forward


if __name__ == "__main__":
    run_level_script(TritonGraphedLevel)
