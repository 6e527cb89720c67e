"""Run under torchrun by test_expert_parallel.py: each rank checks the EP layer's output for its own tokens against
`reference_forward` over the full expert set, on the cases below, unpipelined and in chunks (uneven ones; more chunks
than tokens on some ranks in `few_tokens`), and counts the rows its plan sends; rank 0 writes, per rank, {case:
{"checks": {chunks: [rel. error, passed]}, "received": rows received, "sent": {chunks: rows sent to other ranks},
"tokens_out": (token, other rank) pairs where that rank holds at least one of the token's experts, "pairs_out":
(token, slot) pairs whose expert is on another rank}}."""

import json
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "labs" / "moe_optimization_journey"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from level_ep_expert_parallel import ExpertParallelMoE  # noqa: E402
from moe_benchmark import compare_to_reference, make_inputs  # noqa: E402

from moe_model import MoEConfig, Traffic, init_weights, reference_forward  # noqa: E402

CHUNKS = (1, 4)  # of 37, 42, 47 and 52 tokens (ranks 0 to 3): uneven chunks on all ranks but the fourth


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    cases = {
        "uniform": (MoEConfig(hidden=48, intermediate=80, num_experts=2 * world, top_k=2, name="ep"), Traffic()),
        "zipf": (MoEConfig(hidden=48, intermediate=80, num_experts=2 * world, top_k=2, name="ep"),
                 Traffic("zipf", zipf_s=2.0)),
        "shared_expert_top1": (MoEConfig(hidden=48, intermediate=80, num_experts=world, top_k=1,
                                         num_shared_experts=1, name="ep"), Traffic()),
        "idle_rank": (MoEConfig(hidden=48, intermediate=80, num_experts=2 * world, top_k=2, name="ep"), Traffic()),
        # One token on rank 0: the shared expert's first half (under the dispatch) has no rows there.
        "few_tokens": (MoEConfig(hidden=48, intermediate=80, num_experts=2 * world, top_k=2, num_shared_experts=1,
                                 name="ep"), Traffic()),
        # K = E: every token goes to every rank, with two of its slots for each.
        "every_expert": (MoEConfig(hidden=48, intermediate=80, num_experts=2 * world, top_k=2 * world, name="ep"),
                         Traffic()),
    }
    for case, (config, traffic) in cases.items():
        layer = ExpertParallelMoE(config, torch.device("cpu"))
        # Uneven across ranks, multiples of nothing; in `few_tokens`, fewer tokens than chunks on ranks 0 and 1.
        num_tokens = 1 + rank if case == "few_tokens" else 37 + 5 * rank
        inputs = make_inputs(config, layer.weights, num_tokens, seed=100 * rank + len(case), traffic=traffic)
        if case == "idle_rank":  # no token on any rank picks rank 1's experts (2 and 3): rank 1 receives none
            allowed = torch.tensor([e for e in range(config.num_experts) if e // 2 != 1])
            generator = torch.Generator().manual_seed(rank)
            inputs.expert_ids_TK = torch.stack([allowed[torch.randperm(len(allowed), generator=generator)[:2]]
                                                for _ in range(num_tokens)])
        full = init_weights(config, "cpu")
        ref_TH = reference_forward(inputs.tokens_TH, full, inputs.routing_weights_TK, inputs.expert_ids_TK)
        checks, sent = {}, {}
        for chunks in CHUNKS:
            check = compare_to_reference(layer.forward(*inputs.as_args(), chunks=chunks), ref_TH, config.tolerance)
            checks[chunks] = (check.rel_err, check.passed)
            plan = layer.plan(*inputs.as_args(), chunks=chunks)
            sent[chunks] = sum(sum(splits) - splits[rank] for splits in plan.send_splits)
        # Counted here from the routing alone, one token at a time.
        other_ranks = [{int(e) // layer.experts_per_rank for e in ids} - {rank} for ids in inputs.expert_ids_TK]
        results[case] = {"checks": checks, "received": plan.rows_UH.shape[0], "sent": sent,
                         "tokens_out": sum(len(ranks) for ranks in other_ranks),
                         "pairs_out": int((inputs.expert_ids_TK // layer.experts_per_rank != rank).sum())}
    # The layer on groups of two ranks (`ExpertParallelMoE.on`, how the benchmark times every world size in one
    # launch): each rank's share of the whole world's layer, its collectives on its group, its experts numbered
    # from its place there, checked against a reference drawn for the experts its group holds.
    pairs = [dist.new_group([first, first + 1]) for first in range(0, world, 2)]  # every rank makes every group
    config = MoEConfig(hidden=48, intermediate=80, num_experts=2 * world, top_k=2, name="ep")
    layer = ExpertParallelMoE(config, torch.device("cpu"))
    smaller_config = MoEConfig(hidden=48, intermediate=80, num_experts=4, top_k=2, name="ep")
    smaller = layer.on(smaller_config, pairs[rank // 2])
    inputs = make_inputs(smaller_config, smaller.weights, 29 + rank, seed=7 + rank)
    group_experts = init_weights(smaller_config, "cpu", experts=range(4 * (rank // 2), 4 * (rank // 2) + 4))
    ref_TH = reference_forward(inputs.tokens_TH, group_experts, inputs.routing_weights_TK, inputs.expert_ids_TK)
    check = compare_to_reference(smaller.forward(*inputs.as_args(), chunks=2), ref_TH, config.tolerance)
    results["in_pairs"] = (smaller.rank, check.rel_err, check.passed)
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps(gathered))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
