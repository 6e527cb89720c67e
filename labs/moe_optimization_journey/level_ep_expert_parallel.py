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

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from ep_benchmark import run_ep_script

from moe_model import ConfigError, MoEConfig, init_weights, shared_experts_forward


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
        self.local_level = local_level_class(device)(local_config, self.weights.without_shared())
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


if __name__ == "__main__":
    run_ep_script(ExpertParallelMoE)
