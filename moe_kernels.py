"""The lab's Triton kernels. (Not named triton_kernels.py: that would shadow OpenAI's triton_kernels package, which
the matmul_ogs peer imports.)

Without a CUDA GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before Triton is imported),
which executes the same kernel code on CPU tensors with NumPy: slow, but it checks the indexing and masking
exactly as the GPU would run them.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from moe_model import FP8_DTYPE, FP8_MAX, Fp8Experts  # noqa: E402


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_torch_ops_on_cpu = False


@contextlib.contextmanager
def torch_ops_on_cpu():
    """While active, `silu_mul` and `gather_sum` on CPU tensors run as torch ops, what a CPU user would run, instead
    of in Triton's interpreter, whose speed says nothing about a CPU's. The benchmark times CPU rows under it; the
    reference check and the tests run the kernels in the interpreter."""
    global _torch_ops_on_cpu
    previous, _torch_ops_on_cpu = _torch_ops_on_cpu, True
    try:
        yield
    finally:
        _torch_ops_on_cpu = previous


def _check_device(*tensors: torch.Tensor) -> None:
    if any(t.device.type == "cpu" for t in tensors) and not interpreting():
        raise RuntimeError("Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 to run on the CPU")


# ---------------------------------------------------------------------------------------------------------------
# Fused SiLU·up: h = silu(gate) * up, elementwise.
#
# In eager PyTorch `F.silu(gate) * up` is two kernels: silu reads gate and writes a temporary, then the multiply
# reads the temporary and up and writes h: 5 passes over a [rows, I] tensor. Fused, it is 3 (read gate, read up,
# write h), and no temporary is allocated. The math runs in fp32 whatever the storage dtype.
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, num_elements, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(axis=0).to(tl.int64)  # int64: level 5's [E, T, I] buffers pass 2**31 elements
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    in_bounds = offsets < num_elements  # the last block may hang past the end
    gate = tl.load(gate_ptr + offsets, mask=in_bounds).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=in_bounds).to(tl.float32)
    hidden = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + offsets, hidden.to(out_ptr.dtype.element_ty), mask=in_bounds)


def silu_mul(
    gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None, block_size: int | None = None
) -> torch.Tensor:
    """silu(gate) * up in one pass. `out` may be `gate` itself (in place): each element is read before it is
    written by the same program. `block_size` is for tests that want many blocks on a small tensor."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    if out is None:
        out = torch.empty_like(gate)
    if _torch_ops_on_cpu and gate.device.type == "cpu":
        return torch.mul(F.silu(gate), up, out=out)  # two passes and a temporary: what eager PyTorch does
    _check_device(gate, up)
    if not (gate.is_contiguous() and up.is_contiguous() and out.is_contiguous()):
        raise ValueError("silu_mul indexes flat memory: gate, up and out must be contiguous")
    num_elements = gate.numel()
    if num_elements == 0:
        return out
    # On the GPU: 8 warps × 32 threads × 4 elements, 8-byte bf16 accesses per thread, coalesced. The interpreter
    # runs programs one after another at a fixed cost each, so there fewer, larger blocks are much faster.
    BLOCK_SIZE = block_size or (2**16 if interpreting() else 1024)
    grid = (triton.cdiv(num_elements, BLOCK_SIZE),)
    _silu_mul_kernel[grid](gate, up, out, num_elements, BLOCK_SIZE=BLOCK_SIZE, num_warps=8)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Three copies in one launch: a CUDA graph's inputs (level 5's CapturedGraph).
#
# A graph replays from fixed addresses, so each call first copies the layer's three inputs (tokens, routing weights,
# expert ids) into the graph's own. A `copy_` each is three launches, 1-2 µs apiece at decode sizes, where the
# whole layer takes 30; here program p copies block p of the three tensors laid end to end. Each tensor is copied
# in its own dtype, so that a block's accesses are 16 bytes wide wherever its element count allows (T·H); as
# bytes, a tensor of 4 (T·K bf16 weights at one token) made its block go one byte at a time: 10 µs (NOTES.md).
# At one token the host's side counts as much: Triton's launch path takes about 15 µs of host time on an H100 box,
# and checking the six tensors in Python took 15 more, longer than the whole layer's 30 µs on the GPU. So the
# checks run once, when the destinations are chosen, and a call only launches.
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _copy_block(source_ptr, destination_ptr, num_elements, block, BLOCK: tl.constexpr):
    offsets = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < num_elements
    tl.store(destination_ptr + offsets, tl.load(source_ptr + offsets, mask=in_bounds), mask=in_bounds)


@triton.jit
def _copy_three_kernel(source0_ptr, destination0_ptr, elements0, source1_ptr, destination1_ptr, elements1,
                       source2_ptr, destination2_ptr, elements2, BLOCK: tl.constexpr):
    block = tl.program_id(axis=0)
    blocks0 = tl.cdiv(elements0, BLOCK)
    blocks1 = tl.cdiv(elements1, BLOCK)
    if block < blocks0:
        _copy_block(source0_ptr, destination0_ptr, elements0, block, BLOCK)
    elif block < blocks0 + blocks1:
        _copy_block(source1_ptr, destination1_ptr, elements1, block - blocks0, BLOCK)
    else:
        _copy_block(source2_ptr, destination2_ptr, elements2, block - blocks0 - blocks1, BLOCK)


class CopyThree:
    """`copy(sources)`: destinations[i][...] = sources[i] for three fixed contiguous destinations, with one launch;
    reads and writes each source once. The destinations, and that sources of these shapes and dtypes fit them, are
    checked once, here; a call checks nothing, so its caller passes tensors of the checked shapes and dtypes
    (CapturedGraph compares them anyway, to know whether to capture again). A CPU tensor still fails in Triton's
    launcher."""

    BLOCK = 4096  # elements: 32 a thread with 4 warps, in 16-byte accesses for bf16

    def __init__(self, sources: tuple[torch.Tensor, ...], destinations: tuple[torch.Tensor, ...]):
        if len(sources) != 3 or len(destinations) != 3:
            raise ValueError(f"CopyThree takes three sources and three destinations, not {len(sources)} and "
                             f"{len(destinations)}")
        for source, destination in zip(sources, destinations):
            if (source.shape != destination.shape or source.dtype != destination.dtype
                    or not destination.is_contiguous()):
                raise ValueError(f"cannot copy {source.dtype} {tuple(source.shape)} into {destination.dtype} "
                                 f"{tuple(destination.shape)} (contiguous: {destination.is_contiguous()})")
        _check_device(*sources, *destinations)
        self.flat_destinations = tuple(destination.view(-1) for destination in destinations)
        self.elements = tuple(destination.numel() for destination in destinations)
        self.blocks = sum(triton.cdiv(elements, self.BLOCK) for elements in self.elements)

    def __call__(self, sources: tuple[torch.Tensor, ...]) -> None:
        if not self.blocks:
            return
        (source0, source1, source2), (destination0, destination1, destination2) = sources, self.flat_destinations
        elements0, elements1, elements2 = self.elements
        _copy_three_kernel[(self.blocks,)](source0.reshape(-1), destination0, elements0, source1.reshape(-1),
                                           destination1, elements1, source2.reshape(-1), destination2, elements2,
                                           BLOCK=self.BLOCK)


# ---------------------------------------------------------------------------------------------------------------
# Gather-sum: out[m] = Σ_j rows[index[m, j]], index −1 skipped (the expert-parallel level), or the sum of each
# token's consecutive rows (levels 7-10's combine over K).
#
# Summing a few scattered rows into each output row is what `index_add_` does with atomic adds, one per element;
# with bf16 on an H100 those cost the EP level several ms a forward (NOTES.md). Here each program owns one output
# row's block of columns, reads its (at most `slots`) rows and writes once: no atomics, and the sum in fp32.
# For consecutive rows, torch's `y.sum(dim=1)` does the same sum, but reducing across a middle dimension of 2 it
# ran at 1.3 TB/s on an H100 (journey, 8192 tokens: 38 µs of a 417 µs forward; this kernel 14.5, NOTES.md).
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _gather_sum_kernel(rows_ptr, index_ptr, out_ptr, cols, slots, stride_r, stride_i, stride_o,
                       ACCUMULATE: tl.constexpr, CONSECUTIVE: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(axis=0).to(tl.int64)
    offs = tl.program_id(axis=1) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < cols
    out_ptrs = out_ptr + m * stride_o + offs
    if ACCUMULATE:
        acc = tl.load(out_ptrs, mask=valid, other=0.0).to(tl.float32)  # read BLOCK elements
    else:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in range(slots):
        row = m * slots + j if CONSECUTIVE else tl.load(index_ptr + m * stride_i + j).to(tl.int64)
        if row >= 0:
            acc += tl.load(rows_ptr + row * stride_r + offs, mask=valid, other=0.0).to(tl.float32)  # read BLOCK
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid)  # write BLOCK elements


def _launch_gather_sum(rows: torch.Tensor, index: torch.Tensor | None, out: torch.Tensor, slots: int,
                       accumulate: bool) -> torch.Tensor:
    M, cols = out.shape
    if M == 0:
        return out
    BLOCK = min(1024, triton.next_power_of_2(cols))
    _gather_sum_kernel[(M, triton.cdiv(cols, BLOCK))](
        rows, rows if index is None else index, out, cols, slots, rows.stride(0),
        0 if index is None else index.stride(0), out.stride(0),
        ACCUMULATE=accumulate, CONSECUTIVE=index is None, BLOCK=BLOCK, num_warps=4)
    return out


def gather_sum(rows: torch.Tensor, index: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
    """out[m] (+)= Σ_j rows[index[m, j]] over the j with index[m, j] ≥ 0, in fp32, written once per row of `out`:
    `out` plus the rows with `accumulate`, else their sum alone (zero where a row gets none). rows [*, cols],
    index [M, slots] integers, out [M, cols], not overlapping `rows`."""
    if _torch_ops_on_cpu and rows.device.type == "cpu":  # a gather of M·slots rows, then their sum: two passes
        picked = rows.index_select(0, index.clamp(min=0).flatten()).view(*index.shape, rows.shape[1]).float()
        total = picked.mul_((index >= 0).unsqueeze(-1)).sum(1)
        return out.copy_(total.add_(out) if accumulate else total)
    _check_device(rows, index, out)
    return _launch_gather_sum(rows, index, out, index.shape[1], accumulate)


def sum_slots(y_TKH: torch.Tensor) -> torch.Tensor:
    """out[t] = Σ_k y[t, k] in fp32, one read of y and one write of out: the combine over K of levels 7-10, y
    [T, K, H] with contiguous rows (K·split_k rows a token where the down GEMM splits its reduction)."""
    _check_device(y_TKH)
    T, slots, H = y_TKH.shape
    return _launch_gather_sum(y_TKH.view(T * slots, H), None, y_TKH.new_empty((T, H)), slots, False)


# ---------------------------------------------------------------------------------------------------------------
# MoE grouped GEMM (level 7): the whole expert computation in two launches, no host sync.
#
# Token alignment. The (token, slot) pairs are sorted by expert on the device, and each expert's run of pairs is
# padded up to a multiple of BLOCK_M with a sentinel id (num_pairs). Then every BLOCK_M rows of the sorted list
# belong to exactly one expert, so one program of a GEMM kernel can compute a BLOCK_M × BLOCK_N tile of one
# expert's product: it looks up which expert its rows belong to and which tokens they are, and reads the
# tokens from where they lie. The padded length is at most T·K + E·(BLOCK_M − 1), known from T alone, so the grid
# has a fixed size and programs past the real padded length return at once: nothing needs the host.
#
#   gate_up kernel:  hidden[p, :] = silu(x[token(p)] @ w_gate[e]) * (x[token(p)] @ w_up[e])   for sorted row p
#                    (A rows gathered by token id inside the kernel; both halves of [E, H, 2I] in one pass;
#                    SiLU·up in the epilogue, so the un-activated projections never reach memory)
#   down kernel:     y[pair(p), :] = routing_weight[pair(p)] * (hidden[p] @ w_down[e])
#                    (the routing weight in the epilogue; rows scattered back to pair order, then a sum over K.
#                    Adding into the output with fp32 atomics instead was slower on an H100 at every size
#                    measured: NOTES.md)
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _block_histogram(expert_ids_ptr, first_pair, num_pairs, num_experts, BLOCK: tl.constexpr,
                     EXPERTS: tl.constexpr):
    """The experts of the BLOCK pairs from first_pair, their histogram over 2·EXPERTS bins (in shared memory), and
    the bins that are experts with pairs here: the count and the place each add to memory once per such expert, not
    once per pair."""
    pair = first_pair + tl.arange(0, BLOCK)
    expert = tl.load(expert_ids_ptr + pair, mask=pair < num_pairs, other=EXPERTS).to(tl.int32)  # past them: EXPERTS
    bins = tl.arange(0, 2 * EXPERTS)  # EXPERTS ≥ num_experts: the bins from there on are never added
    block_counts = tl.histogram(expert, 2 * EXPERTS)
    return expert, bins, block_counts, (bins < num_experts) & (block_counts > 0)


@triton.jit
def _count_block_pairs(expert_ids_ptr, counts_ptr, num_pairs, num_experts, BLOCK: tl.constexpr,
                       EXPERTS: tl.constexpr):
    """This program's BLOCK pairs added to counts[e] (how many pairs chose expert e): counted in a histogram of its
    own, one add per expert to memory. An add per pair queued on the few counters in L2: 25.9 µs at qwen3-moe's
    16384 tokens on an H100, where this takes 2.8 (NOTES.md). Relaxed: nothing reads the counts until a barrier
    or a kernel boundary, so each add is a `red` that no thread waits on."""
    _, bins, block_counts, has_pairs = _block_histogram(expert_ids_ptr, tl.program_id(axis=0) * BLOCK, num_pairs,
                                                        num_experts, BLOCK, EXPERTS)
    tl.atomic_add(counts_ptr + bins, block_counts, mask=has_pairs, sem="relaxed")


@triton.jit
def _count_pairs_kernel(expert_ids_ptr, counts_ptr, num_pairs, num_experts, BLOCK: tl.constexpr,
                        EXPERTS: tl.constexpr):
    """counts[e] = how many (token, slot) pairs chose expert e, BLOCK pairs a program."""
    _count_block_pairs(expert_ids_ptr, counts_ptr, num_pairs, num_experts, BLOCK, EXPERTS)


@triton.jit
def _store_padded_runs(counts, is_expert, padded_starts_ptr, block_expert_ids_ptr, num_padded_ptr, num_blocks,
                       block_m, EXPERTS: tl.constexpr, FILL: tl.constexpr):
    """Each expert's count rounded up to whole blocks, their running sum (each run's first row, stored), the padded
    length, and each block's expert (−1 past the padded length). Returns the runs' first rows. num_padded_ptr is
    padded_starts' entry E (`TokenAlignment.num_padded`), so that level 9's tile order finds every run's end."""
    expert = tl.arange(0, EXPERTS)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_starts = tl.cumsum(padded, axis=0) - padded
    tl.store(padded_starts_ptr + expert, padded_starts, mask=is_expert)
    num_padded = tl.sum(padded, axis=0)
    tl.store(num_padded_ptr, num_padded)
    # Each expert writes its own blocks' entries, step j its j-th block: as many steps as the fullest expert has
    # blocks. (Each block searching the runs' ends for its expert instead took [blocks, E] comparisons: 9-12 µs at
    # deepseek-v3's 257 experts on an H100, where a forward of one token takes 320: NOTES.md.)
    first_block = padded_starts // block_m
    for j in range(0, tl.max(padded, axis=0) // block_m):
        tl.store(block_expert_ids_ptr + first_block + j, expert, mask=is_expert & (j * block_m < padded))
    for first in range(num_padded // block_m, num_blocks, FILL):
        blocks = first + tl.arange(0, FILL)
        tl.store(block_expert_ids_ptr + blocks, -1, mask=blocks < num_blocks)  # past the padded length
    return padded_starts


@triton.jit
def _pad_offsets(counts_ptr, padded_starts_ptr, block_expert_ids_ptr, num_padded_ptr, num_experts, num_blocks,
                 block_m, EXPERTS: tl.constexpr, FILL: tl.constexpr):
    """The counts read (volatile: in the fused kernel other programs' adds just landed) and _store_padded_runs on
    them; returns the experts, which are real, and their counts."""
    expert = tl.arange(0, EXPERTS)
    is_expert = expert < num_experts
    counts = tl.load(counts_ptr + expert, mask=is_expert, other=0, volatile=True)
    _store_padded_runs(counts, is_expert, padded_starts_ptr, block_expert_ids_ptr, num_padded_ptr, num_blocks,
                       block_m, EXPERTS, FILL)
    return expert, is_expert, counts


@triton.jit
def _pad_offsets_kernel(
    counts_ptr, padded_starts_ptr, block_expert_ids_ptr, num_padded_ptr, num_experts, num_blocks, block_m,
    EXPERTS: tl.constexpr, FILL: tl.constexpr,
):
    """One program: each expert's count rounded up to whole blocks, their running sum, and each block's expert."""
    _pad_offsets(counts_ptr, padded_starts_ptr, block_expert_ids_ptr, num_padded_ptr, num_experts, num_blocks,
                 block_m, EXPERTS, FILL)


@triton.jit
def _count_and_pad_kernel(expert_ids_ptr, counters_ptr, padded_starts_ptr, block_expert_ids_ptr, num_padded_ptr,
                          num_pairs, num_experts, num_blocks, block_m, BLOCK: tl.constexpr, EXPERTS: tl.constexpr,
                          FILL: tl.constexpr):
    """Level 9's count and offsets in one launch: each program counts its BLOCK pairs as _count_pairs_kernel does,
    then arrives; the last to arrive, every count in, runs _pad_offsets_kernel's program on them. counters = [counts |
    cursors | arrivals | the counts kept for the place kernel]: the counts and arrivals are zero when the kernel
    starts, and the last program sets them back to zero for the next call and zeroes the cursors for the place
    kernel after it, so nothing else has to zero them."""
    counts_ptr, cursors_ptr = counters_ptr, counters_ptr + num_experts
    arrivals_ptr, kept_counts_ptr = counters_ptr + 2 * num_experts, counters_ptr + 2 * num_experts + 1
    _count_block_pairs(expert_ids_ptr, counts_ptr, num_pairs, num_experts, BLOCK, EXPERTS)
    # The barrier puts every thread's adds before the program's arrival, whose release (and the last program's
    # acquire) makes them visible to the last program.
    tl.debug_barrier()
    if tl.atomic_add(arrivals_ptr, 1, sem="acq_rel", scope="gpu") == tl.num_programs(axis=0) - 1:
        expert, is_expert, counts = _pad_offsets(counts_ptr, padded_starts_ptr, block_expert_ids_ptr,
                                                 num_padded_ptr, num_experts, num_blocks, block_m, EXPERTS, FILL)
        tl.store(kept_counts_ptr + expert, counts, mask=is_expert)
        tl.debug_barrier()  # every thread has read the counts before they are zeroed
        tl.store(counts_ptr + expert, 0, mask=is_expert)
        tl.store(cursors_ptr + expert, 0, mask=is_expert)
        tl.store(arrivals_ptr, 0)


@triton.jit
def _place_pairs_kernel(expert_ids_ptr, padded_starts_ptr, cursors_ptr, sorted_pair_ids_ptr, counts_ptr, num_pairs,
                        num_experts, block_m, BLOCK: tl.constexpr, EXPERTS: tl.constexpr, MARK_PADDING: tl.constexpr,
                        MAX_PADDING: tl.constexpr):
    """Each program takes rows for its BLOCK pairs with one add per expert (its histogram, as in the count), sorts
    its pairs by expert, and puts each pair at its expert's rows plus its place among them. One add per pair
    instead: 28.3 µs at qwen3-moe's 16384 tokens on an H100, where this takes 5.4 (NOTES.md). With MARK_PADDING
    (level 9's alignment, whose rows were not filled first) program p also marks the padding rows of experts p,
    p + programs, ...: from each run's last pair to its padded end, num_pairs."""
    if MARK_PADDING:
        padding = tl.arange(0, MAX_PADDING)
        for expert in range(tl.program_id(axis=0), num_experts, tl.num_programs(axis=0)):
            count = tl.load(counts_ptr + expert)
            padding_rows = (count + block_m - 1) // block_m * block_m - count
            rows = tl.load(padded_starts_ptr + expert) + count + padding
            tl.store(sorted_pair_ids_ptr + rows, num_pairs, mask=padding < padding_rows)
    first_pair = tl.program_id(axis=0) * BLOCK
    index = tl.arange(0, BLOCK)
    expert, bins, block_counts, takes_rows = _block_histogram(expert_ids_ptr, first_pair, num_pairs, num_experts,
                                                              BLOCK, EXPERTS)
    first_taken = tl.atomic_add(cursors_ptr + bins, block_counts, mask=takes_rows, sem="relaxed")
    first_taken = tl.where(takes_rows, first_taken, 0)  # a masked add returns nothing defined
    first_sorted = tl.cumsum(block_counts, 0) - block_counts  # where each expert's pairs begin once sorted
    by_expert = tl.sort(expert * BLOCK + index)  # by expert, then by pair: a key fits in int32 (E·BLOCK < 2^31)
    expert_sorted, index_sorted = by_expert // BLOCK, by_expert % BLOCK
    place = index - tl.gather(first_sorted, expert_sorted, 0)  # this pair's place among its block's pairs of expert
    is_pair = expert_sorted < num_experts
    row = (tl.load(padded_starts_ptr + expert_sorted, mask=is_pair, other=0)
           + tl.gather(first_taken, expert_sorted, 0) + place)
    tl.store(sorted_pair_ids_ptr + row, first_pair + index_sorted, mask=is_pair)


@triton.jit
def _align_in_one_program(
    expert_ids_ptr, cursors_ptr, padded_starts_ptr, sorted_pair_ids_ptr, block_expert_ids_ptr, num_padded_ptr,
    num_pairs, num_experts, max_padded, num_blocks, block_m,
    PAIRS: tl.constexpr, EXPERTS: tl.constexpr, FILL: tl.constexpr,
):
    """The three kernels above and the two fills in one program, for decode sizes (all pairs in one block): the
    steps are the same, and a barrier between them (the program's threads wait for each other) stands where a
    kernel boundary stood."""
    pair = tl.arange(0, PAIRS)
    valid = pair < num_pairs
    expert_of_pair = tl.load(expert_ids_ptr + pair, mask=valid, other=0)
    expert = tl.arange(0, EXPERTS)
    is_expert = expert < num_experts
    tl.store(cursors_ptr + expert, 0, mask=is_expert)  # the fills: zero counts, every row padding
    for first_row in range(0, max_padded, FILL):
        rows = first_row + tl.arange(0, FILL)
        tl.store(sorted_pair_ids_ptr + rows, num_pairs, mask=rows < max_padded)
    tl.debug_barrier()
    # Relaxed atomics: the barriers, not the atomics, order this program's steps (a barrier makes every global
    # access before it visible to the program's threads after it), and the default acquire-release would also make
    # each thread wait for its fill stores first (journey at one token -0.2 to -0.7 µs on an H100, NOTES.md).
    tl.atomic_add(cursors_ptr + expert_of_pair, 1, mask=valid, sem="relaxed")  # count
    tl.debug_barrier()
    counts = tl.load(cursors_ptr + expert, mask=is_expert, other=0, volatile=True)
    padded_starts = _store_padded_runs(counts, is_expert, padded_starts_ptr, block_expert_ids_ptr, num_padded_ptr,
                                       num_blocks, block_m, EXPERTS, FILL)  # offsets
    tl.debug_barrier()  # every thread has read the counts before they become cursors
    tl.store(cursors_ptr + expert, padded_starts, mask=is_expert)
    tl.debug_barrier()
    row = tl.atomic_add(cursors_ptr + expert_of_pair, 1, mask=valid, sem="relaxed")  # place: the next free row
    tl.store(sorted_pair_ids_ptr + row, pair, mask=valid)


@triton.jit
def _align_one_program_kernel(
    expert_ids_ptr, cursors_ptr, padded_starts_ptr, sorted_pair_ids_ptr, block_expert_ids_ptr, num_padded_ptr,
    num_pairs, num_experts, max_padded, num_blocks, block_m,
    PAIRS: tl.constexpr, EXPERTS: tl.constexpr, FILL: tl.constexpr,
):
    _align_in_one_program(expert_ids_ptr, cursors_ptr, padded_starts_ptr, sorted_pair_ids_ptr, block_expert_ids_ptr,
                          num_padded_ptr, num_pairs, num_experts, max_padded, num_blocks, block_m, PAIRS, EXPERTS,
                          FILL)


# Up to here level 9 aligns in one program (decode: launches cost more than the work). At 4096 pairs the one program
# was 1.5% slower than the three kernels on an H200 (journey at 2048 tokens, qwen3-moe at 512: NOTES.md).
ONE_PROGRAM_MAX_PAIRS = 2048


class TokenAlignment(NamedTuple):
    """The (token, slot) pairs grouped by expert, each expert's run padded to whole blocks of block_m rows."""

    sorted_pair_ids: torch.Tensor  # [P_max] pair index t·K + k of each sorted row; T·K on padding rows
    block_expert_ids: torch.Tensor  # [P_max / block_m] the expert of each block of rows, −1 past the padded length
    padded_starts: torch.Tensor  # [E + 1] each expert's first sorted row, then the padded length actually used
    block_m: int

    @property
    def num_padded(self) -> torch.Tensor:
        """[1] the padded length actually used: padded_starts' last entry (a view)."""
        return self.padded_starts[-1:]

    @property
    def max_padded(self) -> int:
        """P_max: the rows the hidden needs, whatever this routing filled."""
        return self.sorted_pair_ids.numel()


# Up to here level 9 does not align in a kernel at all: each program of its two GEMMs aligns the pairs itself, in
# registers ([PAIRS, PAIRS] comparisons), and the one-token graph loses a launch (NOTES.md).
IN_REGISTERS_MAX_PAIRS = 64


class PairsToAlign(NamedTuple):
    """Decode, up to IN_REGISTERS_MAX_PAIRS pairs: the pairs' experts, left for every program of level 9's GEMMs to
    align for itself (`_align_in_registers`): the same runs, padded to whole blocks, with nothing in memory."""

    expert_of_pair: torch.Tensor  # [N] the expert of pair t·K + k
    max_padded: int  # P_max, as in TokenAlignment: the hidden's rows
    block_m: int

    @staticmethod
    def of(expert_ids_TK: torch.Tensor, num_experts: int, block_m: int) -> "PairsToAlign":
        expert_of_pair = expert_ids_TK.contiguous().view(-1)  # a view of the graph's contiguous input: no launch
        return PairsToAlign(expert_of_pair, padded_length(expert_of_pair.numel(), num_experts, block_m), block_m)


def align_tokens(expert_ids_TK: torch.Tensor, num_experts: int, block_m: int, one_program: bool = False,
                 counters: torch.Tensor | None = None) -> TokenAlignment:
    """Group (token, slot) pairs by expert and pad each expert's run to a multiple of block_m, on the device.

    P_max = T·K + E·(block_m − 1), rounded up to block_m: the most the padding can need, so shapes depend on T only.
    Three small kernels (count, offsets, place) and two fills: a torch-ops version of the same steps took about
    20 launches and ~0.45 ms of host time per call on an H100 box (NOTES.md). `one_program` (at most
    ONE_PROGRAM_MAX_PAIRS pairs) runs the same steps as one launch. Given `counters` (alignment_counters: kept by
    the caller, its counts left zero by every call), two launches and no fill: the count's last program runs the
    offsets, the place kernel marks only the padding rows, and rows past the padded length keep what they held.
    Within an expert the pairs land in the order the atomics grant; each row's result does not depend on it.
    """
    if one_program:
        alignment, args = _one_program_alignment(expert_ids_TK, num_experts, block_m)
        _align_one_program_kernel[(1,)](*args, num_warps=8)
        return alignment
    device = expert_ids_TK.device
    expert_of_pair = expert_ids_TK.flatten().contiguous()
    num_pairs = expert_of_pair.numel()
    max_padded = padded_length(num_pairs, num_experts, block_m)
    num_blocks = max_padded // block_m
    alignment = TokenAlignment(  # the kernels fill them
        sorted_pair_ids=torch.empty(max_padded, dtype=torch.int32, device=device),
        block_expert_ids=torch.empty(num_blocks, dtype=torch.int32, device=device),
        padded_starts=torch.empty(num_experts + 1, dtype=torch.int32, device=device), block_m=block_m)
    EXPERTS = triton.next_power_of_2(num_experts)
    COUNT_BLOCK = 1024
    count_grid = (triton.cdiv(num_pairs, COUNT_BLOCK),)
    marks_padding = counters is not None
    if counters is None:
        alignment.sorted_pair_ids.fill_(num_pairs)  # every row padding until the place kernel puts a pair there
        counters = alignment_counters(num_experts, device)
        _count_pairs_kernel[count_grid](expert_of_pair, counters, num_pairs, num_experts, BLOCK=COUNT_BLOCK,
                                        EXPERTS=EXPERTS)
        _pad_offsets_kernel[(1,)](counters, alignment.padded_starts, alignment.block_expert_ids,
                                  alignment.num_padded, num_experts, num_blocks, block_m, EXPERTS=EXPERTS, FILL=1024)
    else:
        if counters.numel() != 3 * num_experts + 1:
            raise ValueError(f"alignment counters hold {counters.numel()} entries, not 3·{num_experts} + 1")
        _count_and_pad_kernel[count_grid](expert_of_pair, counters, alignment.padded_starts,
                                          alignment.block_expert_ids, alignment.num_padded, num_pairs, num_experts,
                                          num_blocks, block_m, BLOCK=COUNT_BLOCK, EXPERTS=EXPERTS, FILL=1024)
    # The place kernel's sort grows with its block: 512 pairs and 8 warps were within 1 µs of the best of 128-1024
    # pairs and 2-8 warps at every preset measured (NOTES.md).
    PLACE_BLOCK = 512
    _place_pairs_kernel[(triton.cdiv(num_pairs, PLACE_BLOCK),)](
        expert_of_pair, alignment.padded_starts, counters[num_experts:], alignment.sorted_pair_ids,
        counters[2 * num_experts + 1:], num_pairs, num_experts, block_m, BLOCK=PLACE_BLOCK, EXPERTS=EXPERTS,
        MARK_PADDING=marks_padding, MAX_PADDING=triton.next_power_of_2(block_m), num_warps=8)
    return alignment


def alignment_counters(num_experts: int, device: torch.device) -> torch.Tensor:
    """Zeros [3E + 1] int32: the alignment's counts, its place kernel's cursors, and (align_tokens given them) the
    count's arrivals and the counts kept for the place kernel. Given them, align_tokens leaves the counts and
    arrivals zero (the rest it writes before use), so one tensor, zeroed once, serves every forward (and a CUDA
    graph's replays) as long as they run one after another, on one stream."""
    return torch.zeros(3 * num_experts + 1, dtype=torch.int32, device=device)


def padded_length(num_pairs: int, num_experts: int, block_m: int) -> int:
    """P_max: every expert's run padded to whole blocks, at most."""
    return triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m


def _one_program_alignment(expert_ids_TK: torch.Tensor, num_experts: int,
                           block_m: int) -> tuple[TokenAlignment, tuple]:
    """The alignment's tensors, empty, and the arguments of `_align_in_one_program`, which fills them."""
    device = expert_ids_TK.device
    expert_of_pair = expert_ids_TK.flatten().contiguous()
    num_pairs = expert_of_pair.numel()
    if num_pairs > ONE_PROGRAM_MAX_PAIRS:
        raise ValueError(f"one-program alignment takes at most {ONE_PROGRAM_MAX_PAIRS} pairs, not {num_pairs}")
    max_padded = padded_length(num_pairs, num_experts, block_m)
    alignment = TokenAlignment(  # the kernel fills them
        sorted_pair_ids=torch.empty(max_padded, dtype=torch.int32, device=device),
        block_expert_ids=torch.empty(max_padded // block_m, dtype=torch.int32, device=device),
        padded_starts=torch.empty(num_experts + 1, dtype=torch.int32, device=device), block_m=block_m)
    cursors = torch.empty(num_experts, dtype=torch.int32, device=device)
    return alignment, (expert_of_pair, cursors, alignment.padded_starts, alignment.sorted_pair_ids,
                       alignment.block_expert_ids, alignment.num_padded, num_pairs, num_experts, max_padded,
                       max_padded // block_m, block_m, triton.next_power_of_2(max(num_pairs, 16)),
                       triton.next_power_of_2(num_experts), 1024)


def _gemm_configs(interpret: bool, two_accumulators: bool) -> list:
    """Tile shapes to autotune over, for Hopper. Wide, deep-pipelined tiles for large GEMMs; narrow ones so that
    decode (a few rows per expert, bound by reading weights) still spreads each expert over many programs. The
    gate/up kernel keeps two accumulators, so its tiles are half as wide to stay within the registers."""
    if interpret:  # one config: the interpreter only checks the indexing, and pays per program and per step
        return [triton.Config({"BLOCK_N": 64, "BLOCK_D": 64, "GROUP_M": 2}, num_warps=4, num_stages=1)]
    wide = 128 if two_accumulators else 256
    shapes = [(wide, 64, 8, 3), (wide, 64, 8, 4), (wide // 2, 64, 8, 4), (wide // 2, 128, 8, 3),
              (wide // 2, 64, 4, 5), (64, 128, 4, 4), (32, 128, 4, 4), (32, 256, 4, 3)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_D": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for n, k, w, s in dict.fromkeys(shapes)]


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST is for Triton's CPU interpreter, whose bf16 dot returns garbage (seen with Triton 3.9
    and NumPy 2.4): there the operands go to fp32 first. On the GPU it is off and the dot runs on tensor cores."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _tile_position(max_padded, cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id → (row block, column block), walking GROUP_M row blocks per column sweep so that the weight
    tiles a group of programs reads stay in L2 (the Triton matmul tutorial's grouped ordering)."""
    pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(max_padded, BLOCK_M)
    num_pid_n = tl.cdiv(cols, BLOCK_N)
    programs_per_group = GROUP_M * num_pid_n
    first_m = (pid // programs_per_group) * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % programs_per_group) % group_size)
    pid_n = (pid % programs_per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _tile_rows(sorted_pair_ids_ptr, block_expert_ids_ptr, pid_m, pid_n, num_pairs, cols,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """What a tile of the aligned rows holds: its expert, row offsets, pair ids (num_pairs on padding rows) and
    which rows and columns are real."""
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair_ids = tl.load(sorted_pair_ids_ptr + offs_m)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return expert, offs_m, pair_ids, pair_ids < num_pairs, offs_n, offs_n < cols


# When the tiles divide depth and cols exactly (every real preset), the bounds masks drop out of the inner loop.
_EVEN_TILES = {"EVEN_DEPTH": lambda args: args["depth"] % args["BLOCK_D"] == 0,
               "EVEN_COLS": lambda args: args["cols"] % args["BLOCK_N"] == 0}


@triton.autotune(configs=_gemm_configs(interpreting(), two_accumulators=True),
                 key=["cols", "depth", "BLOCK_M", "pairs_bucket"])
@triton.heuristics(_EVEN_TILES)
@triton.jit
def _moe_gate_up_kernel(
    x_ptr, w13_ptr, hidden_ptr,  # x [T, H], w13 [E, H, 2I] (gate | up), hidden [P_max, I]
    sorted_pair_ids_ptr, block_expert_ids_ptr, num_padded_ptr,
    cols, depth, num_pairs, max_padded, top_k, pairs_bucket,  # cols = I, depth = H (the reduction)
    stride_xt, stride_we, stride_wd, stride_wc, stride_hp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, EVEN_DEPTH: tl.constexpr, EVEN_COLS: tl.constexpr,
):
    pid_m, pid_n = _tile_position(max_padded, cols, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return  # past the padded length: this T's routing needed fewer blocks than the worst case
    expert, offs_m, pair_ids, row_valid, offs_n, col_valid = _tile_rows(
        sorted_pair_ids_ptr, block_expert_ids_ptr, pid_m, pid_n, num_pairs, cols, BLOCK_M, BLOCK_N)
    token_rows = (pair_ids // top_k).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)

    x_ptrs = x_ptr + token_rows[:, None] * stride_xt + offs_d[None, :]  # gathered rows: the permutation
    gate_ptrs = w13_ptr + expert * stride_we + offs_d[:, None] * stride_wd + offs_n[None, :] * stride_wc
    up_ptrs = gate_ptrs + cols * stride_wc
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d_start in range(0, depth, BLOCK_D):
        d_valid = (offs_d < depth - d_start) | EVEN_DEPTH
        x = tl.load(x_ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)
        if EVEN_DEPTH and EVEN_COLS:
            gate, up = tl.load(gate_ptrs), tl.load(up_ptrs)
        else:
            w_mask = d_valid[:, None] & col_valid[None, :]
            gate, up = tl.load(gate_ptrs, mask=w_mask, other=0.0), tl.load(up_ptrs, mask=w_mask, other=0.0)
        acc_gate = _dot(x, gate, acc_gate, UPCAST)
        acc_up = _dot(x, up, acc_up, UPCAST)
        x_ptrs += BLOCK_D
        gate_ptrs += BLOCK_D * stride_wd
        up_ptrs += BLOCK_D * stride_wd

    hidden = acc_gate * tl.sigmoid(acc_gate) * acc_up  # SiLU·up on the fp32 accumulators
    hidden_ptrs = hidden_ptr + offs_m[:, None].to(tl.int64) * stride_hp + offs_n[None, :]
    tl.store(hidden_ptrs, hidden.to(hidden_ptr.dtype.element_ty), mask=col_valid[None, :])


@triton.autotune(configs=_gemm_configs(interpreting(), two_accumulators=False),
                 key=["cols", "depth", "BLOCK_M", "pairs_bucket"])
@triton.heuristics(_EVEN_TILES)
@triton.jit
def _moe_down_kernel(
    hidden_ptr, w2_ptr, out_ptr, routing_weights_ptr,  # hidden [P_max, I], w2 [E, I, H], out [N, H]
    sorted_pair_ids_ptr, block_expert_ids_ptr, num_padded_ptr,
    cols, depth, num_pairs, max_padded, pairs_bucket,  # cols = H, depth = I (the reduction)
    stride_hp, stride_we, stride_wd, stride_wc, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, EVEN_DEPTH: tl.constexpr, EVEN_COLS: tl.constexpr,
):
    pid_m, pid_n = _tile_position(max_padded, cols, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert, offs_m, pair_ids, row_valid, offs_n, col_valid = _tile_rows(
        sorted_pair_ids_ptr, block_expert_ids_ptr, pid_m, pid_n, num_pairs, cols, BLOCK_M, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    hidden_ptrs = hidden_ptr + offs_m[:, None].to(tl.int64) * stride_hp + offs_d[None, :]  # already sorted
    w_ptrs = w2_ptr + expert * stride_we + offs_d[:, None] * stride_wd + offs_n[None, :] * stride_wc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d_start in range(0, depth, BLOCK_D):
        d_valid = (offs_d < depth - d_start) | EVEN_DEPTH
        hidden = tl.load(hidden_ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)
        if EVEN_DEPTH and EVEN_COLS:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=d_valid[:, None] & col_valid[None, :], other=0.0)
        acc = _dot(hidden, w, acc, UPCAST)
        hidden_ptrs += BLOCK_D
        w_ptrs += BLOCK_D * stride_wd

    weight = tl.load(routing_weights_ptr + pair_ids, mask=row_valid, other=0.0).to(tl.float32)
    acc = acc * weight[:, None]
    out_ptrs = out_ptr + pair_ids[:, None].to(tl.int64) * stride_om + offs_n[None, :]  # back to pair order
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & col_valid[None, :])


def choose_block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per tile: the pairs an average expert gets, as a power of two in [16, 128]. Small batches (decode)
    waste less on padding with short tiles; large ones want tall tiles to reuse each weight tile more."""
    return min(128, max(16, triton.next_power_of_2(triton.cdiv(num_pairs, num_experts))))


def moe_gate_up(tokens_TH: torch.Tensor, w13_EH2I: torch.Tensor, alignment: TokenAlignment,
                top_k: int) -> torch.Tensor:
    """hidden [P_max, I]: SiLU·up of every sorted row's token against its expert's gate|up weights [E, H, 2I]."""
    _check_device(tokens_TH, w13_EH2I)
    _, H, two_I = w13_EH2I.shape
    I = two_I // 2
    num_pairs = tokens_TH.shape[0] * top_k
    max_padded = alignment.max_padded
    block_m = alignment.block_m
    tokens_TH = tokens_TH.contiguous()
    hidden_PI = torch.empty((max_padded, I), dtype=tokens_TH.dtype, device=tokens_TH.device)
    grid = lambda meta: (triton.cdiv(max_padded, block_m) * triton.cdiv(I, meta["BLOCK_N"]),)  # noqa: E731
    _moe_gate_up_kernel[grid](
        tokens_TH, w13_EH2I, hidden_PI, alignment.sorted_pair_ids, alignment.block_expert_ids, alignment.num_padded,
        I, H, num_pairs, max_padded, top_k, triton.next_power_of_2(num_pairs),  # cols = I, depth = H
        tokens_TH.stride(0), w13_EH2I.stride(0), w13_EH2I.stride(1), w13_EH2I.stride(2), hidden_PI.stride(0),
        BLOCK_M=block_m, UPCAST=interpreting(),  # pairs_bucket: autotuned per size class, not per T
    )
    return hidden_PI


def moe_down(hidden_PI: torch.Tensor, w_down_EIH: torch.Tensor, routing_weights_TK: torch.Tensor,
             alignment: TokenAlignment) -> torch.Tensor:
    """y [T, K, H]: each sorted row's hidden times its expert's down weights, times the pair's routing weight,
    written back in (token, slot) order."""
    _check_device(hidden_PI, w_down_EIH)
    T, K = routing_weights_TK.shape
    _, I, H = w_down_EIH.shape
    num_pairs = T * K
    max_padded = alignment.max_padded
    block_m = alignment.block_m
    y_NH = torch.empty((num_pairs, H), dtype=hidden_PI.dtype, device=hidden_PI.device)
    grid = lambda meta: (triton.cdiv(max_padded, block_m) * triton.cdiv(H, meta["BLOCK_N"]),)  # noqa: E731
    _moe_down_kernel[grid](
        hidden_PI, w_down_EIH, y_NH, routing_weights_TK.contiguous().view(-1),
        alignment.sorted_pair_ids, alignment.block_expert_ids, alignment.num_padded,
        H, I, num_pairs, max_padded, triton.next_power_of_2(num_pairs),  # cols = H, depth = I
        hidden_PI.stride(0), w_down_EIH.stride(0), w_down_EIH.stride(1), w_down_EIH.stride(2), y_NH.stride(0),
        BLOCK_M=block_m, UPCAST=interpreting(),
    )
    return y_NH.view(T, K, H)


def describe_tuned_configs(gate_up_kernel=None, down_kernel=None) -> str:
    """The tile shapes the autotuner picked last for two MoE GEMM kernels (level 7's by default), for a row's note."""
    parts = []
    kernels = (("gate_up", gate_up_kernel or _moe_gate_up_kernel), ("down", down_kernel or _moe_down_kernel))
    for label, kernel in kernels:
        config = getattr(kernel, "best_config", None)
        if config is not None:
            tile = "x".join(str(config.kwargs[k]) for k in ("BLOCK_N", "BLOCK_D"))
            parts.append(f"{label} tile {tile} (columns × depth), {config.num_warps} warps, "
                         f"{config.num_stages} stages")
    return "autotuned: " + "; ".join(parts) if parts else ""


# ---------------------------------------------------------------------------------------------------------------
# Level 9: the same two GEMMs, rebuilt for Hopper: a persistent grid, weight tiles (and the down GEMM's sorted
# activations) by TMA, gate and up interleaved into one accumulator, and at decode the sum over K inside the down
# GEMM. Why each, and what each bought: the lesson in level9_persistent_tma.py.
# TMA needs 16-byte-aligned row strides; `tma_storage` pads a tensor's rows (not its shape) where they are not, and
# `tma_empty` makes a new tensor so.
# ---------------------------------------------------------------------------------------------------------------
def interleave_gate_up(gate_EHI: torch.Tensor, up_EHI: torch.Tensor) -> torch.Tensor:
    """[E, H, 2I]: column 2j is gate j and column 2j + 1 is up j, so one GEMM fills one accumulator with both and
    each output column's pair lands in one tile, split in the epilogue (level 9's gate/up GEMM; the matmul_ogs
    peer's fused activation reads the same pairs)."""
    E, H, I = gate_EHI.shape
    return torch.stack([gate_EHI, up_EHI], dim=3).reshape(E, H, 2 * I)


def tma_row_elements(cols: int, dtype: torch.dtype) -> int:
    """A row's storage for TMA: `cols` rounded up to a multiple of 16 bytes."""
    elements = 16 // torch.empty((), dtype=dtype).element_size()
    return triton.cdiv(cols, elements) * elements


def tma_storage(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` with its last dimension's storage padded to a multiple of 16 bytes (TMA's stride rule); the view
    keeps the real shape, so descriptors built from it see the real extent and read zeros past it."""
    cols = tensor.shape[-1]
    if tma_row_elements(cols, tensor.dtype) == cols:
        return tensor.contiguous()
    padded = tensor.new_zeros((*tensor.shape[:-1], tma_row_elements(cols, tensor.dtype)))
    padded[..., :cols] = tensor
    return padded[..., :cols]


def tma_empty(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized [rows, cols] whose rows' storage is padded to 16 bytes, as `tma_storage` pads: the view keeps
    the real shape."""
    return torch.empty((rows, tma_row_elements(cols, dtype)), dtype=dtype, device=device)[:, :cols]


def tma_descriptor(tensor: torch.Tensor) -> TensorDescriptor:
    """A TMA descriptor made on the host over `tensor`'s real shape and strides, passed to a kernel as an argument
    (a CUDA graph records it with the launch). Its box depends on the tile, so each kernel's autotune configs set
    it before every launch (their pre_hook)."""
    return TensorDescriptor(tensor, list(tensor.shape), list(tensor.stride()), [1] * tensor.dim())


def _gate_up_boxes(args: dict) -> None:
    args["w_desc"].block_shape = [1, args["BLOCK_D"], 2 * args["BLOCK_N"]]  # [E, H, 2I]: gate|up interleaved
    args["hidden_desc"].block_shape = [args["BLOCK_M"], args["BLOCK_N"]]  # [P, I]


def _down_boxes(args: dict) -> None:
    args["hidden_desc"].block_shape = [args["BLOCK_M"], args["BLOCK_D"]]  # [P, I]
    args["w_desc"].block_shape = [1, args["BLOCK_D"], args["BLOCK_N"]]  # [E, I, H]


def _persistent_configs(interpret: bool, gate_up: bool) -> list:
    """Narrow tiles for decode (a few rows per expert: spread the weight reads over every SM), wide ones for
    prefill. BLOCK_N is the output tile's width; the gate/up accumulator is twice that."""
    boxes = _gate_up_boxes if gate_up else _down_boxes  # sets the tensor descriptors' boxes for a config
    if interpret:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_D": 32, "GROUP_M": 2}, num_warps=4, num_stages=1,
                              pre_hook=boxes)]
    # The autotuner times each kernel alone, and one of its picks loses inside the layer's graph, where each tile was
    # pinned and the graph captured again (one H100, NOTES.md): no 256-wide tile with 4 stages, the down GEMM's pick
    # at prefill, 0.4-12% slower than with 3 stages in each of 12 rounds.
    shapes = [(16, 128, 4, 4), (32, 128, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4),
              (256, 64, 8, 3)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_D": d, "GROUP_M": 8}, num_warps=w, num_stages=s, pre_hook=boxes)
            for n, d, w, s in shapes]


@triton.jit
def _persistent_tile(tile, num_pid_m, num_pid_n, block_expert_ids_ptr, padded_starts_ptr, BLOCK_M: tl.constexpr,
                     GROUP_M: tl.constexpr, PAIRS_IN_REGISTERS: tl.constexpr):
    """Tile index → (row block, column block), walking groups of up to GROUP_M row blocks of one expert column by
    column, so that the programs running at once share each weight tile in L2. A group never crosses from one
    expert's run to the next: where it did (level 7's _tile_position, which numbers groups from row 0), the next
    expert's weight tiles were read again by the next group, and deepseek-v3's down kernel at 16384 tokens (5 row
    blocks an expert) swung between 6.9 and 15 ms from one forward to the next on an H100, against 6.4-7.6 ms
    with groups in runs (NOTES.md). A run starts at a multiple of num_pid_n in tile order, so the row block
    tile // num_pid_n names the run. With the pairs aligned in registers (decode: a few blocks) there is no
    table of runs, and groups count from row 0."""
    if PAIRS_IN_REGISTERS:
        first_m = tile // (GROUP_M * num_pid_n) * GROUP_M
        group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    else:
        expert = tl.load(block_expert_ids_ptr + tile // num_pid_n)
        run_first = tl.load(padded_starts_ptr + expert) // BLOCK_M
        run_end = tl.load(padded_starts_ptr + expert + 1) // BLOCK_M
        first_m = run_first + (tile // num_pid_n - run_first) // GROUP_M * GROUP_M
        group_size = tl.minimum(run_end - first_m, GROUP_M)
    in_group = tile - first_m * num_pid_n
    return first_m + in_group % group_size, in_group // group_size


@triton.jit
def _align_in_registers(expert_of_pair_ptr, num_pairs, block_m, PAIRS: tl.constexpr):
    """The alignment of a few pairs, as each GEMM program can compute it for itself: the same runs as align_tokens
    (one per expert, in expert order, each padded to whole blocks), found by comparing every pair with every other
    instead of by counters in memory. Returns each pair's expert and row in the aligned order (past num_pairs:
    expert 0, row −1, matching no row), and the padded length."""
    pair = tl.arange(0, PAIRS)
    valid = pair < num_pairs
    expert = tl.load(expert_of_pair_ptr + pair, mask=valid, other=0).to(tl.int32)
    same = (expert[:, None] == expert[None, :]) & valid[:, None] & valid[None, :]  # [p, q]: one expert
    count = tl.sum(same.to(tl.int32), axis=1)  # the pairs of p's expert
    rank = tl.sum((same & (pair[None, :] < pair[:, None])).to(tl.int32), axis=1)  # p's place among them
    run = (count + block_m - 1) // block_m * block_m  # p's expert's run, padded
    leads = valid & (rank == 0)  # each run counted once, by its expert's first pair
    run_start = tl.sum(tl.where(leads[None, :] & (expert[None, :] < expert[:, None]), run[None, :], 0), axis=1)
    return expert, tl.where(valid, run_start + rank, -1), tl.sum(tl.where(leads, run, 0), axis=0)


@triton.jit
def _tile_rows_in_registers(expert_of_pair, row_of_pair, pid_m, pid_n, num_pairs, cols, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    """_tile_rows from _align_in_registers' result instead of the alignment's tensors."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.arange(0, expert_of_pair.shape[0])
    pair_ids = tl.min(tl.where(row_of_pair[None, :] == offs_m[:, None], pair[None, :], num_pairs), axis=1)
    # A block's first row always holds a pair (padding only ends a run), and that pair's expert is the block's.
    expert = tl.max(tl.where(row_of_pair == pid_m * BLOCK_M, expert_of_pair, -1), axis=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return expert.to(tl.int64), offs_m, pair_ids, pair_ids < num_pairs, offs_n, offs_n < cols


@triton.jit
def _alignment_of_program(num_padded_ptr, expert_of_pair_ptr, num_pairs, BLOCK_M: tl.constexpr,
                          PAIRS_IN_REGISTERS: tl.constexpr):
    """What a persistent GEMM's program knows of the alignment before its loop over tiles: the pairs' experts and
    rows and the padded length, aligned here in registers (decode: no alignment kernel ran), or the padded length
    alone, read from the alignment's tensor (the tiles' rows are then read per tile, and the first two values are
    the padded length again, unused)."""
    if PAIRS_IN_REGISTERS:
        expert_of_pair, row_of_pair, num_padded = _align_in_registers(expert_of_pair_ptr, num_pairs, BLOCK_M,
                                                                      PAIRS_IN_REGISTERS)
    else:
        num_padded = tl.load(num_padded_ptr)
        expert_of_pair, row_of_pair = num_padded, num_padded
    return expert_of_pair, row_of_pair, num_padded


@triton.jit
def _persistent_tile_rows(sorted_pair_ids_ptr, block_expert_ids_ptr, expert_of_pair, row_of_pair, pid_m, pid_n,
                          num_pairs, cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          PAIRS_IN_REGISTERS: tl.constexpr):
    """_tile_rows for a persistent GEMM: from the pairs aligned in registers, or from the alignment's tensors."""
    if PAIRS_IN_REGISTERS:
        rows = _tile_rows_in_registers(expert_of_pair, row_of_pair, pid_m, pid_n, num_pairs, cols, BLOCK_M, BLOCK_N)
    else:
        rows = _tile_rows(sorted_pair_ids_ptr, block_expert_ids_ptr, pid_m, pid_n, num_pairs, cols, BLOCK_M, BLOCK_N)
    return rows


@triton.autotune(configs=_persistent_configs(interpreting(), gate_up=True),
                 key=["cols", "depth", "BLOCK_M", "pairs_bucket"])
@triton.jit
def _moe_gate_up_persistent_kernel(
    x_ptr, w_desc, hidden_desc,  # x [T, H]; descriptors: w13 [E, H, 2I] gate and up interleaved, hidden [P_max, I]
    sorted_pair_ids_ptr, block_expert_ids_ptr, padded_starts_ptr, num_padded_ptr, expert_of_pair_ptr,
    cols, depth, num_pairs, top_k, pairs_bucket,  # cols = I, depth = H
    stride_xt,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, UPCAST: tl.constexpr, PAIRS_IN_REGISTERS: tl.constexpr,
):
    expert_of_pair, row_of_pair, num_padded = _alignment_of_program(num_padded_ptr, expert_of_pair_ptr, num_pairs,
                                                                    BLOCK_M, PAIRS_IN_REGISTERS)
    num_pid_m = tl.cdiv(num_padded, BLOCK_M)  # only the blocks this routing filled
    num_pid_n = tl.cdiv(cols, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for tile in tl.range(tl.program_id(axis=0), num_pid_m * num_pid_n, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _persistent_tile(tile, num_pid_m, num_pid_n, block_expert_ids_ptr, padded_starts_ptr, BLOCK_M,
                                        GROUP_M, PAIRS_IN_REGISTERS)
        expert, _, pair_ids, row_valid, _, _ = _persistent_tile_rows(
            sorted_pair_ids_ptr, block_expert_ids_ptr, expert_of_pair, row_of_pair, pid_m, pid_n, num_pairs, cols,
            BLOCK_M, BLOCK_N, PAIRS_IN_REGISTERS)
        x_ptrs = x_ptr + (pair_ids // top_k).to(tl.int64)[:, None] * stride_xt + offs_d[None, :]  # gathered rows
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)  # gate and up, interleaved
        for d_start in tl.range(0, depth, BLOCK_D):
            x = tl.load(x_ptrs, mask=row_valid[:, None] & (offs_d < depth - d_start)[None, :], other=0.0)
            w = w_desc.load([expert.to(tl.int32), d_start, pid_n * 2 * BLOCK_N]).reshape(BLOCK_D, 2 * BLOCK_N)
            acc = _dot(x, w, acc, UPCAST)  # read BLOCK_M·BLOCK_D + BLOCK_D·2·BLOCK_N elements
            x_ptrs += BLOCK_D
        gate, up = acc.reshape(BLOCK_M, BLOCK_N, 2).split()
        hidden = gate * tl.sigmoid(gate) * up  # SiLU·up on the fp32 accumulators
        # hidden's rows are in the aligned order, so the tile goes by one TMA store that the warps issue and leave
        # (past I it writes nothing): write BM·BN
        hidden_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], hidden.to(hidden_desc.dtype))


@triton.autotune(configs=_persistent_configs(interpreting(), gate_up=False),
                 key=["cols", "depth", "BLOCK_M", "pairs_bucket", "split_k", "NUM_PROGRAMS"])
@triton.jit
def _moe_down_persistent_kernel(
    hidden_desc, w_desc, out_ptr, routing_weights_ptr,  # hidden [P_max, I] (sorted rows: no gather, so TMA too),
    sorted_pair_ids_ptr, block_expert_ids_ptr, padded_starts_ptr, num_padded_ptr,  # w2 [E, I, H]: descriptors
    expert_of_pair_ptr,
    sum_ptr, arrivals_ptr, slots, arrivals_stride,  # out [N·split_k, H]; SUM_HERE: sum [T, H], arrivals [T, H/16]
    cols, depth, num_pairs, pairs_bucket, split_k,  # cols = H, depth = I
    stride_om, stride_sm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, UPCAST: tl.constexpr, SUM_HERE: tl.constexpr, PAIRS_IN_REGISTERS: tl.constexpr,
):
    expert_of_pair, row_of_pair, num_padded = _alignment_of_program(num_padded_ptr, expert_of_pair_ptr, num_pairs,
                                                                    BLOCK_M, PAIRS_IN_REGISTERS)  # gate/up's rows
    num_pid_m = tl.cdiv(num_padded, BLOCK_M)
    num_pid_n = tl.cdiv(cols, BLOCK_N)
    depth_per_split = tl.cdiv(tl.cdiv(depth, BLOCK_D), split_k) * BLOCK_D
    for tile in tl.range(tl.program_id(axis=0), num_pid_m * num_pid_n * split_k, NUM_PROGRAMS, flatten=True):
        # split-K: each output tile is split_k tiles, each over a slice of the reduction, written as its own row
        split = tile % split_k
        pid_m, pid_n = _persistent_tile(tile // split_k, num_pid_m, num_pid_n, block_expert_ids_ptr, padded_starts_ptr,
                                        BLOCK_M, GROUP_M, PAIRS_IN_REGISTERS)
        expert, _, pair_ids, row_valid, offs_n, col_valid = _persistent_tile_rows(
            sorted_pair_ids_ptr, block_expert_ids_ptr, expert_of_pair, row_of_pair, pid_m, pid_n, num_pairs, cols,
            BLOCK_M, BLOCK_N, PAIRS_IN_REGISTERS)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        first_d = split * depth_per_split
        for d_start in tl.range(first_d, tl.minimum(first_d + depth_per_split, depth), BLOCK_D):
            hidden = hidden_desc.load([pid_m * BLOCK_M, d_start])
            w = w_desc.load([expert.to(tl.int32), d_start, pid_n * BLOCK_N]).reshape(BLOCK_D, BLOCK_N)
            acc = _dot(hidden, w, acc, UPCAST)  # read BLOCK_M·BLOCK_D + BLOCK_D·BLOCK_N elements
        weight = tl.load(routing_weights_ptr + pair_ids, mask=row_valid, other=0.0).to(tl.float32)
        acc = acc * weight[:, None]
        out_rows = pair_ids.to(tl.int64) * split_k + split  # back to pair order, a row per slice
        out_ptrs = out_ptr + out_rows[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & col_valid[None, :])
        if SUM_HERE:
            _sum_if_last(out_ptr, sum_ptr, arrivals_ptr, pair_ids, row_valid, offs_n, col_valid, pid_n, slots,
                         slots * split_k, arrivals_stride, stride_om, stride_sm, BLOCK_M, BLOCK_N)


WIDEST_DOWN_TILE = 256  # the largest BLOCK_N of level 9's down kernel's configs
LONG_REDUCTION = 8192  # the least depth at which a down GEMM with few tiles splits in two (choose_split_k)


def choose_split_k(num_pairs: int, num_experts: int, cols: int, depth: int, programs: int) -> int:
    """Reduction slices for level 9's down GEMM, from the pairs alone (the row blocks they fill are known only on
    the device):
    - where even 32-wide tiles over the fewest row blocks these pairs can fill (one per expert that has pairs, at
      most one per pair) would leave over half the SMs idle (journey at one token: 2 × 32 tiles for 132 SMs), the
      most slices, a power of two up to 4, that still fit in one wave (2 there);
    - else, where the widest tiles over the most row blocks (⌈pairs / BLOCK_M⌉, plus one part-filled block per
      expert) make at most two rounds of the programs and the reduction is long, 2: a kernel that streams weights
      then spends its last round on a fraction of the SMs (mixtral at 512 tokens: 192 tiles, the second round on
      60 SMs). In two slices mixtral's 14336-deep reduction ran 1.1-2.7% faster at 1, 64 and 512 tokens on an
      H100, and journey's 2048-deep one 0.9-4.8% slower at 64 and 512, whose slices' epilogues and partial rows
      weigh more (NOTES.md);
    - else 1."""
    fewest_tiles = min(num_pairs, num_experts) * triton.cdiv(cols, 32)
    if 2 * fewest_tiles <= programs:
        return min(4, 2 ** int(math.log2(programs // fewest_tiles)))
    most_row_blocks = triton.cdiv(num_pairs, choose_block_m(num_pairs, num_experts)) + min(num_pairs, num_experts)
    few_tiles = most_row_blocks * triton.cdiv(cols, WIDEST_DOWN_TILE) <= 2 * programs
    return 2 if few_tiles and depth >= LONG_REDUCTION else 1


def choose_programs_per_sm(num_pairs: int, num_experts: int, cols: int, depth: int, sms: int) -> int:
    """Programs per SM for level 9's down GEMM: 4 where its tiles are decode tiles (BLOCK_M ≤ 32) over a short
    reduction, and even the widest of them over the fewest row blocks the pairs can fill make more than one round
    (qwen3-moe at 64 tokens: 1000 tiles, each 768 deep). There one program per SM kept too few weight bytes in
    flight (75% of DRAM's peak where level 8's several small programs per SM reached 88%), and its last round ran on
    76 of the 132 SMs. With four per SM, as many run at once as the tile lets fit and the rest start as those end,
    as level 8's programs do: on an H100 qwen3-moe at 64 tokens ran 3.7% faster, deepseek-v3 at 64 and 512 tokens
    0.8% and 0.6% (two per SM: 3.4%, 0.2%, 0.2%; NOTES.md). A long reduction streams long enough with one program
    (two cost mixtral 1.6% at 512 tokens), and a grid that one round holds only gains idle programs (journey at 64
    tokens, 104 tiles: two cost 1.9%). Else 1."""
    fewest_tiles = min(num_pairs, num_experts) * triton.cdiv(cols, WIDEST_DOWN_TILE)
    decode_tiles = choose_block_m(num_pairs, num_experts) <= 32
    return 4 if decode_tiles and depth < LONG_REDUCTION and fewest_tiles > sms else 1


def num_programs(device: torch.device) -> int:
    """One program per SM on a GPU; a few in the interpreter, which runs them one after another."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _sum_if_last(y_ptr, sum_ptr, arrivals_ptr, pair_ids, row_valid, offs_n, col_valid, pid_n, slots,
                 rows_per_token, arrivals_stride, stride_ym, stride_sm, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Decode: the sum over each token's rows of y (K slots, split_k rows each) in the down GEMM itself, by the
    program that stores the last of them, so the layer needs no kernel of its own for it. With its tile's rows
    stored, a program counts one arrival per row at (token, column tile); where its count is the token's last, it
    reads the token's rows back (from L2: just written) and stores their sum, then sets the count back to 0 for the
    next forward. The barrier puts every thread's stores before the count, and the count's release and acquire
    make them visible to the program that reads them."""
    tl.debug_barrier()
    tokens = pair_ids // slots
    counts = arrivals_ptr + tokens * arrivals_stride + pid_n
    arrived = tl.atomic_add(counts, 1, mask=row_valid, sem="acq_rel", scope="gpu")
    last = row_valid & (arrived == rows_per_token - 1)
    tl.debug_barrier()
    mask = last[:, None] & col_valid[None, :]
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for row in range(rows_per_token):
        y_rows = tokens.to(tl.int64) * rows_per_token + row
        total += tl.load(y_ptr + y_rows[:, None] * stride_ym + offs_n[None, :], mask=mask, other=0.0,
                         volatile=True).to(tl.float32)  # read rows_per_token·BLOCK_N elements, from L2
    tl.store(sum_ptr + tokens.to(tl.int64)[:, None] * stride_sm + offs_n[None, :],
             total.to(sum_ptr.dtype.element_ty), mask=mask)
    tl.store(counts, 0, mask=last)


def _alignment_args(alignment: TokenAlignment | PairsToAlign) -> tuple[tuple, int]:
    """A persistent GEMM's alignment arguments, (sorted_pair_ids, block_expert_ids, padded_starts, num_padded,
    expert_of_pair) and PAIRS_IN_REGISTERS. The kernel reads either the first four (PAIRS_IN_REGISTERS = 0) or the
    last (a power of two ≥ the pairs), and the arguments it does not read are filled with a tensor it is given
    anyway."""
    if isinstance(alignment, PairsToAlign):
        experts = alignment.expert_of_pair
        return (experts,) * 5, triton.next_power_of_2(max(experts.numel(), 16))
    return (alignment.sorted_pair_ids, alignment.block_expert_ids, alignment.padded_starts, alignment.num_padded,
            alignment.sorted_pair_ids), 0


def moe_gate_up_persistent(tokens_TH: torch.Tensor, w13_interleaved_EH2I: torch.Tensor,
                           alignment: TokenAlignment | PairsToAlign, top_k: int) -> torch.Tensor:
    """Level 7's moe_gate_up on Hopper: hidden [P_max, I] (its storage padded for TMA where I needs it)."""
    _check_device(tokens_TH, w13_interleaved_EH2I)
    _, H, two_I = w13_interleaved_EH2I.shape
    I = two_I // 2
    max_padded = alignment.max_padded
    tokens_TH = tokens_TH.contiguous()
    # rows padded for TMA: these stores, the down GEMM's loads
    hidden_PI = tma_empty(max_padded, I, tokens_TH.dtype, tokens_TH.device)
    programs = num_programs(tokens_TH.device)
    num_pairs = tokens_TH.shape[0] * top_k
    alignment_tensors, pairs_in_registers = _alignment_args(alignment)
    _moe_gate_up_persistent_kernel[(programs,)](
        tokens_TH, tma_descriptor(w13_interleaved_EH2I), tma_descriptor(hidden_PI), *alignment_tensors,
        I, H, num_pairs, top_k, triton.next_power_of_2(num_pairs), tokens_TH.stride(0),
        BLOCK_M=alignment.block_m, NUM_PROGRAMS=programs, UPCAST=interpreting(), PAIRS_IN_REGISTERS=pairs_in_registers,
    )
    return hidden_PI


def moe_down_persistent(hidden_PI: torch.Tensor, w_down_EIH: torch.Tensor, routing_weights_TK: torch.Tensor,
                        alignment: TokenAlignment | PairsToAlign, arrivals: torch.Tensor | None = None) -> torch.Tensor:
    """Level 7's moe_down on Hopper: y [T, K·split, H], each row weighted and back in (token, slot) order, split in
    `choose_split_k` partial rows per pair where the grid would be small (the sum over K adds them too), on
    `choose_programs_per_sm` programs per SM. Given `arrivals` (decode: `arrival_counts`), the kernel sums each
    token's rows itself and returns [T, 1, H]."""
    _check_device(hidden_PI, w_down_EIH)
    T, K = routing_weights_TK.shape
    E, I, H = w_down_EIH.shape
    sms = num_programs(hidden_PI.device)
    split_k = choose_split_k(T * K, E, H, I, sms)
    programs = sms * choose_programs_per_sm(T * K, E, H, I, sms)
    y_NH = torch.empty((T * K * split_k, H), dtype=hidden_PI.dtype, device=hidden_PI.device)
    sum_TH, sum_args = _sum_in_kernel(y_NH, T, K, arrivals)
    alignment_tensors, pairs_in_registers = _alignment_args(alignment)
    _moe_down_persistent_kernel[(programs,)](
        tma_descriptor(hidden_PI), tma_descriptor(w_down_EIH), y_NH, routing_weights_TK.contiguous().view(-1),
        *alignment_tensors, sum_TH, *sum_args, H, I, T * K,
        triton.next_power_of_2(T * K), split_k, y_NH.stride(0), sum_TH.stride(0), BLOCK_M=alignment.block_m,
        NUM_PROGRAMS=programs, UPCAST=interpreting(), SUM_HERE=arrivals is not None,
        PAIRS_IN_REGISTERS=pairs_in_registers,
    )
    return sum_TH.view(T, 1, H) if arrivals is not None else y_NH.view(T, K * split_k, H)


NARROWEST_TILE = 16  # the narrowest BLOCK_N of a down kernel that sums its own rows (level 9's; level 10's is 32)


def arrival_counts(max_tokens: int, cols: int, device: torch.device) -> torch.Tensor:
    """Zeros [max_tokens, cols / NARROWEST_TILE]: for a down kernel that sums each token's rows itself, one count
    per token and column tile of how many of its rows have been stored. The kernel sets each back to 0 after use,
    so one tensor, zeroed once, serves every forward (and a CUDA graph's replays) as long as they run one after
    another, on one stream."""
    return torch.zeros((max_tokens, triton.cdiv(cols, NARROWEST_TILE)), dtype=torch.int32, device=device)


def _sum_in_kernel(y_NH: torch.Tensor, T: int, K: int, arrivals: torch.Tensor | None) -> tuple[torch.Tensor, tuple]:
    """The down kernels' sum [T, H] (y itself where the kernel does not sum) and their arrivals arguments."""
    if arrivals is None:
        return y_NH, (y_NH, K, 0)  # not read: SUM_HERE is off
    if arrivals.shape[0] < T or arrivals.shape[1] * NARROWEST_TILE < y_NH.shape[1]:
        raise ValueError(f"arrival counts {tuple(arrivals.shape)} are too few for {T} tokens of {y_NH.shape[1]}")
    return y_NH.new_empty((T, y_NH.shape[1])), (arrivals, K, arrivals.stride(0))


# ---------------------------------------------------------------------------------------------------------------
# Level 10: level 9's kernels with FP8 (e4m3) operands.
#
# - The tokens are quantized once per forward, one scale per token (a small kernel: read T·H·2 bytes, write T·H + 4T),
#   and gathered by the gate/up kernel as level 9 gathers them, at one byte an element.
# - Weights are stored e4m3 with one fp32 scale per output column, K-major: [E, cols, depth], the reduction
#   contiguous. Hopper's FP8 tensor-core instruction reads both operands K-major, so the kernels load a
#   [BLOCK_N, BLOCK_D] box and multiply by its transpose, which costs nothing (a view of shared memory).
# - The accumulators stay fp32. A weight scale is constant along the reduction, and so is a token's: both multiply
#   the finished accumulator, in the epilogue.
# - The hidden (SiLU·up) is quantized as the tokens are: one scale per row, by the same kernel. No gate/up tile
#   sees a whole row, so the gate/up epilogue writes it in bf16, as level 9's does, and `quantize_rows` reads it
#   back (read P·I·2 bytes, write P·I + 4P). Then the down GEMM's scales too are constant along its reduction: its
#   main loop is one unbroken chain on the tensor cores, and all scales wait for the epilogue. (Quantizing in the
#   gate/up epilogue with a scale per 128-column tile saves that pass, but the down kernel must then scale each
#   128-deep step's partial product before adding it, a wait on the tensor cores every step: it ran at 780 TF/s
#   against the gate/up kernel's 1370 on an H100, NOTES.md.)
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _to_e4m3(x, FP8_MAX: tl.constexpr, INTERPRETED: tl.constexpr):
    """x (fp32) in e4m3, saturated at ±FP8_MAX. Triton's CPU interpreter rounds to e4m3 without carrying into the
    exponent (125.4 becomes 64 with Triton 3.9), so there x is first rounded to e4m3's 3 mantissa bits in fp32:
    adding and subtracting 2^(exponent + 20) leaves exactly those bits, rounded to nearest even, and the cast is
    then exact. On the GPU the hardware's conversion rounds."""
    x = tl.clamp(x, -FP8_MAX, FP8_MAX)
    if INTERPRETED:
        magnitude = tl.abs(x)
        exponent = tl.maximum(tl.floor(tl.log2(tl.maximum(magnitude, 1e-30))), -6.0)  # e4m3 has no step below 2^-9
        shift = tl.exp2(exponent + 20.0)
        x = tl.where(x < 0, -1.0, 1.0) * ((magnitude + shift) - shift)
    return x.to(tl.float8e4nv)


@triton.jit
def _to_bf16(x, INTERPRETED: tl.constexpr):
    """x (fp32) in bf16, rounded to nearest even as the GPU rounds. Triton's CPU interpreter truncates instead, so
    there x's bits are rounded first (half a bf16 step added, plus one more where the kept last bit is odd, then the
    low 16 bits dropped) and the cast is then exact."""
    if INTERPRETED:
        bits = x.to(tl.uint32, bitcast=True)
        x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(tl.bfloat16)


@triton.jit
def _quantize_row_block(block, x_ptr, values_ptr, scales_ptr, rows_in_use, stride_x, stride_v, cols,
                        FP8_MAX: tl.constexpr, INTERPRETED: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Rows block·ROWS … of x: each row's amax, its scale amax / FP8_MAX rounded up to a power of two
    (moe_model.power_of_two_at_least, on the same bits), its values in e4m3. Rows past rows_in_use are not touched."""
    rows = block.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_valid = rows < rows_in_use
    offs = tl.arange(0, BLOCK)
    mask = row_valid[:, None] & (offs < cols)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + offs[None, :], mask=mask, other=0.0).to(tl.float32)  # read 2 B each
    bits = (tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12) / FP8_MAX).to(tl.int32, bitcast=True)
    scales = ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    values = _to_e4m3(x / scales[:, None], FP8_MAX, INTERPRETED)
    tl.store(values_ptr + rows[:, None] * stride_v + offs[None, :], values, mask=mask)  # write 1 byte each
    tl.store(scales_ptr + rows, scales, mask=row_valid)  # and 4 a row


@triton.jit
def _quantize_rows_kernel(x_ptr, values_ptr, scales_ptr, rows_used_ptr, num_rows, cols, stride_x, stride_v,
                          FP8_MAX: tl.constexpr, INTERPRETED: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                          ALL_ROWS: tl.constexpr):
    """ROWS rows per program."""
    # Past the rows in use (the hidden's padded length) nothing is read or written: no later kernel reads there.
    rows_in_use = num_rows if ALL_ROWS else tl.minimum(tl.load(rows_used_ptr), num_rows)
    _quantize_row_block(tl.program_id(axis=0), x_ptr, values_ptr, scales_ptr, rows_in_use, stride_x, stride_v, cols,
                        FP8_MAX, INTERPRETED, ROWS, BLOCK)


@triton.jit
def _align_and_quantize_kernel(
    expert_ids_ptr, cursors_ptr, padded_starts_ptr, sorted_pair_ids_ptr, block_expert_ids_ptr, num_padded_ptr,
    num_pairs, num_experts, max_padded, num_blocks, block_m,
    PAIRS: tl.constexpr, EXPERTS: tl.constexpr, FILL: tl.constexpr,
    x_ptr, values_ptr, scales_ptr, num_rows, cols, stride_x, stride_v,
    FP8_MAX: tl.constexpr, INTERPRETED: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Decode: the one-program alignment (program 0) and the tokens' quantization (programs 1 …) in one launch.
    Neither reads what the other writes, so they need no kernel boundary between them."""
    program = tl.program_id(axis=0)
    if program == 0:
        _align_in_one_program(expert_ids_ptr, cursors_ptr, padded_starts_ptr, sorted_pair_ids_ptr,
                              block_expert_ids_ptr, num_padded_ptr, num_pairs, num_experts, max_padded, num_blocks,
                              block_m, PAIRS, EXPERTS, FILL)
    else:
        _quantize_row_block(program - 1, x_ptr, values_ptr, scales_ptr, num_rows, stride_x, stride_v, cols,
                            FP8_MAX, INTERPRETED, ROWS, BLOCK)


QUANTIZE_ELEMENTS_PER_PROGRAM = 8192


def quantize_rows(x_TH: torch.Tensor, rows_used: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values [T, H], fp32 scales [T]): moe_model.quantize_fp8(x_TH, power_of_two=True) as one kernel. Level
    10 quantizes the tokens [T, H] and the hidden [P, I] with it; for the hidden, `rows_used` (on the device: the
    alignment's padded length) skips the rows past it. The values' rows are padded for TMA. Short rows share a
    program, about QUANTIZE_ELEMENTS_PER_PROGRAM elements in all: with one program per row, qwen3-moe's two passes
    (768- and 2048-element rows) took 237 µs of a 16384-token forward on an H100, 140 µs so (NOTES.md)."""
    _check_device(x_TH)
    rows = _RowsToQuantize.of(x_TH)
    if rows.programs:
        _quantize_rows_kernel[(rows.programs,)](
            rows.x, rows.values, rows.scales, rows.scales if rows_used is None else rows_used, *rows.row_args,
            **rows.constants, ALL_ROWS=rows_used is None, num_warps=8)
    return rows.values, rows.scales


def align_and_quantize_tokens(expert_ids_TK: torch.Tensor, num_experts: int, block_m: int,
                              tokens_TH: torch.Tensor) -> tuple[TokenAlignment, torch.Tensor, torch.Tensor]:
    """align_tokens(..., one_program=True) and quantize_rows(tokens_TH) in one launch (decode: up to
    ONE_PROGRAM_MAX_PAIRS pairs): the alignment, the tokens' e4m3 values [T, H] and their scales [T]."""
    _check_device(expert_ids_TK, tokens_TH)
    alignment, alignment_args = _one_program_alignment(expert_ids_TK, num_experts, block_m)
    rows = _RowsToQuantize.of(tokens_TH)
    _align_and_quantize_kernel[(1 + rows.programs,)](
        *alignment_args, rows.x, rows.values, rows.scales, *rows.row_args, **rows.constants, num_warps=8)
    return alignment, rows.values, rows.scales


class _RowsToQuantize(NamedTuple):
    """A quantization of rows, ready to launch: x (each row contiguous), its e4m3 values (rows padded for TMA) and
    scales, empty, how many programs of ROWS rows fill them, and the kernels' row arguments and constants."""

    x: torch.Tensor
    values: torch.Tensor
    scales: torch.Tensor
    programs: int
    row_args: tuple  # rows, cols, x's row stride, the values' row stride
    constants: dict

    @staticmethod
    def of(x_TH: torch.Tensor) -> "_RowsToQuantize":
        T, H = x_TH.shape
        x_TH = x_TH if x_TH.stride(1) == 1 else x_TH.contiguous()  # rows may be padded (the hidden's, for TMA)
        values_TH = tma_empty(T, H, FP8_DTYPE, x_TH.device)
        scales_T = torch.empty(T, dtype=torch.float32, device=x_TH.device)
        BLOCK = triton.next_power_of_2(H)
        ROWS = max(1, QUANTIZE_ELEMENTS_PER_PROGRAM // BLOCK)
        return _RowsToQuantize(x_TH, values_TH, scales_T, triton.cdiv(T, ROWS),
                               (T, H, x_TH.stride(0), values_TH.stride(0)),
                               dict(FP8_MAX=FP8_MAX, INTERPRETED=interpreting(), BLOCK=BLOCK, ROWS=ROWS))


def _fp8_gate_up_boxes(args: dict) -> None:
    args["w_desc"].block_shape = [1, 2 * args["BLOCK_N"], args["BLOCK_D"]]  # [E, 2I, H]: K-major
    args["hidden_desc"].block_shape = [args["BLOCK_M"], args["BLOCK_N"]]  # [P, I]


def _fp8_down_boxes(args: dict) -> None:
    args["hidden_desc"].block_shape = [args["BLOCK_M"], args["BLOCK_D"]]  # [P, I]
    args["w_desc"].block_shape = [1, args["BLOCK_N"], args["BLOCK_D"]]  # [E, H, I]: K-major


def _fp8_configs(interpret: bool, gate_up: bool) -> list:
    """Level 10's tile shapes, kept as level 9's were, by pinning them inside the graph (NOTES.md): most steps 128
    deep, as an FP8 tensor-core instruction reduces 32 elements where bf16's reduces 16, and 256 deep at decode
    (below); the gate/up accumulator is twice BLOCK_N wide. Unlike level 9's list, this one keeps the 4-stage
    256-wide down tile: pinned, it ran as fast as the 3-stage one or 1-3% faster."""
    boxes = _fp8_gate_up_boxes if gate_up else _fp8_down_boxes
    if interpret:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_D": 32, "GROUP_M": 2}, num_warps=4, num_stages=1,
                              pre_hook=boxes)]
    widths = (32, 64, 128) if gate_up else (64, 128, 256)
    shapes = [(n, d, w, s) for n in widths for d, w, s in ((128, 4, 4), (128, 8, 4), (128, 8, 3), (64, 4, 5))
              if not (n == 256 and w == 4) and not (n == 32 and w == 8)]
    # Decode reads each weight row in runs of BLOCK_D bytes: 256-deep steps read 256 contiguous bytes, as level 9's
    # 128-deep bf16 steps do, where 128-deep FP8 steps read half that per row.
    shapes += [(32, 256, 4, 4), (64, 256, 4, 4), (64, 256, 4, 3)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_D": d, "GROUP_M": 8}, num_warps=w, num_stages=s, pre_hook=boxes)
            for n, d, w, s in shapes]


@triton.autotune(configs=_fp8_configs(interpreting(), gate_up=True), key=["cols", "depth", "BLOCK_M", "pairs_bucket"])
@triton.jit
def _moe_gate_up_fp8_kernel(
    x_ptr, x_scales_ptr, w_desc, w13_scales_ptr, hidden_desc,
    sorted_pair_ids_ptr, block_expert_ids_ptr, padded_starts_ptr, num_padded_ptr,
    cols, depth, num_pairs, top_k, pairs_bucket,  # cols = I, depth = H
    stride_xt, stride_se,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, INTERPRETED: tl.constexpr,
):
    # x [T, H] e4m3 and x_scales [T]; w13 [E, 2I, H] e4m3 (a descriptor), gate and up rows interleaved, and
    # w13_scales [E, 2I]; hidden [P_max, I] bf16 (a descriptor)
    num_pid_m = tl.cdiv(tl.load(num_padded_ptr), BLOCK_M)
    num_pid_n = tl.cdiv(cols, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for tile in tl.range(tl.program_id(axis=0), num_pid_m * num_pid_n, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _persistent_tile(tile, num_pid_m, num_pid_n, block_expert_ids_ptr, padded_starts_ptr, BLOCK_M,
                                        GROUP_M, PAIRS_IN_REGISTERS=0)
        expert, _, pair_ids, row_valid, _, _ = _tile_rows(
            sorted_pair_ids_ptr, block_expert_ids_ptr, pid_m, pid_n, num_pairs, cols, BLOCK_M, BLOCK_N)
        token_rows = (pair_ids // top_k).to(tl.int64)
        x_ptrs = x_ptr + token_rows[:, None] * stride_xt + offs_d[None, :]  # gathered rows, one byte an element
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)  # gate and up, interleaved
        for d_start in tl.range(0, depth, BLOCK_D):
            x = tl.load(x_ptrs, mask=row_valid[:, None] & (offs_d < depth - d_start)[None, :], other=0.0)
            w = w_desc.load([expert.to(tl.int32), pid_n * 2 * BLOCK_N, d_start]).reshape(2 * BLOCK_N, BLOCK_D)
            # Hopper's FP8 instruction adds its products at reduced precision (DeepSeek-V3 measured about 14 bits),
            # and Triton lets it run the whole depth that way on sm_90: 1-1.5% error against the quantized
            # reference at H = 1024-7168. Promoting to fp32 every step (max_num_imprecise_acc=BLOCK_D) cut that to
            # 0.4% and cost a third of the speed (NOTES.md). The down kernel's chain is the same.
            acc = tl.dot(x, w.T, acc)  # read BLOCK_M·BLOCK_D + 2·BLOCK_N·BLOCK_D bytes
            x_ptrs += BLOCK_D
        # Dequantize the accumulator: the token's scale along the rows, each weight column's along the columns.
        offs_2n = pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
        w_scales = tl.load(w13_scales_ptr + expert * stride_se + offs_2n, mask=offs_2n < 2 * cols, other=0.0)
        x_scales = tl.load(x_scales_ptr + token_rows, mask=row_valid, other=0.0)
        gate, up = (acc * x_scales[:, None] * w_scales[None, :]).reshape(BLOCK_M, BLOCK_N, 2).split()
        hidden = _to_bf16(gate * tl.sigmoid(gate) * up, INTERPRETED)  # SiLU·up in fp32, written in bf16
        # by one TMA store, as level 9's (past I it writes nothing): write BLOCK_M·BLOCK_N·2 bytes
        hidden_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], hidden)


@triton.autotune(configs=_fp8_configs(interpreting(), gate_up=False), key=["cols", "depth", "BLOCK_M", "pairs_bucket"])
@triton.jit
def _moe_down_fp8_kernel(
    hidden_desc, hidden_scales_ptr, w_desc, w2_scales_ptr, out_ptr, routing_weights_ptr,
    sorted_pair_ids_ptr, block_expert_ids_ptr, padded_starts_ptr, num_padded_ptr,
    sum_ptr, arrivals_ptr, slots, arrivals_stride,  # as level 9's
    cols, depth, num_pairs, pairs_bucket,  # cols = H, depth = I
    stride_se, stride_om, stride_sm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, SUM_HERE: tl.constexpr,
):
    # hidden [P_max, I] e4m3 and hidden_scales [P_max]; w2 [E, H, I] e4m3 and w2_scales [E, H] (values: descriptors);
    # out [N, H]
    num_pid_m = tl.cdiv(tl.load(num_padded_ptr), BLOCK_M)
    num_pid_n = tl.cdiv(cols, BLOCK_N)
    for tile in tl.range(tl.program_id(axis=0), num_pid_m * num_pid_n, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _persistent_tile(tile, num_pid_m, num_pid_n, block_expert_ids_ptr, padded_starts_ptr, BLOCK_M,
                                        GROUP_M, PAIRS_IN_REGISTERS=0)
        expert, offs_m, pair_ids, row_valid, offs_n, col_valid = _tile_rows(
            sorted_pair_ids_ptr, block_expert_ids_ptr, pid_m, pid_n, num_pairs, cols, BLOCK_M, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d_start in tl.range(0, depth, BLOCK_D):
            hidden = hidden_desc.load([pid_m * BLOCK_M, d_start])
            w = w_desc.load([expert.to(tl.int32), pid_n * BLOCK_N, d_start]).reshape(BLOCK_N, BLOCK_D)
            acc = tl.dot(hidden, w.T, acc)  # read BLOCK_M·BLOCK_D + BLOCK_N·BLOCK_D bytes
        # Dequantize: the hidden row's scale along the rows, each weight column's along the columns.
        hidden_scales = tl.load(hidden_scales_ptr + offs_m)
        w_scales = tl.load(w2_scales_ptr + expert * stride_se + offs_n, mask=col_valid, other=0.0)
        weight = tl.load(routing_weights_ptr + pair_ids, mask=row_valid, other=0.0).to(tl.float32)
        acc = acc * hidden_scales[:, None] * w_scales[None, :] * weight[:, None]
        out_ptrs = out_ptr + pair_ids[:, None].to(tl.int64) * stride_om + offs_n[None, :]  # back to pair order
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & col_valid[None, :])
        if SUM_HERE:
            _sum_if_last(out_ptr, sum_ptr, arrivals_ptr, pair_ids, row_valid, offs_n, col_valid, pid_n, slots,
                         slots, arrivals_stride, stride_om, stride_sm, BLOCK_M, BLOCK_N)


def moe_gate_up_fp8(x_values_TH: torch.Tensor, x_scales_T: torch.Tensor, w13: Fp8Experts,
                    alignment: TokenAlignment, top_k: int) -> torch.Tensor:
    """Level 9's moe_gate_up_persistent in FP8: hidden bf16 [P_max, I], from the tokens' e4m3 values and scales and
    the gate|up experts (rows interleaved, [E, 2I, H])."""
    _check_device(x_values_TH, w13.values_ECD)
    _, two_I, H = w13.values_ECD.shape
    I = two_I // 2
    max_padded = alignment.max_padded
    hidden_PI = tma_empty(max_padded, I, torch.bfloat16, x_values_TH.device)  # rows padded for these TMA stores
    programs = num_programs(x_values_TH.device)
    num_pairs = x_values_TH.shape[0] * top_k
    _moe_gate_up_fp8_kernel[(programs,)](
        x_values_TH, x_scales_T, tma_descriptor(w13.values_ECD), w13.scales_EC, tma_descriptor(hidden_PI),
        alignment.sorted_pair_ids, alignment.block_expert_ids, alignment.padded_starts, alignment.num_padded,
        I, H, num_pairs, top_k, triton.next_power_of_2(num_pairs),
        x_values_TH.stride(0), w13.scales_EC.stride(0), BLOCK_M=alignment.block_m,
        NUM_PROGRAMS=programs, INTERPRETED=interpreting(),
    )
    return hidden_PI


def moe_down_fp8(hidden_values_PI: torch.Tensor, hidden_scales_P: torch.Tensor, w_down: Fp8Experts,
                 routing_weights_TK: torch.Tensor, alignment: TokenAlignment,
                 arrivals: torch.Tensor | None = None) -> torch.Tensor:
    """Level 9's moe_down_persistent in FP8: y [T, K, H] in the routing weights' dtype, each row weighted and back
    in (token, slot) order, from the hidden's e4m3 values (rows padded for TMA) and row scales and the down experts
    ([E, H, I]). Given `arrivals`, summed over K in the kernel: [T, 1, H]."""
    _check_device(hidden_values_PI, w_down.values_ECD)
    T, K = routing_weights_TK.shape
    _, H, I = w_down.values_ECD.shape
    y_NH = torch.empty((T * K, H), dtype=routing_weights_TK.dtype, device=hidden_values_PI.device)
    sum_TH, sum_args = _sum_in_kernel(y_NH, T, K, arrivals)
    programs = num_programs(hidden_values_PI.device)
    _moe_down_fp8_kernel[(programs,)](
        tma_descriptor(hidden_values_PI), hidden_scales_P, tma_descriptor(w_down.values_ECD), w_down.scales_EC, y_NH,
        routing_weights_TK.contiguous().view(-1), alignment.sorted_pair_ids, alignment.block_expert_ids,
        alignment.padded_starts, alignment.num_padded, sum_TH, *sum_args, H, I, T * K, triton.next_power_of_2(T * K),
        w_down.scales_EC.stride(0), y_NH.stride(0), sum_TH.stride(0),
        BLOCK_M=alignment.block_m, NUM_PROGRAMS=programs, SUM_HERE=arrivals is not None,
    )
    return sum_TH.view(T, 1, H) if arrivals is not None else y_NH.view(T, K, H)
