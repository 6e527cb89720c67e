"""Level EP: expert parallelism. The experts no longer fit one GPU: deal them out over W ranks, send each token
to the rank that holds its expert, and bring the result back.

The idea
    Rank r holds a contiguous slice of E_local = E / W experts, r·E_local … (r+1)·E_local − 1, plus a copy of
    the router and of the shared experts. Each rank routes its own T tokens as every level does, then:
    1. Dispatch (`torch.distributed.all_to_all_single`). Sort the T·K (token, slot) pairs by expert, which also
       groups them by destination rank. First exchange counts: each rank sends every other rank how many pairs it
       has for each of that rank's experts, E integers out and E in. The counts tell every rank how many rows it
       will receive and from whom, which the next all-to-all needs up front: it moves the token rows themselves,
       [T·K, H] out, [R, H] in, and a third moves each row's routing weight beside it. The rows arrive grouped by
       sender and, within a sender, by expert, so the counts alone say which local expert each received row is
       for: no expert ids travel.
    2. Expert compute: the R received rows through the local experts, with the best single-GPU formulation that
       runs here (level 7's Triton grouped GEMM on a GPU, level 4's per-expert GEMMs on the CPU), each row a
       one-slot "token" that carries its routing weight, so level 7 applies it in its down kernel's epilogue.
    3. Combine, the reverse all-to-all: the [R, H] weighted results go back to the ranks their tokens came
       from, in the order they left; there each is put back in (token, slot) order and summed over K, as level
       7 combines. The shared experts run locally: every rank has them.

What it costs, in bytes per token
    Each (token, slot) pair whose expert lives on another rank crosses the network twice, H elements each way
    (and its routing weight once): 2·K·H·2 bytes per token in bf16 when no expert is local, (W−1)/W of that on average with uniform routing. On
    `deepseek-v3` (H=7168, K=8) that is up to 229 KB per token, 1.9 GB per forward at 8192 tokens per rank. The
    counts exchange is E integers, negligible in bytes but a host sync: the collectives take their split sizes
    as host integers, so the CPU waits for the device once per forward, as in level 4.

When EP pays
    When the experts do not fit one GPU: deepseek-v3's 256 routed experts are 22.5 GB in bf16, per layer. And
    when the all-to-alls cost less than the expert compute they spread out: per token, the bytes above over the
    link's bandwidth, against 2·K·3·H·I FLOPs over the GPU's matmul rate. Both grow with K and H, so the ratio is
    set by the link and by I. Skewed routing hurts twice: the rank that holds the popular experts receives more
    rows and computes longer, and every other rank waits for it in the combine. The row reports the split.

Scaling, as the benchmark runs it (weak scaling)
    At world size W the layer has W·E experts (each rank the preset's E) and W·T tokens (T per rank), so the
    work per rank is constant and any time above the world-size-1 row is communication and imbalance:
    weak-scaling efficiency = time(W = 1) / time(W).

Run: torchrun --standalone --nproc-per-node 2 labs/moe_optimization_journey/level_ep_expert_parallel.py
         [--preset journey] [--tokens 8192] [--device cuda]      (plain `python` runs it at world size 1)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from moe_benchmark import (
    base_row,
    compare_to_reference,
    input_seed,
    make_inputs,
    measure_ceilings,
    quantile,
    release_memory,
    synchronize,
)

from moe_model import (
    ConfigError,
    MoEConfig,
    Traffic,
    flop_count,
    get_preset,
    init_weights,
    load_metrics,
    min_bytes,
    reference_forward,
    shared_experts_forward,
)


@dataclass
class Dispatched:
    """What one rank's dispatch leaves for its expert compute and its combine."""

    order: torch.Tensor  # [T·K] this rank's pairs sorted by expert (hence by destination rank)
    send_splits: list[int]  # rows this rank sent to each rank
    recv_splits: list[int]  # rows it received from each rank
    rows_RH: torch.Tensor  # [R, H] the received token rows
    routing_weights_R: torch.Tensor  # [R] their pairs' routing weights
    local_expert_ids_R: torch.Tensor  # [R] which local expert each received row is for


class ExpertParallelMoE:
    """One rank's share of the layer: routed experts [first_expert, first_expert + E_local) and a single-GPU level
    to run them."""

    level = "ep"
    name = "expert_parallel"
    summary = "experts dealt over W ranks; dispatch and combine by torch.distributed all-to-all"

    def __init__(self, config: MoEConfig, device: torch.device):
        self.config = config
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        if config.num_experts % self.world:
            raise ConfigError(f"{config.num_experts} experts do not split evenly over {self.world} ranks")
        self.experts_per_rank = config.num_experts // self.world
        self.first_expert = self.rank * self.experts_per_rank
        self.weights = init_weights(config, device, experts=range(self.first_expert,
                                                                  self.first_expert + self.experts_per_rank))
        # The local experts as a layer of their own: one slot per received row, no shared experts (they run
        # after the combine, on each rank's own tokens).
        local_config = dataclasses.replace(config, num_experts=self.experts_per_rank, top_k=1, num_shared_experts=0,
                                           name=f"{config.name} rank {self.rank}")
        no_shared = self.weights.w_shared_gate_SHI[:0], self.weights.w_shared_up_SHI[:0], \
            self.weights.w_shared_down_SIH[:0]
        local_weights = dataclasses.replace(self.weights, w_shared_gate_SHI=no_shared[0],
                                            w_shared_up_SHI=no_shared[1], w_shared_down_SIH=no_shared[2])
        self.local_level = local_level_class(device)(local_config, local_weights)
        self.local_level.prepare()

    def dispatch(self, tokens_TH: torch.Tensor, routing_weights_TK: torch.Tensor,
                 expert_ids_TK: torch.Tensor) -> Dispatched:
        K, E, W = expert_ids_TK.shape[1], self.config.num_experts, self.world
        expert_of_pair = expert_ids_TK.flatten()
        order = torch.argsort(expert_of_pair, stable=True)  # by expert: experts are dealt in contiguous slices
        # All-to-all 1: the counts. Rank r sends rank s the counts for s's experts and receives [W, E_local].
        send_counts_E = torch.bincount(expert_of_pair, minlength=E)
        recv_counts_WE = torch.empty_like(send_counts_E)
        dist.all_to_all_single(recv_counts_WE, send_counts_E)
        recv_counts_WE = recv_counts_WE.view(W, self.experts_per_rank)
        send_splits = send_counts_E.view(W, self.experts_per_rank).sum(dim=1).tolist()  # the host sync
        recv_splits = recv_counts_WE.sum(dim=1).tolist()
        # All-to-all 2: the token rows, each pair's token once per slot, and beside them the pairs' routing
        # weights (one element per row), which the receiving expert's down GEMM applies in its epilogue.
        rows_sent = tokens_TH.index_select(0, order // K)  # [T·K, H]
        rows_RH = tokens_TH.new_empty((sum(recv_splits), tokens_TH.shape[1]))
        dist.all_to_all_single(rows_RH, rows_sent, recv_splits, send_splits)
        routing_weights_R = routing_weights_TK.new_empty(rows_RH.shape[0])
        dist.all_to_all_single(routing_weights_R, routing_weights_TK.flatten()[order], recv_splits, send_splits)
        # Grouped by sender, then by expert: the local expert of each row follows from the counts.
        local_expert_ids_R = torch.repeat_interleave(
            torch.arange(self.experts_per_rank, device=tokens_TH.device).repeat(W), recv_counts_WE.flatten(),
            output_size=rows_RH.shape[0])
        return Dispatched(order, send_splits, recv_splits, rows_RH, routing_weights_R, local_expert_ids_R)

    def compute(self, dispatched: Dispatched) -> torch.Tensor:
        """[R, H]: each received row through its local expert, times its routing weight (nothing to do for a rank
        that received none). To the local level every row is a token with one slot."""
        if dispatched.rows_RH.shape[0] == 0:
            return dispatched.rows_RH
        return self.local_level.forward(dispatched.rows_RH, dispatched.routing_weights_R[:, None],
                                        dispatched.local_expert_ids_R[:, None])

    def combine(self, tokens_TH: torch.Tensor, routing_weights_TK: torch.Tensor, dispatched: Dispatched,
                results_RH: torch.Tensor) -> torch.Tensor:
        (T, K), H = routing_weights_TK.shape, tokens_TH.shape[1]
        # All-to-all 3, the reverse of 2: every result back to the rank its token came from, in the order it left.
        results_back = tokens_TH.new_empty((T * K, H))
        dist.all_to_all_single(results_back, results_RH.contiguous(), dispatched.send_splits, dispatched.recv_splits)
        # Each result to its (token, slot) row, then one sum over K, as level 7 combines: no atomic adds. (With
        # `index_add_` onto the token rows instead, deepseek-v3's combine took 1.45x as long on an H100: NOTES.md.)
        results_TKH = torch.empty_like(results_back).index_copy_(0, dispatched.order, results_back).view(T, K, H)
        out_TH = results_TKH.sum(dim=1)
        if self.config.num_shared_experts:  # replicated on every rank: run on the rank's own tokens, not sent
            out_TH += shared_experts_forward(tokens_TH, self.weights)
        return out_TH

    def forward(self, tokens_TH: torch.Tensor, routing_weights_TK: torch.Tensor,
                expert_ids_TK: torch.Tensor) -> torch.Tensor:
        dispatched = self.dispatch(tokens_TH, routing_weights_TK, expert_ids_TK)
        return self.combine(tokens_TH, routing_weights_TK, dispatched, self.compute(dispatched))


def local_level_class(device: torch.device) -> type:
    """Level 7 where Triton compiles for a GPU; level 4 on the CPU (level 7 would run in Triton's interpreter)."""
    if device.type == "cuda":
        from level7_triton_grouped import TritonGroupedLevel

        return TritonGroupedLevel
    from level4_grouped import GroupedLevel

    return GroupedLevel


# ---------------------------------------------------------------------------------------------------------------
# Benchmark mechanics: the check, the phase timing, the collectives' bandwidth, one row per world size. Like the
# base class of the single-GPU levels, and kept out of the lesson above.
# ---------------------------------------------------------------------------------------------------------------
REFERENCE_CHUNK = 32  # experts drawn at a time for the check: 2.8 GB of deepseek-v3 weights, beside the layer's own


def reference_on_rank(config: MoEConfig, tokens_TH: torch.Tensor, routing_weights_TK: torch.Tensor,
                      expert_ids_TK: torch.Tensor, chunk: int) -> torch.Tensor:
    """The fp32 reference for this rank's tokens over all E experts, drawn `chunk` experts at a time (no rank can
    hold them all at scale); the shared experts with the first chunk."""
    out_TH = None
    for first in range(0, config.num_experts, chunk):
        weights = init_weights(config, tokens_TH.device, experts=range(first, min(first + chunk, config.num_experts)))
        if first:
            weights = dataclasses.replace(weights, w_shared_gate_SHI=weights.w_shared_gate_SHI[:0],
                                          w_shared_up_SHI=weights.w_shared_up_SHI[:0],
                                          w_shared_down_SIH=weights.w_shared_down_SIH[:0])
        part = reference_forward(tokens_TH, weights, routing_weights_TK, expert_ids_TK, first_expert=first)
        out_TH = part if out_TH is None else out_TH.add_(part)
        del weights
    return out_TH


def clock(device: torch.device) -> object:
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def elapsed_ms(begin: object, end: object) -> float:
    return begin.elapsed_time(end) if isinstance(begin, torch.cuda.Event) else (end - begin) * 1e3


def time_phases(layer: ExpertParallelMoE, inputs, device: torch.device, warmup: int, repeats: int,
                budget_s: float) -> list[tuple[float, float, float]]:
    """(dispatch, expert compute, combine) ms of each timed forward. All ranks start each forward together (a
    barrier), after warm-up, with the L2 cache flushed on a GPU; every rank runs the same number of forwards."""
    start = time.perf_counter()
    for _ in range(max(warmup, 1)):
        layer.forward(*inputs.as_args())
    synchronize(device)
    estimate_s = (time.perf_counter() - start) / max(warmup, 1)
    count = torch.tensor([max(5, min(repeats, int(budget_s / max(estimate_s, 1e-6))))], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MIN)
    l2_flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if device.type == "cuda" else None
    marks = []
    for _ in range(int(count)):
        if l2_flush is not None:
            l2_flush.zero_()
        dist.barrier()
        begin = clock(device)
        dispatched = layer.dispatch(*inputs.as_args())
        dispatched_at = clock(device)
        results_RH = layer.compute(dispatched)
        computed_at = clock(device)
        layer.combine(inputs.tokens_TH, inputs.routing_weights_TK, dispatched, results_RH)
        marks.append((begin, dispatched_at, computed_at, clock(device)))
        del dispatched, results_RH  # before the next forward allocates its own
    synchronize(device)
    return [(elapsed_ms(a, b), elapsed_ms(b, c), elapsed_ms(c, d)) for a, b, c, d in marks]


def bus_bandwidth_gbps(device: torch.device, nbytes: int) -> dict[str, float | None]:
    """NCCL-tests' bus bandwidth of an all-to-all and of an all-reduce of `nbytes` per rank, on this group:
    algorithm bandwidth (bytes per rank / time) times (W−1)/W for the all-to-all, 2·(W−1)/W for the all-reduce,
    so that both read against the links' speed. None at world size 1 (nothing crosses a link). The size is the
    largest any rank asks for."""
    world = dist.get_world_size()
    if world == 1:
        return {"a2a_busbw_gbps": None, "allreduce_busbw_gbps": None}
    agreed = torch.tensor([nbytes], device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)  # every rank must move the same size
    elements = max(world, int(agreed) // 4 // world * world)
    send = torch.ones(elements, dtype=torch.float32, device=device)
    recv = torch.empty_like(send)
    result = {}
    for key, run, factor in (("a2a_busbw_gbps", lambda: dist.all_to_all_single(recv, send), (world - 1) / world),
                             ("allreduce_busbw_gbps", lambda: dist.all_reduce(send), 2 * (world - 1) / world)):
        for _ in range(3):
            run()
        times_ms = []
        for _ in range(10):
            dist.barrier()
            begin = clock(device)
            run()
            end = clock(device)
            synchronize(device)
            times_ms.append(elapsed_ms(begin, end))
        seconds = statistics.median(times_ms) * 1e-3
        result[key] = elements * 4 / seconds * factor / 1e9
    return result


def gather(value: object) -> list:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def benchmark_ep(preset: MoEConfig, tokens_per_rank: int, device: torch.device, traffic: Traffic, warmup: int,
                 repeats: int, budget_s: float) -> dict | None:
    """Check, then time, the EP layer at this world size (weak scaling: W·E experts, W·T tokens). Every rank
    calls it; rank 0 returns the row, the others None."""
    world, rank = dist.get_world_size(), dist.get_rank()
    config = dataclasses.replace(preset, num_experts=preset.num_experts * world)
    row = base_row(ExpertParallelMoE, config, tokens_per_rank * world, device, traffic)
    row.update(world_size=world, tokens_per_rank=tokens_per_rank, experts_per_rank=preset.num_experts,
               local_level=local_level_class(device).name, dispatch_ms=None, compute_ms=None, combine_ms=None,
               a2a_bytes=None, dispatch_gbps=None)
    layer = None
    try:
        layer = ExpertParallelMoE(config, device)
        row["local_level"] = f"{layer.local_level.level} {layer.local_level.name}"
        # Each rank its own tokens: the seed also depends on the rank.
        check_inputs = make_inputs(config, layer.weights, tokens_per_rank,
                                   input_seed(config, tokens_per_rank, f"check rank {rank}"), traffic)
        out_TH = layer.forward(*check_inputs.as_args())
        ref_TH = reference_on_rank(config, *check_inputs.as_args(), chunk=REFERENCE_CHUNK)
        check = compare_to_reference(out_TH, ref_TH, config.tolerance)
        checks = gather((check.rel_err, check.passed, check.message))
        row["rel_err"] = max(err for err, _, _ in checks)
        failed = [f"rank {r}: {message}" for r, (_, passed, message) in enumerate(checks) if not passed]
        if failed:
            row.update(status="error", note=f"wrong result: {failed[0]}")
            return row if rank == 0 else None
        del out_TH, ref_TH, check_inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the check's blocks, so the timed forwards find the memory in one piece

        inputs = make_inputs(config, layer.weights, tokens_per_rank,
                             input_seed(config, tokens_per_rank, f"timing rank {rank}"), traffic)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # the peak of the timed forwards, not of the check
        phases = time_phases(layer, inputs, device, warmup, repeats, budget_s)
        totals = [sum(p) for p in phases]
        dispatched = layer.dispatch(*inputs.as_args())
        element = inputs.tokens_TH.element_size()
        crossing_rows = sum(n for r, n in enumerate(dispatched.send_splits) if r != rank)
        per_rank = gather({
            "ms": statistics.median(totals), "ms_p20": quantile(totals, 0.2), "ms_p80": quantile(totals, 0.8),
            "phases": [statistics.median(p[i] for p in phases) for i in range(3)], "repeats": len(phases),
            # Out in the dispatch (row and routing weight), back in the combine.
            "bytes": crossing_rows * (2 * config.hidden + 1) * element,
            "expert_ids": inputs.expert_ids_TK.cpu(), "dropped": inputs.dropped_tokens,
            "peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        })
        bandwidth = bus_bandwidth_gbps(device, dispatched.rows_RH.numel() * element or 2**20)
        ceilings = measure_ceilings(device)
        if rank != 0:
            return None
        slowest = max(per_rank, key=lambda r: r["ms"])  # the layer is done when its slowest rank is
        ms = slowest["ms"]
        expert_ids = torch.cat([r["expert_ids"] for r in per_rank])
        flops = flop_count(config, tokens_per_rank * world)
        nbytes = min_bytes(config, tokens_per_rank * world, int(expert_ids.unique().numel()))
        pairs_per_rank = torch.bincount(expert_ids.flatten() // preset.num_experts, minlength=world).double()
        row.update(load_metrics(expert_ids, config.num_experts))
        row.update(
            ms=ms, ms_p20=slowest["ms_p20"], ms_p80=slowest["ms_p80"], repeats=slowest["repeats"],
            tokens_per_s=tokens_per_rank * world / (ms * 1e-3), tflops=flops / (ms * 1e-3) / 1e12,
            gbps=nbytes / (ms * 1e-3) / 1e9,
            # W GPUs: W times one GPU's ceilings.
            pct_roofline=100 * ceilings.floor_ms(flops / world, nbytes / world) / ms if ceilings else None,
            peak_mb=max(r["peak_mb"] for r in per_rank) if device.type == "cuda" else None,
            dropped_tokens=sum(r["dropped"] for r in per_rank),
            dispatch_ms=slowest["phases"][0], compute_ms=slowest["phases"][1], combine_ms=slowest["phases"][2],
            a2a_bytes=sum(r["bytes"] for r in per_rank),
            dispatch_gbps=max(r["bytes"] for r in per_rank) / 2 / (slowest["phases"][0] * 1e-3) / 1e9,
            rank_load_max_over_mean=(pairs_per_rank.max() / pairs_per_rank.mean()).item(),
            **bandwidth,
        )
    except torch.cuda.OutOfMemoryError:
        row.update(status="oom", note=f"CUDA out of memory at {tokens_per_rank} tokens per rank")
    finally:
        del layer
        release_memory(device)  # with a collection: the layer sits in a reference cycle
    return row if rank == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=f"Level EP: {ExpertParallelMoE.summary}")
    parser.add_argument("--preset", default=None, help="preset name(s), comma-separated (journey on a GPU, small "
                                                       "on the CPU); E is the experts per rank")
    parser.add_argument("--config-json", default=None, help="the presets as a JSON list of MoEConfig fields "
                                                            "(how `aisp bench run` passes inline shapes)")
    parser.add_argument("--tokens", default=None, help="tokens per rank, comma-separated (8192 GPU, 256 CPU)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--traffic", default="uniform")
    parser.add_argument("--zipf-s", type=float, default=1.2)
    parser.add_argument("--hot-share", type=float, default=0.5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--time-budget-s", type=float, default=3.0)
    parser.add_argument("--rows-out", type=Path, default=None, help="append the rows here (JSON lines)")
    args = parser.parse_args()

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    rank = int(os.environ.get("RANK", 0))
    try:
        if use_cuda and int(os.environ.get("WORLD_SIZE", 1)) > torch.cuda.device_count():
            raise ConfigError(f"world size {os.environ['WORLD_SIZE']} asked for, but this machine has "
                              f"{torch.cuda.device_count()} GPU(s)")
        if args.config_json:
            presets = [MoEConfig(**fields) for fields in json.loads(args.config_json)]
        else:
            presets = [get_preset(name) for name in (args.preset or ("journey" if use_cuda else "small")).split(",")]
        token_counts = [int(t) for t in (args.tokens or ("8192" if use_cuda else "256")).split(",")]
        if any(t <= 0 for t in token_counts):
            raise ConfigError(f"--tokens must be positive, got {args.tokens}")
        traffics = [Traffic(shape, zipf_s=args.zipf_s, hot_share=args.hot_share) for shape in args.traffic.split(",")]
    except (ConfigError, ValueError) as error:
        if rank == 0:
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group(backend, device_id=device if use_cuda else None)
    else:  # plain python: a group of one
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rows = []
    try:
        for preset in presets:
            for traffic in traffics:
                for tokens in token_counts:
                    row = benchmark_ep(preset, tokens, device, traffic, args.warmup, args.repeats,
                                       args.time_budget_s)
                    if row is not None:
                        rows.append(row)
                        if args.rows_out:
                            with open(args.rows_out, "a") as rows_file:
                                rows_file.write(json.dumps(row) + "\n")
    finally:
        dist.destroy_process_group()
    if rank == 0 and not args.rows_out:
        from moe_benchmark import rows_table
        from rich.console import Console

        Console().print(rows_table(rows, title=f"expert parallelism, world size {rows[0]['world_size']}"
                                   if rows else "expert parallelism"))


if __name__ == "__main__":
    main()
