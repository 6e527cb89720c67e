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
    (and its routing weight once): 2·K·H·2 bytes per token in bf16 when no expert is local, (W−1)/W of that on
    average with uniform routing. On `deepseek-v3` (H=7168, K=8) that is up to 229 KB per token, 1.9 GB per
    forward at 8192 tokens per rank. The counts exchange is E integers, negligible in bytes but a host sync: the
    collectives take their split sizes as host integers, so the CPU waits for the device once per forward, as in
    level 4.

Overlap: the forward in B chunks
    Run in that order, the steps take turns: the SMs idle while rows cross the link, and the link idles while the
    experts compute (a trial on two H100s, deepseek-v3 at 8192 tokens per rank: dispatch 3.1, compute 12.8,
    combine 4.8 ms). So split the rank's T tokens into B chunks (micro-batches) of about T/B tokens and pipeline
    them: chunk i+1's dispatch is on the wire while chunk i's experts compute, and chunk i's combine while chunk
    i+1's experts compute.
    - One sort, by (chunk, expert), makes every chunk's rows for every rank one contiguous slice of one send
      buffer, gathered once; the receive buffers are allocated once and sliced per chunk.
    - The counts of all chunks travel in one all-to-all up front, [B, E] integers: still one host sync per
      forward, not B.
    - The rows, weights and results travel with `async_op=True`: NCCL runs its collectives on a stream of its own,
      in the order they were issued, and `work.wait()` makes the compute stream wait for one before its buffer is
      read (on the CPU, gloo's threads move the bytes and the host waits).
    - The shared experts need nothing from other ranks: they run while the last chunk's combine is on the wire.
    Per forward: 1 + 3·B collectives, B times the local level's launches (level 7: about 8 kernels), 1 host sync.
    B = 1 is the plain dispatch, compute, combine.

When overlap pays
    Pipelined, only the first chunk's dispatch and the last chunk's combine stay exposed, about 1/B of the
    communication, as long as each chunk's communication (its rows across the link twice) takes no longer than its
    compute; where it takes longer, the link sets the pace and the compute is what hides. Against that gain,
    smaller GEMMs. Every chunk reads every local expert's weights again, for 1/B of its rows: an expert GEMM of M
    rows does about M FLOPs per byte of weight it reads, and under the GPU's ridge point (H100, bf16: 990 TFLOP/s
    over 3.35 TB/s, about 300 rows) it waits on memory instead of computing. deepseek-v3 at 8192 tokens per rank
    gives each of a rank's 256 experts about 256 rows; in 2 chunks they get 128 each and the rank's 22.5 GB of
    expert weights are read at least twice, about 7 ms each time, against 12.8 ms of compute in one chunk. At
    32768 tokens per rank 4 chunks still leave 256 rows per expert; mixtral (8 experts per rank) gets 2048 rows per
    expert at 8192 tokens, and chunks cost it little but launches. The collectives also take a few SMs while they
    run, so overlapped compute runs slower than alone. Hence the benchmark measures instead of assuming: it times
    B in {1, 2, 4, 8} for a few forwards each, keeps the fastest, and reports the exposed communication (the
    forward's time minus its expert compute) at B = 1 and at the chosen B.

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
         [--preset journey] [--tokens 8192] [--chunks auto] [--device cuda]   (plain `python`: world size 1)
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from ep_benchmark import measured, run_ep_script
from level4_grouped import permute

from moe_model import ConfigError, MoEConfig, init_weights, shared_experts_forward


@dataclass
class Plan:
    """One forward's routing, settled before any row moves: the send order, every chunk's split sizes (host
    integers, from the one counts exchange) and the buffers the all-to-alls read and write, sliced per chunk."""

    order: torch.Tensor  # [T·K] this rank's pairs sorted by chunk, then by expert (hence by destination rank)
    pair_bounds: list[int]  # chunk b's pairs are sorted positions pair_bounds[b] … pair_bounds[b+1] − 1
    row_bounds: list[int]  # chunk b's received rows are row_bounds[b] … row_bounds[b+1] − 1
    send_splits: list[list[int]]  # [B][W] rows this rank sends each rank, per chunk
    recv_splits: list[list[int]]  # [B][W] rows it receives from each rank, per chunk
    rows_sent: torch.Tensor  # [T·K, H] the token rows in sorted order
    weights_sent: torch.Tensor  # [T·K] their pairs' routing weights
    rows_RH: torch.Tensor  # [R, H] the received token rows, all chunks
    routing_weights_R: torch.Tensor  # [R] their pairs' routing weights
    local_expert_ids_R: torch.Tensor  # [R] which local expert each received row is for
    results_back: torch.Tensor  # [T·K, H] the combine's results, in sorted order

    def pairs(self, chunk: int) -> slice:
        return slice(self.pair_bounds[chunk], self.pair_bounds[chunk + 1])

    def rows(self, chunk: int) -> slice:
        return slice(self.row_bounds[chunk], self.row_bounds[chunk + 1])


class ExpertParallelMoE:
    """One rank's share of the layer: routed experts [first_expert, first_expert + E_local) and a single-GPU level
    to run them."""

    level = "ep"
    name = "expert_parallel"
    summary = "experts dealt over W ranks; all-to-all dispatch and combine, pipelined in chunks with expert compute"

    def __init__(self, config: MoEConfig, device: torch.device):
        self.config = config
        self.device = device
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        if config.num_experts % self.world:
            raise ConfigError(f"{config.num_experts} experts do not split evenly over {self.world} ranks")
        self.experts_per_rank = config.num_experts // self.world
        self.first_expert = self.rank * self.experts_per_rank
        self.weights = init_weights(config, device, experts=range(self.first_expert,
                                                                  self.first_expert + self.experts_per_rank))
        # The local experts as a layer of their own: one slot per received row, no shared experts (they run
        # beside the combine, on each rank's own tokens).
        local_config = dataclasses.replace(config, num_experts=self.experts_per_rank, top_k=1, num_shared_experts=0,
                                           name=f"{config.name} rank {self.rank}")
        self.local_level = local_level_class(device)(local_config, self.weights.without_shared())
        self.local_level.prepare()

    def plan(self, tokens_TH: torch.Tensor, routing_weights_TK: torch.Tensor, expert_ids_TK: torch.Tensor,
             chunks: int) -> Plan:
        (T, K), H = expert_ids_TK.shape, tokens_TH.shape[1]
        E, W, B, E_local = self.config.num_experts, self.world, chunks, self.experts_per_rank
        # Chunk b holds tokens ⌈b·T/B⌉ … ⌈(b+1)·T/B⌉ − 1: sizes differ by one at most (with T < B some are empty).
        # Pair p = t·K + k belongs to token t's chunk ⌊t·B/T⌋.
        chunk_of_pair = torch.arange(T * K, device=tokens_TH.device) // K * B // T
        # Level 4's permute, with (chunk, expert) as the key: experts are dealt in contiguous slices, so sorted by
        # key the rows are grouped by chunk, then by destination rank. Its counts stay on the device.
        sort_key_TK = (chunk_of_pair * E + expert_ids_TK.flatten()).view(T, K)
        order, _, counts, rows_sent = permute(tokens_TH, sort_key_TK, B * E)
        send_counts_BWE = counts.view(B, W, E_local)
        # All-to-all 1, the counts of every chunk at once: rank r sends rank s the counts for s's experts.
        recv_counts_WBE = torch.empty_like(send_counts_BWE).view(W, B, E_local)
        dist.all_to_all_single(recv_counts_WBE, send_counts_BWE.transpose(0, 1).contiguous())
        send_splits, recv_splits = torch.stack([send_counts_BWE.sum(dim=2),
                                                recv_counts_WBE.sum(dim=2).T]).tolist()  # the one host sync
        row_bounds = list(itertools.accumulate((sum(splits) for splits in recv_splits), initial=0))
        # Received rows are grouped by chunk, then sender, then expert: the local expert of each row follows from
        # the counts, and no expert ids travel.
        local_expert_ids_R = torch.repeat_interleave(
            torch.arange(E_local, device=tokens_TH.device).repeat(B * W), recv_counts_WBE.transpose(0, 1).flatten(),
            output_size=row_bounds[-1])
        return Plan(
            order=order, pair_bounds=[-(-b * T // B) * K for b in range(B + 1)], row_bounds=row_bounds,
            send_splits=send_splits, recv_splits=recv_splits,
            rows_sent=rows_sent, weights_sent=routing_weights_TK.flatten()[order],
            rows_RH=tokens_TH.new_empty((row_bounds[-1], H)),
            routing_weights_R=routing_weights_TK.new_empty(row_bounds[-1]),
            local_expert_ids_R=local_expert_ids_R, results_back=tokens_TH.new_empty((T * K, H)))

    def dispatch(self, plan: Plan, chunk: int) -> list[dist.Work]:
        """All-to-alls 2 and 3 of one chunk, started and not waited for: its token rows (each pair's token once
        per slot) and, beside them, their pairs' routing weights (one element per row), which the receiving
        expert's down GEMM applies in its epilogue."""
        sent, received = plan.pairs(chunk), plan.rows(chunk)
        splits = plan.recv_splits[chunk], plan.send_splits[chunk]
        return [dist.all_to_all_single(plan.rows_RH[received], plan.rows_sent[sent], *splits, async_op=True),
                dist.all_to_all_single(plan.routing_weights_R[received], plan.weights_sent[sent], *splits,
                                       async_op=True)]

    def compute(self, plan: Plan, chunk: int) -> torch.Tensor:
        """[R_c, H]: one chunk's received rows, each through its local expert, times its routing weight (nothing to
        do for a chunk that brought none). To the local level every row is a token with one slot."""
        rows = plan.rows(chunk)
        if rows.start == rows.stop:
            return plan.rows_RH[rows]
        return self.local_level.forward(plan.rows_RH[rows], plan.routing_weights_R[rows, None],
                                        plan.local_expert_ids_R[rows, None])

    def combine(self, plan: Plan, chunk: int, results_RH: torch.Tensor) -> dist.Work:
        """All-to-all 4 of one chunk, the reverse of 2, started and not waited for: every result back to the rank
        its token came from, into the sorted position its row left from."""
        return dist.all_to_all_single(plan.results_back[plan.pairs(chunk)], results_RH, plan.send_splits[chunk],
                                      plan.recv_splits[chunk], async_op=True)

    def forward(self, tokens_TH: torch.Tensor, routing_weights_TK: torch.Tensor, expert_ids_TK: torch.Tensor,
                chunks: int = 1, compute_spans: list | None = None) -> torch.Tensor:
        """This rank's output, its tokens in `chunks` pipelined chunks. Given a list, `compute_spans` receives the
        device-clock span of every expert compute: the chunks' in order, then the shared experts'."""
        (T, K), H = expert_ids_TK.shape, tokens_TH.shape[1]
        plan = self.plan(tokens_TH, routing_weights_TK, expert_ids_TK, chunks)
        arriving = self.dispatch(plan, 0)
        combining = []  # (collective, the results it reads): a tensor must outlive the collective that reads it
        for chunk in range(chunks):
            arrived = arriving
            if chunk + 1 < chunks:
                # Issued before this chunk's compute: NCCL's stream first waits for all the compute stream has
                # queued, so issued after it, the next chunk's dispatch would wait for this chunk's experts.
                arriving = self.dispatch(plan, chunk + 1)
            for work in arrived:
                work.wait()  # the compute stream waits for this chunk's rows (on the CPU, the host does)
            with measured(compute_spans, self.device):
                results_RH = self.compute(plan, chunk)
            combining.append((self.combine(plan, chunk, results_RH), results_RH))
        shared_TH = None
        if self.config.num_shared_experts:  # replicated on every rank, nothing to receive: runs under the last combine
            with measured(compute_spans, self.device):
                shared_TH = shared_experts_forward(tokens_TH, self.weights)
        for work, _ in combining:
            work.wait()
        # Each result to its (token, slot) row, then one sum over K, as level 7 combines: no atomic adds. (With
        # `index_add_` onto the token rows instead, deepseek-v3's combine took 1.45x as long on an H100: NOTES.md.)
        # Into the sorted rows' buffer: every dispatch has been waited for, so nothing reads it any more (3.8 GB
        # at deepseek-v3 with 32768 tokens per rank that need not be allocated again).
        results_TKH = plan.rows_sent.index_copy_(0, plan.order, plan.results_back)
        out_TH = results_TKH.view(T, K, H).sum(dim=1)
        if shared_TH is not None:
            out_TH += shared_TH
        return out_TH


def local_level_class(device: torch.device) -> type:
    """Level 7 where Triton compiles for a GPU; level 4 on the CPU (level 7 would run in Triton's interpreter)."""
    if device.type == "cuda":
        from level7_triton_grouped import TritonGroupedLevel

        return TritonGroupedLevel
    from level4_grouped import GroupedLevel

    return GroupedLevel


if __name__ == "__main__":
    run_ep_script(ExpertParallelMoE)
