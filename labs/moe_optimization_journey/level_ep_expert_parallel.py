"""Level EP: expert parallelism. The experts no longer fit one GPU: deal them out over W ranks, send each token
to the ranks that hold its experts, and bring the results back.

The idea
    Rank r holds a contiguous slice of E_local = E / W experts, r·E_local … (r+1)·E_local − 1, plus a copy of
    the router and of the shared experts. Each rank routes its own T tokens as every level does, then:
    1. Dispatch (`torch.distributed.all_to_all_single`), one row per (token, rank), not per (token, slot): a token
       goes ONCE to each rank that holds at least one of its K experts, however many it holds there (DeepEP's
       dispatch does the same). Sort these D rows (D ≤ T·W) by destination rank; beside each travels its token's
       routing, restricted to that rank: for each of the K slots the expert's id on that rank (E_local where the
       expert lives elsewhere, "not here") and the routing weight. First exchange counts: each rank sends every
       other rank how many rows, and how many (row, slot) pairs for its experts, it will send there, 2 integers
       a rank and chunk. The counts tell every rank how many rows it will receive and from whom, which the next
       all-to-alls need up front: they move the token rows themselves, [D, H] out, [U, H] in, then the ids
       [D, K] and the weights [D, K] beside them.
    2. Expert compute. Expand: the U received rows into the R (row, slot) pairs whose expert is local, one gather in GPU
       memory (about 3 TB/s on an H100, 10-15x the 200-300 GB/s the all-to-alls reached over NVLink in the committed
       runs). Then the R rows through the local experts, with the best single-GPU formulation that runs here (level 9's
       persistent TMA GEMMs on a Hopper GPU, level 7's Triton grouped GEMM on another, level 4's per-expert GEMMs on the
       CPU), each a one-slot "token" that carries its routing weight, so the local level applies it in its down kernel's
       epilogue. Level 9 runs without its graph, which replays one T, where R changes every forward: on two H200s it
       took 6% off the forward at W = 1 against level 7 (mixtral 40.7 → 38.2 ms, deepseek-v3 52.2 → 49.0 at 32768 tokens
       per rank; NOTES.md). Reduce: each received row's pair results summed into one row (`gather_sum`: each output row
       reads its own few results and writes once, in fp32; `index_add_`'s bf16 atomic adds cost several ms more on an
       H100, NOTES.md), so one row per (token, rank) goes back, not one per pair.
    3. Combine, the reverse all-to-all: the [U, H] partial sums go back to the ranks their tokens came from, in
       the order they left; there each token's partial rows (one from each rank that holds any of its experts)
       are added into its output row, with the shared experts, which run locally: every rank has them.

What it costs, in bytes per token
    A token crosses to each other rank that holds at least one of its experts: its row out and a partial sum
    back, H·2 bytes each way in bf16, and its routing out, K·(4 + 2) bytes (int32 ids, bf16 weights). With
    uniform routing a given rank holds at least one of a token's K experts with probability
    1 − C(E − E_local, K) / C(E, K), so a token sends (W − 1) times that many rows across.
    As the benchmark runs them at W = 2 (each rank the preset's experts, weak scaling):
    - deepseek-v3 (H=7168, K=8, 512 experts, 256 a rank): 0.996 rows a token cross instead of K/2 = 4 pairs,
      28.6 KB a token out and back instead of 114.7 KB (the per-pair dispatch: 2·H·2 bytes and a weight per pair),
      4.0x fewer; 234 MB a rank per forward at 8192 tokens per rank instead of 940 MB.
    - mixtral (H=4096, K=2, 16 experts, 8 a rank): 0.767 rows instead of 1 pair, 12.6 KB instead of 16.4 KB,
      1.3x fewer: with K = 2 the only saving is a token with both experts on the other rank, 7 tokens in 30.
    What the saving costs: on the receiving rank, the expand (read and write R·H elements) and the reduce (read R·H,
    write U·H), in GPU memory, and on the sending rank the sum of each token's partial rows (read D·H). What it
    saves in memory: two buffers of rows for the whole forward, the sent [D, H] (D ≤ T·W; the partial sums come back
    over it) and the received [U, H] (the partial sums are written over it), where the per-pair dispatch held four
    of [T·K, H] (sent, received, results, results back); beside them, per chunk, the expand's [R_b, H] and the local
    level's own. At deepseek-v3 with 32768 tokens per rank, W = 2: about 2·T rows, 0.94 GB, each, against 3.8 GB
    each. The counts exchange is 2·W integers a chunk, negligible in bytes but a host sync: the collectives take
    their split sizes as host integers, so the CPU waits for the device once per forward, as in level 4.

Overlap: the forward in B chunks
    Run in that order, the steps take turns: the SMs idle while rows cross the link, and the link idles while the
    experts compute (the trial on two H100s that issue 14's text reports, of this level's first code, with the per-pair
    dispatch and no run committed: deepseek-v3 at 8192 tokens per rank, dispatch 3.1, compute 12.8, combine 4.8 ms). So
    split the rank's T tokens into B chunks (micro-batches) of about T/B tokens and pipeline them: chunk i+1's dispatch
    is on the wire while chunk i's experts compute, and chunk i's combine while chunk i+1's experts compute.
    - One sort, by (chunk, destination rank), makes every chunk's rows for every rank one contiguous slice of one
      send buffer, gathered once; the receive buffers are allocated once and sliced per chunk, and each chunk's
      results go back over its own rows (the reduced ones over the received rows, the returned ones over the sent).
    - The counts of all chunks travel in one all-to-all up front, [B, W, 2] integers: still one host sync per
      forward, not B.
    - The rows, ids, weights and results travel with `async_op=True`: NCCL runs its collectives on a stream of
      its own, in the order they were issued, and `work.wait()` makes the compute stream wait for one before its
      buffer is read (on the CPU, gloo's threads move the bytes and the host waits).
    - The shared experts need nothing from other ranks, so they hide communication too: the first half of the
      rank's tokens go through them while the first chunk's dispatch is on the wire (where nothing else could run),
      the second half while the last chunk's combine is.
    Per forward: 1 + 4·B collectives, B times the local level's launches (level 9: about 5 kernels) and the
    expand and reduce (about 8 small kernels), 1 host sync. B = 1 is the plain dispatch, compute, combine.

When overlap pays
    Pipelined, only the first chunk's dispatch and the last chunk's combine stay exposed, about 1/B of the
    communication, as long as each chunk's communication (its rows across the link twice) takes no longer than its
    compute; where it takes longer, the link sets the pace and the compute is what hides. Against that gain,
    smaller GEMMs. Every chunk reads every local expert's weights again, for 1/B of its rows: an expert GEMM of M
    rows does about M FLOPs per byte of weight it reads, and under the GPU's ridge point (an H100's spec sheet, bf16:
    990 TFLOP/s over 3.35 TB/s, about 300 rows) it waits on memory instead of computing. deepseek-v3 at 8192 tokens per
    rank gives each of a rank's 256 experts about 256 rows; in 2 chunks they get 128 each and the rank's 22.5 GB of
    expert weights are read at least twice, about 7 ms each time, against 12.8 ms of compute in one chunk. At
    32768 tokens per rank 4 chunks still leave 256 rows per expert; mixtral (8 experts per rank) gets 2048 rows per
    expert at 8192 tokens, and chunks cost it little but launches. With one row per (token, rank) there is less
    to hide (deepseek-v3: a quarter of the per-pair bytes), so the chunks gain less than they did. The
    collectives also take a few SMs while they run, so overlapped compute runs slower than alone, and a
    persistent GEMM most: level 9 deals its tiles to one program per SM up front, so a program whose SM an NCCL
    kernel holds (spinning until the peer's rows arrive) starts late and the whole GEMM ends late, where level 7's
    programs go to whichever SM frees up. On two H200s at W = 2 (deepseek-v3, 32768 tokens per rank) two chunks
    stretched the busiest rank's expert compute from 48.6 to 60.5 ms with level 9, from 50.0 to 56.0 with level 7
    (NOTES.md). Hence the benchmark measures instead of assuming: it times B in {1, 2, 4, 8} for a few forwards
    each, keeps the fastest, and reports the exposed communication (the forward's time minus its expert compute,
    the expand and reduce included in the compute) at B = 1 and at the chosen B, read on the busiest rank: under
    skew the others spend their combine waiting for it, and their "exposed" time would be that wait. The counts are
    timed interleaved, forward by forward: a GPU under its power cap heats through a run of calls, and timed one
    after the other the later count would meet the hotter card.
    The link itself is NCCL's: its all-to-all moved 252 GB/s each way between two NVLinked H200s, where a put into
    the peer's memory through torch's symmetric memory moved 375. As such puts, the dispatch and the combine each
    ran 0.1-0.3 ms faster at 32768 tokens per rank (mixtral on two H200s; mixtral and deepseek-v3 on two H100s), and
    the forward no faster than its spread from one round to the next (NOTES.md): not worth a second, GPU-only
    transport beside the one the CPU tests run. Nor does NCCL give its SMs back cheaply: capped at 8 CTAs per
    communicator (`ProcessGroupNCCL.Options().config.max_ctas`), deepseek-v3's dispatch phase at W = 2 grew from
    5.2-5.9 to 7.9-8.7 ms on two H200s and the compute beside it gained nothing beyond its spread.

When EP pays
    When the experts do not fit one GPU: deepseek-v3's 256 routed experts are 22.5 GB in bf16, per layer. And
    when the all-to-alls cost less than the expert compute they spread out: per token, the bytes above over the
    link's bandwidth, against 2·K·3·H·I FLOPs over the GPU's matmul rate. The bytes grow with H and, up to one
    row per other rank, with K; the FLOPs with K·H·I, so the more experts a token picks, the more each row it
    sends carries. Skewed routing hurts twice: the rank that holds the popular experts receives more rows and
    computes longer, and every other rank waits for it in the combine. The row reports the split. Measured at 32768
    tokens per rank under uniform routing, with level 7 as the local level (NOTES.md): on two H100s (NVLink)
    0.92-0.96 (mixtral) and 0.95-0.96 (deepseek-v3) weak-scaling efficiency at W = 2, two runs each; on four H200s
    (NVLink between every pair) 0.92 and 0.91 at W = 4. With level 9, on two H200s: 0.933 and 0.946, the forward
    7-9% and 6% shorter than level 7's on such pairs; with the world sizes timed in turn (below), 0.953-0.992 on
    both presets over five launches, and on four H200s 0.965-0.975 at W = 2 and 0.96 (mixtral) and 0.91
    (deepseek-v3) at W = 4. Under zipf traffic 0.58-0.67 at W = 2 and 0.32-0.41 at W = 4, the busiest rank
    holding 1.7-1.9x and 2.9-3.5x the mean load.

Scaling, as the benchmark runs it (weak scaling)
    At world size W the layer has W·E experts (each rank the preset's E) and W·T tokens (T per rank), so the
    work per rank is constant and any time above the world-size-1 row is communication and imbalance:
    weak-scaling efficiency = time(W = 1) / time(W). The benchmark takes both in one torchrun of max(W) processes,
    forward by forward in turn, every GPU busy at every W (at W = 1 each rank runs a layer of its own experts), and
    reads each W on its slowest rank: timed in processes of their own, the world-size-1 time of mixtral moved by 5%
    from one process to the next on two H200s, and the efficiency across 0.933-0.995 with it (NOTES.md).

Run: torchrun --standalone --nproc-per-node 2 labs/moe_optimization_journey/level_ep_expert_parallel.py
         [--world-size 1,2] [--preset journey] [--tokens 8192] [--ep-chunks auto] [--device cuda]
     (plain `python`: world size 1)
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from ep_benchmark import measured, run_ep_script
from level5_cudagraphs import Graphed

from moe_kernels import gather_sum
from moe_model import ConfigError, MoEConfig, init_weights, shared_experts_forward


@dataclass
class Plan:
    """One forward's routing, settled before any row moves: which rows go where, every chunk's split sizes (host
    integers, from the one counts exchange) and the buffers the all-to-alls read and write, sliced per chunk."""

    row_of_token_TW: torch.Tensor  # [T, W] where (token, rank)'s row sits among the D sent, −1 if it goes nowhere
    sent_bounds: list[int]  # chunk b's sent rows are sent_bounds[b] … sent_bounds[b+1] − 1
    received_bounds: list[int]  # chunk b's received rows are received_bounds[b] … received_bounds[b+1] − 1
    send_splits: list[list[int]]  # [B][W] rows this rank sends each rank, per chunk
    recv_splits: list[list[int]]  # [B][W] rows it receives from each rank, per chunk
    local_pairs: list[int]  # [B] R_b: the (row, slot) pairs of chunk b's received rows whose expert is here
    rows_DH: torch.Tensor  # [D, H] the token rows in sent order; the combine brings their partial sums back over them
    local_ids_DK: torch.Tensor  # [D, K] int32: each slot's expert on the row's destination rank, E_local if elsewhere
    weights_DK: torch.Tensor  # [D, K] the token's routing weights
    rows_UH: torch.Tensor  # [U, H] the received rows, all chunks; each chunk's partial sums are written over its own
    local_ids_UK: torch.Tensor  # [U, K] int32: their slots' local experts (E_local: not here)
    weights_UK: torch.Tensor  # [U, K] their routing weights

    def sent(self, chunk: int) -> slice:
        return slice(self.sent_bounds[chunk], self.sent_bounds[chunk + 1])

    def received(self, chunk: int) -> slice:
        return slice(self.received_bounds[chunk], self.received_bounds[chunk + 1])


class ExpertParallelMoE:
    """One rank's share of the layer: routed experts [first_expert, first_expert + E_local) and a single-GPU level
    to run them."""

    level = "ep"
    name = "expert_parallel"
    summary = ("experts dealt over W ranks; each token sent once per rank that holds any of its experts, reduced "
               "there before it comes back; pipelined in chunks with expert compute")

    def __init__(self, config: MoEConfig, device: torch.device):
        self.config = config
        self.device = device
        self.group = None  # the ranks the experts are dealt over: all of them (a smaller layer's: `on`)
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        if config.num_experts % self.world:
            raise ConfigError(f"{config.num_experts} experts do not split evenly over {self.world} ranks")
        self.experts_per_rank = config.num_experts // self.world
        self.first_expert = self.rank * self.experts_per_rank
        self.weights = init_weights(config, device, experts=range(self.first_expert,
                                                                  self.first_expert + self.experts_per_rank))
        # The local experts as a layer of their own: one slot per received (row, slot) pair, no shared experts
        # (they run beside the combine, on each rank's own tokens).
        local_config = dataclasses.replace(config, num_experts=self.experts_per_rank, top_k=1, num_shared_experts=0,
                                           name=f"{config.name} rank {self.rank}")
        self.local_level = local_level_class(device)(local_config, self.weights.without_shared())
        self.local_level.prepare()
        # Level 9's forward replays a graph recorded for one T, and here the rows change every forward: its kernels
        # run eagerly (they never wait for the host; only the graph's single launch is lost).
        self.local_forward = (self.local_level.eager_forward if isinstance(self.local_level, Graphed)
                              else self.local_level.forward)

    def on(self, config: MoEConfig, group: dist.ProcessGroup) -> ExpertParallelMoE:
        """This rank's share of a smaller layer, on `group` (W of the ranks, W·E_local experts in `config`): at weak
        scaling every rank holds E_local experts at every world size, so the smaller layer shares this one's weights
        and local level, and its collectives run on `group`. Its experts are this rank's, numbered from its place in
        the group: expert j·E_local + e of the smaller layer is expert first_expert + e of this one (each expert's
        weights are drawn from its own index). What lets the benchmark time every world size in turn, in one
        process, every GPU busy at each."""
        smaller = copy.copy(self)
        smaller.config, smaller.group = config, group
        smaller.world, smaller.rank = dist.get_world_size(group), dist.get_rank(group)
        if config.num_experts != self.experts_per_rank * smaller.world:
            raise ConfigError(f"{config.num_experts} experts are not {self.experts_per_rank} on each of "
                              f"{smaller.world} ranks")
        # The router differs: it scores the smaller layer's experts (drawn whole, with the shared experts).
        smaller.weights = dataclasses.replace(
            self.weights, router_HE=init_weights(config, self.device, experts=range(0)).router_HE)
        return smaller

    def plan(self, tokens_TH: torch.Tensor, routing_weights_TK: torch.Tensor, expert_ids_TK: torch.Tensor,
             chunks: int) -> Plan:
        (T, K), H = expert_ids_TK.shape, tokens_TH.shape[1]
        W, B, E_local = self.world, chunks, self.experts_per_rank
        device = tokens_TH.device
        rank_of_slot_TK = expert_ids_TK // E_local  # experts are dealt in contiguous slices
        # How many of each token's K experts each rank holds: the token goes to every rank where that is ≥ 1, once.
        pairs_TW = torch.zeros((T, W), dtype=torch.long, device=device).scatter_add_(
            1, rank_of_slot_TK, torch.ones_like(rank_of_slot_TK))
        goes_TW = pairs_TW > 0
        # Chunk b holds tokens ⌈b·T/B⌉ … ⌈(b+1)·T/B⌉ − 1: sizes differ by one at most (with T < B some are empty).
        chunk_of_token_T = torch.arange(T, device=device) * B // T
        # Per chunk and destination rank: the rows that go there, and the (row, slot) pairs they carry for its experts.
        send_counts_BW2 = torch.zeros((B, W, 2), dtype=torch.long, device=device).index_add_(
            0, chunk_of_token_T, torch.stack([goes_TW.long(), pairs_TW], dim=2))
        # All-to-all 1, the counts of every chunk at once: rank r sends rank s the counts of the rows meant for s.
        recv_counts_WB2 = torch.empty((W, B, 2), dtype=torch.long, device=device)
        dist.all_to_all_single(recv_counts_WB2, send_counts_BW2.transpose(0, 1).contiguous(), group=self.group)
        # The sort, queued before the host waits: the (token, rank) rows by (chunk, destination rank), stable so that
        # each keeps its tokens in order; those that go nowhere get the key B·W and sort past the D that leave.
        key_TW = torch.where(goes_TW, chunk_of_token_T[:, None] * W + torch.arange(W, device=device), B * W)
        order_TW = torch.argsort(key_TW.flatten(), stable=True)
        send_splits, recv_splits, recv_pairs = torch.stack(  # the one host sync
            [send_counts_BW2[..., 0], recv_counts_WB2[..., 0].T, recv_counts_WB2[..., 1].T]).tolist()
        sent_bounds = list(itertools.accumulate((sum(splits) for splits in send_splits), initial=0))
        received_bounds = list(itertools.accumulate((sum(splits) for splits in recv_splits), initial=0))
        D, U = sent_bounds[-1], received_bounds[-1]
        token_of_row_D, rank_of_row_D = order_TW[:D] // W, order_TW[:D] % W  # sorted by chunk, rank, token
        row_of_token_TW = torch.full((T * W,), -1, dtype=torch.long, device=device)
        row_of_token_TW[order_TW[:D]] = torch.arange(D, device=device)
        expert_ids_DK = expert_ids_TK.index_select(0, token_of_row_D)
        local_ids_DK = torch.where(expert_ids_DK // E_local == rank_of_row_D[:, None], expert_ids_DK % E_local,
                                   E_local).int()
        return Plan(
            row_of_token_TW=row_of_token_TW.view(T, W), sent_bounds=sent_bounds, received_bounds=received_bounds,
            send_splits=send_splits, recv_splits=recv_splits, local_pairs=[sum(pairs) for pairs in recv_pairs],
            rows_DH=tokens_TH.index_select(0, token_of_row_D),  # read D·H, write D·H elements
            local_ids_DK=local_ids_DK, weights_DK=routing_weights_TK.index_select(0, token_of_row_D),
            rows_UH=tokens_TH.new_empty((U, H)), local_ids_UK=local_ids_DK.new_empty((U, K)),
            weights_UK=routing_weights_TK.new_empty((U, K)))

    def dispatch(self, plan: Plan, chunk: int) -> list[dist.Work]:
        """All-to-alls 2, 3 and 4 of one chunk, started and not waited for: its token rows (each token once per
        rank that holds any of its experts) and, beside them, their K slots' experts on that rank and routing
        weights, which the receiving expert's down GEMM applies in its epilogue."""
        sent, received = plan.sent(chunk), plan.received(chunk)
        splits = plan.recv_splits[chunk], plan.send_splits[chunk]
        return [dist.all_to_all_single(into[received], out[sent], *splits, group=self.group, async_op=True)
                for into, out in ((plan.rows_UH, plan.rows_DH), (plan.local_ids_UK, plan.local_ids_DK),
                                  (plan.weights_UK, plan.weights_DK))]

    def compute(self, plan: Plan, chunk: int) -> torch.Tensor:
        """[U_b, H]: for each of one chunk's received rows, the sum of its local experts' results, each times its
        routing weight, written over the row (nothing to do for a chunk that brought none). To the local level
        every (row, slot) pair is a token with one slot."""
        received = plan.received(chunk)
        rows_UH, local_ids_UK = plan.rows_UH[received], plan.local_ids_UK[received]
        if rows_UH.shape[0] == 0:
            return rows_UH
        # The expand: the (row, slot) pairs whose expert is here, pair u·K + k, grouped by that expert (E_local,
        # "not here", sorts last).
        pair_R = torch.argsort(local_ids_UK.flatten(), stable=True)[:plan.local_pairs[chunk]]
        row_of_pair_R = pair_R // local_ids_UK.shape[1]
        results_RH = self.local_forward(rows_UH.index_select(0, row_of_pair_R),  # read R·H, write R·H
                                        plan.weights_UK[received].flatten()[pair_R, None],
                                        local_ids_UK.flatten()[pair_R, None].long())
        # The reduce: each received row's results summed into the row itself (the expand has read it), so one row per
        # token goes back. position_UK: where each (row, slot) pair's result sits in results_RH, −1 if not here.
        position_UK = torch.full((local_ids_UK.numel(),), -1, dtype=torch.long, device=rows_UH.device)
        position_UK[pair_R] = torch.arange(pair_R.numel(), device=rows_UH.device)
        return gather_sum(results_RH, position_UK.view(local_ids_UK.shape), out=rows_UH)  # read R·H, write U_b·H

    def combine(self, plan: Plan, chunk: int, results_UH: torch.Tensor) -> dist.Work:
        """All-to-all 5 of one chunk, the reverse of 2, started and not waited for: every partial sum back to the
        rank its token came from, over the row it left from (that chunk's dispatch has finished: it was waited for
        before the compute, and NCCL runs the collectives in the order they were issued)."""
        return dist.all_to_all_single(plan.rows_DH[plan.sent(chunk)], results_UH, plan.send_splits[chunk],
                                      plan.recv_splits[chunk], group=self.group, async_op=True)

    def forward(self, tokens_TH: torch.Tensor, routing_weights_TK: torch.Tensor, expert_ids_TK: torch.Tensor,
                chunks: int = 1, compute_spans: list | None = None) -> torch.Tensor:
        """This rank's output, its tokens in `chunks` pipelined chunks. Given a list, `compute_spans` receives the
        device-clock span of every expert compute (the expand and reduce included): the first half of the shared
        experts', the chunks' in order, then the second half's."""
        plan = self.plan(tokens_TH, routing_weights_TK, expert_ids_TK, chunks)
        arriving = self.dispatch(plan, 0)
        # The shared experts (replicated on every rank, nothing to receive), half the tokens under the first dispatch
        # and half under the last combine; without them the output starts at zero.
        out_TH = torch.zeros_like(tokens_TH) if not self.config.num_shared_experts else torch.empty_like(tokens_TH)
        halves = (slice(0, tokens_TH.shape[0] // 2), slice(tokens_TH.shape[0] // 2, None))
        if self.config.num_shared_experts:
            with measured(compute_spans, self.device):
                shared_experts_forward(tokens_TH[halves[0]], self.weights, out_TH=out_TH[halves[0]])
        combining = []
        for chunk in range(chunks):
            arrived = arriving
            if chunk + 1 < chunks:
                # Issued before this chunk's compute: NCCL's stream first waits for all the compute stream has
                # queued, so issued after it, the next chunk's dispatch would wait for this chunk's experts.
                arriving = self.dispatch(plan, chunk + 1)
            for work in arrived:
                work.wait()  # the compute stream waits for this chunk's rows (on the CPU, the host does)
            with measured(compute_spans, self.device):
                results_UH = self.compute(plan, chunk)
            combining.append(self.combine(plan, chunk, results_UH))
        if self.config.num_shared_experts:
            with measured(compute_spans, self.device):
                shared_experts_forward(tokens_TH[halves[1]], self.weights, out_TH=out_TH[halves[1]])
        for work in combining:
            work.wait()
        # Each token's partial sums, one from each rank that holds any of its experts, added into its row.
        # read D·H + T·H, write T·H
        return gather_sum(plan.rows_DH, plan.row_of_token_TW, out=out_TH, accumulate=True)


def local_level_class(device: torch.device) -> type:
    """Level 9 on a Hopper GPU; level 7 on another GPU (level 9 needs TMA and wgmma); level 4 on the CPU (level 7
    would run in Triton's interpreter)."""
    if device.type != "cuda":
        from level4_grouped import GroupedLevel

        return GroupedLevel
    if torch.cuda.get_device_capability(device) >= (9, 0):
        from level9_persistent_tma import PersistentTmaLevel

        return PersistentTmaLevel
    from level7_triton_grouped import TritonGroupedLevel

    return TritonGroupedLevel


if __name__ == "__main__":
    run_ep_script(ExpertParallelMoE)
