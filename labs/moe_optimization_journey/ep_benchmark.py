"""Mechanics of the expert-parallel level (level_ep_expert_parallel.py), kept out of its lesson as moe_benchmark.py
keeps them out of the single-GPU levels: the check against the fp32 reference, the phase timing, the collectives'
bandwidth, and one result row per world size, written by rank 0.

Every function here runs on every rank of an initialised process group (torchrun, or a group of one).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from moe_benchmark import (
    base_row,
    compare_to_reference,
    device_clock,
    elapsed_ms,
    input_seed,
    interrupted_in_one_line,
    l2_flush_buffer,
    make_inputs,
    measure_ceilings,
    out_of_host_memory,
    quantile,
    release_memory,
    resolve_device,
    rows_table,
    synchronize,
    warm_up,
)

import moe_kernels
from cli.options import parse_counts, parse_presets, parse_world_sizes, refuse, script_cases, script_parser
from moe_model import (
    ConfigError,
    MoEConfig,
    Traffic,
    flop_count,
    init_weights,
    load_metrics,
    min_bytes,
    reference_forward,
)

# ---------------------------------------------------------------------------------------------------------------
REFERENCE_CHUNK = 32  # experts drawn at a time for the check: 2.8 GB of deepseek-v3 weights, beside the layer's own
AUTO_CHUNKS = (1, 2, 4, 8)  # the chunk counts `--ep-chunks auto` chooses from
CHOICE_REPEATS = 5  # timed forwards per chunk count while choosing (warm_up's minimum)


def reference_on_rank(config: MoEConfig, tokens_TH: torch.Tensor, routing_weights_TK: torch.Tensor,
                      expert_ids_TK: torch.Tensor, chunk: int, offset: int = 0) -> torch.Tensor:
    """The fp32 reference for this rank's tokens over all E experts, drawn `chunk` experts at a time (no rank can
    hold them all at scale); the shared experts with the first chunk. Expert e is drawn as expert offset + e (a
    smaller layer on a group of ranks further along: `ExpertParallelMoE.on`)."""
    out_TH = None
    for first in range(0, config.num_experts, chunk):
        weights = init_weights(config, tokens_TH.device,
                               experts=range(offset + first, offset + min(first + chunk, config.num_experts)))
        if first:
            weights = weights.without_shared()
        part = reference_forward(tokens_TH, weights, routing_weights_TK, expert_ids_TK, first_expert=first)
        out_TH = part if out_TH is None else out_TH.add_(part)
        del weights
    return out_TH


@contextmanager
def measured(spans: list | None, device: torch.device):
    """`with measured(spans, device): ...` appends the block's (begin, end) on the device's clock to `spans`, as
    the EP forward marks its expert compute; with `spans` None (a forward nobody times) it does nothing."""
    if spans is None:
        yield
        return
    begin = device_clock(device)
    yield
    spans.append((begin, device_clock(device)))


def time_forwards(variants: dict, device: torch.device, warmup: int, repeats: int,
                  budget_s: float) -> dict[object, list[dict[str, float]]]:
    """Timed forwards of every variant ({key: (layer, inputs, chunks)}: world sizes and chunk counts), interleaved:
    round i runs one forward of every variant, in an order rotated by i, so that a card heating under its power cap
    favours none (the EP lesson's "When overlap pays"). Each forward in ms: `ms` in all, `busy_ms` = all its
    expert-compute spans (shared experts included), `exposed_comm_ms` = ms − busy_ms, and the phases around the
    routed chunks' compute: `dispatch_ms` (from the start to the first chunk's compute, the first half of the shared
    experts included), `compute_ms` (the chunks' compute spans, summed) and `combine_ms` (from the last chunk's
    compute to the end, the second half included); with one chunk and no shared experts they are the plain
    dispatch, compute and combine. All ranks start each forward together (a barrier), after warm-up, with the L2
    cache flushed on a GPU; every rank runs the same number of rounds. `budget_s` is per variant."""
    mine = {key: (layer, inputs.as_args(), chunks) for key, (layer, inputs, chunks) in variants.items()}
    # A count of calls, not a time: the ranks of a group must make the same number of forwards (each one is a
    # collective), so every rank takes the fewest any rank can fit.
    calls = min(warm_up(lambda layer=layer, args=args, chunks=chunks: layer.forward(*args, chunks=chunks), device,
                        warmup, repeats, budget_s, least_s=0)[0] for layer, args, chunks in mine.values())
    rounds = torch.tensor([calls], device=device)
    dist.all_reduce(rounds, op=dist.ReduceOp.MIN)
    l2_flush = l2_flush_buffer(device)
    keys = list(variants)
    marks = {key: [] for key in mine}
    for i in range(int(rounds)):
        for key in keys[i % len(keys):] + keys[:i % len(keys)]:
            if l2_flush is not None:
                l2_flush.zero_()
            dist.barrier()
            layer, args, chunks = mine[key]
            spans = []
            begin = device_clock(device)
            layer.forward(*args, chunks=chunks, compute_spans=spans)
            marks[key].append((begin, spans, device_clock(device)))
    synchronize(device)
    times = {}
    for key, forwards in marks.items():
        layer, _, chunks = mine[key]
        shared = 1 if layer.config.num_shared_experts else 0  # a shared half's span before the chunks and after
        times[key] = []
        for begin, spans, end in forwards:
            routed = spans[shared:shared + chunks]
            total_ms, busy_ms = elapsed_ms(begin, end), sum(elapsed_ms(a, b) for a, b in spans)
            times[key].append({"ms": total_ms, "busy_ms": busy_ms, "exposed_comm_ms": total_ms - busy_ms,
                               "dispatch_ms": elapsed_ms(begin, routed[0][0]),
                               "compute_ms": sum(elapsed_ms(a, b) for a, b in routed),
                               "combine_ms": elapsed_ms(routed[-1][1], end)})
    return times


def summarize(times: list[dict[str, float]]) -> dict[str, float]:
    """One rank's medians over its timed forwards, with the spread of the total."""
    totals = [t["ms"] for t in times]
    return {"ms_p20": quantile(totals, 0.2), "ms_p80": quantile(totals, 0.8), "repeats": len(times),
            **{key: statistics.median(t[key] for t in times) for key in times[0]}}


def chunk_candidates(spec: str, tokens_per_rank: int) -> list[int]:
    """The chunk counts to choose from: `auto` is 1, 2, 4 and 8, those no larger than the tokens per rank; else
    the comma-separated counts given (a count above the tokens leaves some chunks empty, which works)."""
    if spec == "auto":
        return [chunks for chunks in AUTO_CHUNKS if chunks <= tokens_per_rank]
    return sorted({int(part) for part in spec.split(",")})


def time_chunk_counts(layers: dict, inputs: dict, candidates: list[int], device: torch.device, warmup: int,
                      budget_s: float) -> dict[int, dict[int, float]]:
    """A brief look at every candidate chunk count of every world size ({W: this rank's layer}), to choose one per
    W: {W: {chunks: ms}}, the median of a few forwards of each, timed interleaved (time_forwards), the slowest
    rank's (the same numbers on every rank, so every rank chooses the same counts). The check has already run every
    candidate once, so none costs the local level an autotune here."""
    times = time_forwards({(W, chunks): (layer, inputs[W], chunks) for W, layer in layers.items()
                           for chunks in candidates}, device, warmup, CHOICE_REPEATS, budget_s)
    everyone = gather({key: statistics.median(t["ms"] for t in forwards) for key, forwards in times.items()})
    return {W: {chunks: max(medians[W, chunks] for medians in everyone) for chunks in candidates} for W in layers}


def bus_bandwidth_gbps(device: torch.device, nbytes: int, group: dist.ProcessGroup | None
                       ) -> dict[str, float | None]:
    """NCCL-tests' bus bandwidth of an all-to-all and of an all-reduce of `nbytes` per rank, on `group` (its ranks
    call this): algorithm bandwidth (bytes per rank / time) times (W−1)/W for the all-to-all, 2·(W−1)/W for the
    all-reduce, so that both read against the links' speed. None at world size 1 (nothing crosses a link). The size
    is the largest any rank asks for."""
    world = dist.get_world_size(group)
    if world == 1:
        return {"a2a_busbw_gbps": None, "allreduce_busbw_gbps": None}
    agreed = torch.tensor([nbytes], device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)  # every rank must move the same size
    elements = max(world, int(agreed) // 4 // world * world)
    send = torch.ones(elements, dtype=torch.float32, device=device)
    recv = torch.empty_like(send)
    result = {}
    for key, run, factor in (("a2a_busbw_gbps", lambda: dist.all_to_all_single(recv, send, group=group),
                              (world - 1) / world),
                             ("allreduce_busbw_gbps", lambda: dist.all_reduce(send, group=group),
                              2 * (world - 1) / world)):
        for _ in range(3):
            run()
        times_ms = []
        for _ in range(10):
            dist.barrier(group=group)
            begin = device_clock(device)
            run()
            end = device_clock(device)
            synchronize(device)
            times_ms.append(elapsed_ms(begin, end))
        seconds = statistics.median(times_ms) * 1e-3
        result[key] = elements * 4 / seconds * factor / 1e9
    return result


def gather(value: object) -> list:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def world_groups(world_sizes: list[int]) -> dict[int, dist.ProcessGroup | None]:
    """{W: this rank's group of W} for each world size: the ranks dealt into world/W groups of W in a row, so that
    every rank runs every world size's layer at once (the whole world as None). Made once per process: every rank
    must make every group, in the same order."""
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = {}
    for W in sorted(world_sizes):
        if W == world:
            groups[W] = None
            continue
        for first in range(0, world, W):
            group = dist.new_group(list(range(first, first + W)))
            if first <= rank < first + W:
                groups[W] = group
    return groups


def benchmark_ep(layer_cls: type, preset: MoEConfig, tokens_per_rank: int, device: torch.device, traffic: Traffic,
                 groups: dict[int, dist.ProcessGroup | None], warmup: int, repeats: int, budget_s: float,
                 chunks: str = "auto") -> list[dict]:
    """Check, then time, the EP layer at every world size W of `groups` (world_groups), weak scaling: W·E experts,
    W·T tokens. All world sizes run in this one process, their forwards timed in turn as the chunk counts are, and
    every GPU busy at each: at W below the world, the ranks run world/W layers of W ranks at once, each rank's
    sharing the whole world's weights (`ExpertParallelMoE.on`), and a W's time is its slowest rank's, at W = 1 as at
    W = 2. Timed in processes of their own, a world-size-1 time moved by 5% from one process to the next and the
    efficiency with it; timed in turn with the other ranks idle at W = 1, W = 2 lost a millisecond to it (NOTES.md).
    Each W runs unpipelined and in the chunk count that a brief timing of its candidates (`chunks`: see
    chunk_candidates) finds fastest. The bytes, loads and bandwidths of a W's row are its first group's. Every rank
    calls it; rank 0 returns the rows (ResultRow.to_json()), one per W, the others []."""
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = sorted(groups)
    configs = {W: dataclasses.replace(preset, num_experts=preset.num_experts * W) for W in sizes}
    candidates = chunk_candidates(chunks, tokens_per_rank)
    rows = {W: base_row(layer_cls, configs[W], tokens_per_rank * W, device, traffic) for W in sizes}
    for W, row in rows.items():
        row.update(world_size=W, tokens_per_rank=tokens_per_rank, experts_per_rank=preset.num_experts)
    whole = layers = layer = inputs = None
    try:
        whole = layer_cls(configs[world], device)
        layers = {W: whole if W == world else whole.on(configs[W], groups[W]) for W in sizes}  # this rank's, each W
        for row in rows.values():
            row.local_level = f"{whole.local_level.level} {whole.local_level.name}"
        # Each rank its own tokens: the seed also depends on the rank. Every chunk count that may be timed is
        # checked, against one reference, drawn for the experts this rank's group holds.
        for W, layer in layers.items():
            check_inputs = make_inputs(configs[W], layer.weights, tokens_per_rank,
                                       input_seed(configs[W], tokens_per_rank, f"check rank {rank}"), traffic)
            ref_TH = reference_on_rank(configs[W], *check_inputs.as_args(), chunk=REFERENCE_CHUNK,
                                       offset=layer.first_expert - layer.rank * layer.experts_per_rank)
            by_count = {count: compare_to_reference(layer.forward(*check_inputs.as_args(), chunks=count), ref_TH,
                                                    configs[W].tolerance) for count in sorted({1, *candidates})}
            count, worst = max(by_count.items(), key=lambda item: (not item[1].passed, item[1].rel_err))
            checks = gather((worst.rel_err, worst.passed, f"in {count} chunk(s): {worst.message}"))
            del ref_TH, check_inputs
            rows[W].rel_err = max(err for err, _, _ in checks)
            failed = [f"rank {r}: {message}" for r, (_, passed, message) in enumerate(checks) if not passed]
            if failed:
                rows[W].update(status="error", note=f"wrong result: {failed[0]}")
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the checks' blocks, so the timed forwards find the memory in one piece
        layers = {W: layer for W, layer in layers.items() if rows[W].status == "ok"}
        if not layers:  # every world size failed its check: nothing to time
            return [row.to_json() for row in rows.values()] if rank == 0 else []
        inputs = {W: make_inputs(configs[W], layer.weights, tokens_per_rank,
                                 input_seed(configs[W], tokens_per_rank, f"timing rank {rank}"), traffic)
                  for W, layer in layers.items()}
        # On the CPU the reduce and the final sum run as torch ops while timed, as the levels' CPU rows run their
        # elementwise kernels (the check above ran them in Triton's interpreter).
        with moe_kernels.torch_ops_on_cpu():
            chunk_ms = time_chunk_counts(layers, inputs, candidates, device, warmup, budget_s)
            chosen = {W: min(by_count, key=by_count.get) for W, by_count in chunk_ms.items()}
            # Without overlap and with it, every world size, timed interleaved: the rows' before and after.
            timed = time_forwards({(W, count): (layer, inputs[W], count) for W, layer in layers.items()
                                   for count in sorted({1, chosen[W]})}, device, warmup, repeats, budget_s)
        ceilings = measure_ceilings(device)
        for W, layer in layers.items():
            per_rank = gather(measured_on_rank(layer, inputs[W], timed, W, chosen[W], tokens_per_rank, device))
            bandwidth = bus_bandwidth_gbps(device, per_rank[rank]["sent_row_bytes"], groups[W])
            if rank == 0:
                fill_row(rows[W], per_rank, chunk_ms[W], chosen[W], bandwidth, ceilings, configs[W], preset,
                         tokens_per_rank, device)
    except Exception as error:  # out of memory: a row that says so (every rank's layer is the same size)
        if not (isinstance(error, torch.cuda.OutOfMemoryError) or out_of_host_memory(error)):
            raise
        memory = "CUDA" if device.type == "cuda" else "host"
        for W, row in rows.items():
            if row.status == "ok" and row.ms is None:
                row.update(status="oom", note=f"out of {memory} memory at {tokens_per_rank} tokens per rank")
    finally:
        whole = layers = layer = inputs = None  # every reference to the layer, before the next case draws its own
        release_memory(device)  # with a collection: the layer sits in a reference cycle
    return [row.to_json() for row in rows.values()] if rank == 0 else []


def measured_on_rank(layer, inputs, timed: dict, W: int, chosen: int, tokens_per_rank: int,
                     device: torch.device) -> dict:
    """What this rank measured at world size W, what it sent, and the memory W's forwards peak at: for rank 0's
    row. Every rank of W's group calls it (the peak's forwards are collectives)."""
    # One row per (token, rank) where the rank holds any of the token's experts; those to this rank stay here.
    goes_TW = torch.zeros((tokens_per_rank, W), dtype=torch.bool, device=device).scatter_(
        1, inputs.expert_ids_TK // layer.experts_per_rank, True)
    sent_rows = int(goes_TW.sum())
    crossing_rows = sent_rows - int(goes_TW[:, layer.rank].sum())
    row_bytes = layer.config.hidden * inputs.tokens_TH.element_size()
    # Out in the dispatch: the row, and per slot its expert on that rank (int32) and its routing weight.
    routing_bytes = layer.config.top_k * (4 + inputs.routing_weights_TK.element_size())
    peak_mb = None
    if device.type == "cuda":  # this W's own peak: one forward of each timed count, the other sizes' long freed
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for chunks in sorted({1, chosen}):
            layer.forward(*inputs.as_args(), chunks=chunks)
        synchronize(device)
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    return {
        "unpipelined": summarize(timed[W, 1]), "pipelined": summarize(timed[W, chosen]),
        "dispatch_bytes": crossing_rows * (row_bytes + routing_bytes),
        "bytes": crossing_rows * (2 * row_bytes + routing_bytes),  # and back in the combine: the partial sums
        "sent_row_bytes": sent_rows * row_bytes or 2**20,
        "expert_ids": inputs.expert_ids_TK.cpu(), "dropped": inputs.dropped_tokens,
        "peak_mb": peak_mb,
    }


def fill_row(row, per_rank: list[dict], chunk_ms: dict[int, float], chosen: int, bandwidth: dict, ceilings,
             config: MoEConfig, preset: MoEConfig, tokens_per_rank: int, device: torch.device) -> None:
    """Rank 0's row at one world size W, from every rank's measurements there (measured_on_rank): the times over
    every rank (world/W layers ran at once), the bytes and loads of the first group's W ranks (one layer's)."""
    world = config.num_experts // preset.num_experts
    # The layer is done when its slowest rank is. Its phases are read on the busiest rank (longest compute):
    # the others finish at about the same time, having waited for it inside their combine.
    slowest = max((r["pipelined"] for r in per_rank), key=lambda times: times["ms"])
    slowest_unpipelined = max((r["unpipelined"] for r in per_rank), key=lambda times: times["ms"])
    busiest = max(per_rank, key=lambda r: r["unpipelined"]["busy_ms"])
    busiest_unpipelined, busiest_pipelined = busiest["unpipelined"], busiest["pipelined"]
    if slowest_unpipelined["ms"] <= slowest["ms"]:  # the brief timing's pick lost when timed in full: keep 1
        chosen, slowest, busiest_pipelined = 1, slowest_unpipelined, busiest_unpipelined
    peak_mb = max(r["peak_mb"] for r in per_rank) if device.type == "cuda" else None
    per_rank = per_rank[:world]  # the first group's: one layer
    busiest_dispatch_bytes = max(r["dispatch_bytes"] for r in per_rank)
    ms = slowest["ms"]
    expert_ids = torch.cat([r["expert_ids"] for r in per_rank])
    flops = flop_count(config, tokens_per_rank * world)
    nbytes = min_bytes(config, tokens_per_rank * world, int(expert_ids.unique().numel()))
    pairs_per_rank = torch.bincount(expert_ids.flatten() // preset.num_experts, minlength=world).double()
    row.update(**load_metrics(expert_ids, config.num_experts))
    row.update(
        ms=ms, ms_p20=slowest["ms_p20"], ms_p80=slowest["ms_p80"], repeats=slowest["repeats"],
        tokens_per_s=tokens_per_rank * world / (ms * 1e-3), tflops=flops / (ms * 1e-3) / 1e12,
        gbps=nbytes / (ms * 1e-3) / 1e9,
        # W GPUs: W times one GPU's ceilings.
        pct_roofline=100 * ceilings.floor_ms(flops / world, nbytes / world) / ms if ceilings else None,
        peak_mb=peak_mb,
        dropped_tokens=sum(r["dropped"] for r in per_rank),
        # The phases are the unpipelined forward's: pipelined, they overlap.
        phases_rank="busiest", dispatch_ms=busiest_unpipelined["dispatch_ms"],
        compute_ms=busiest_unpipelined["compute_ms"], combine_ms=busiest_unpipelined["combine_ms"],
        chunks=chosen, chunk_ms={str(count): value for count, value in chunk_ms.items()},
        ms_c1=slowest_unpipelined["ms"], exposed_comm_ms_c1=busiest_unpipelined["exposed_comm_ms"],
        exposed_comm_ms=busiest_pipelined["exposed_comm_ms"], compute_ms_chunked=busiest_pipelined["compute_ms"],
        a2a_bytes=sum(r["bytes"] for r in per_rank),
        dispatch_gbps=busiest_dispatch_bytes / (busiest_unpipelined["dispatch_ms"] * 1e-3) / 1e9,
        rank_load_max_over_mean=(pairs_per_rank.max() / pairs_per_rank.mean()).item(),
        **bandwidth,
    )


def run_ep_script(layer_cls: type) -> None:
    """The EP level's entry point, under torchrun or alone (a group of one): check and time each case, print or
    append the rows. Its options are a level script's (cli/options.py), with tokens and experts per rank."""
    parser = script_parser(Path(sys.argv[0]).name, sys.modules[layer_cls.__module__].__doc__, "tokens per rank")
    parser.add_argument("--config-json", default=None, help="the presets as a JSON list of MoEConfig fields "
                                                            "(how `aisp bench run` passes them)")
    parser.add_argument("--time-budget-s", type=float, default=None, help="seconds of timed calls per row "
                                                                          "(default: the device's)")
    parser.add_argument("--ep-chunks", default="auto", help="chunk counts of the pipelined forward to choose from, "
                                                         "comma-separated, or auto: 1, 2, 4 and 8 (one chunk, "
                                                         "the baseline, is always timed too)")
    parser.add_argument("--world-size", default=None, help="the world sizes to time in turn, comma-separated, "
                                                             "the largest this launch's (default: it alone)")
    parser.add_argument("--rows-out", type=Path, default=None, help="append the rows here (JSON lines)")
    args = parser.parse_args()

    rank = int(os.environ.get("RANK", 0))
    try:
        use_cuda = resolve_device(args.device).type == "cuda"
        if use_cuda and int(os.environ.get("WORLD_SIZE", 1)) > torch.cuda.device_count():
            raise ConfigError(f"world size {os.environ['WORLD_SIZE']} asked for, but this machine has "
                              f"{torch.cuda.device_count()} GPU(s)")
        cases = script_cases(args, "cuda" if use_cuda else "cpu")
        if args.config_json:
            presets = [MoEConfig(**fields) for fields in json.loads(args.config_json)]
        else:
            presets = parse_presets(args.preset or cases.defaults.preset)
        if args.ep_chunks != "auto":
            parse_counts(args.ep_chunks, "--ep-chunks")
        world = int(os.environ.get("WORLD_SIZE", 1))
        world_sizes = parse_world_sizes(args.world_size, "--world-size") if args.world_size else [world]
        if max(world_sizes) != world:
            raise ConfigError(f"--world-size {args.world_size}: the largest must be this launch's world size, "
                              f"{world} (launch it with torchrun --standalone --nproc-per-node {max(world_sizes)}, or "
                              f"run aisp bench run --levels ep --world-size {args.world_size})")
    except ValueError as error:  # UsageError, ConfigError, and a --config-json that is not JSON
        refuse(parser.prog, error, quiet=rank != 0)
    budget_s = args.time_budget_s if args.time_budget_s is not None else cases.defaults.time_budget_s

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
    with interrupted_in_one_line(parser.prog, quiet=rank != 0):
        try:
            groups = world_groups(world_sizes)
            for preset in presets:
                for traffic in cases.traffics:
                    for tokens in cases.token_counts:
                        case_rows = benchmark_ep(layer_cls, preset, tokens, device, traffic, groups, cases.warmup,
                                                 cases.repeats, budget_s, args.ep_chunks)
                        rows += case_rows
                        if args.rows_out and case_rows:
                            with open(args.rows_out, "a") as rows_file:
                                rows_file.writelines(json.dumps(row) + "\n" for row in case_rows)
        finally:
            dist.destroy_process_group()
    if rank == 0 and not args.rows_out:
        from rich.console import Console

        Console().print(rows_table(rows, title="expert parallelism, world sizes "
                                   + ", ".join(map(str, world_sizes))))


