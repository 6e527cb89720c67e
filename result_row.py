"""One result row: every field a measurement can record, once, for the harnesses that write rows and the report
that reads them.

`moe_benchmark.benchmark()` (one level on one GPU) and `ep_benchmark.benchmark_ep()` (the expert-parallel level)
fill a `ResultRow`; `aisp bench run` appends its `to_json()` to rows.jsonl, one JSON object per line; the report
reads the lines back through `from_json`. A field is set by name on a slotted dataclass, so a misspelled field is
an AttributeError where the row is filled, never a new column in the file.

No torch here: `aisp bench report` runs where only the results are.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

# The stages a forward is split into for `--profile`, in the order they run. "routing" is the router itself (the
# same for every level, timed before the forward); "outside stages" is forward time no marker covers: Python
# between the stages, allocation and, for the CUDA-graph levels, the whole replay (one launch has no boundaries).
STAGES = ("routing", "permute", "expert GEMMs", "activation", "combine", "shared experts")
OUTSIDE_STAGES = "outside stages"

EP_ONLY = {"ep": True}  # a field only the expert-parallel level fills; other rows leave it out of the file


def ep_field():
    return field(default=None, metadata=EP_ONLY)


def shape_label(row) -> str:
    """A row's layer shape as the console, the tables and the report title it: "H=1024 I=2048 E=8 K=2 bf16", with
    S=n after K for a layer with shared experts. `row`: a rows.jsonl row, as a dict or a pandas row (whose
    shared_experts is NaN for runs from before shared experts)."""
    shared = row.get("shared_experts")
    shared = f" S={int(shared)}" if shared and shared == shared else ""  # NaN ≠ NaN
    return f"H={row['hidden']} I={row['intermediate']} E={row['experts']} K={row['top_k']}{shared} {row['dtype']}"


TARGET = "moe_journey"  # the lab every row and run folder here belongs to (`aisp bench run -t`)


@dataclass(slots=True, kw_only=True)
class ResultRow:
    """One (level, case, token count) measurement. Fields in the order rows.jsonl lists them; a field older runs
    lack has the default that says what they measured (no traffic shape: uniform), or None (not recorded)."""

    # The case: what was measured, where.
    target: str  # the lab, TARGET
    level: int | str  # the level's key: 0 to 10, "peer", "peer-fp8", "peer-ogs" or "ep"
    level_name: str  # the level's short name, "grouped"
    preset: str  # the preset's name (an inline shape's is made of its numbers)
    hidden: int  # H, the model width
    intermediate: int  # I, each expert's MLP width
    experts: int  # E, routed experts (all ranks' together on an EP row)
    top_k: int  # K, experts per token
    shared_experts: int = 0  # S, dense experts every token also goes through
    tokens: int  # T, tokens in the forward (all ranks' together on an EP row)
    traffic: str = "uniform"  # the traffic shape's label: uniform, zipf(s=1.2), hot(50% of tokens)
    router: str = "softmax-topk"  # softmax-topk, sigmoid-bias, switch or expert-choice
    device: str  # the GPU's name, or "cpu"
    device_type: str | None = None  # "cuda" or "cpu"
    dtype: str  # the weights' and activations' dtype, "bf16"

    # The timing: the median and the spread of the timed calls.
    ms: float | None = None  # median ms per forward
    ms_p20: float | None = None  # 20th percentile, ms
    ms_p80: float | None = None  # 80th percentile, ms
    repeats: int | None = None  # timed calls
    tokens_per_s: float | None = None  # T / median time
    tflops: float | None = None  # the layer's FLOPs (moe_model.flop_count) / median time, TFLOP/s
    gbps: float | None = None  # the least bytes it must move (moe_model.min_bytes) / median time, GB/s
    pct_roofline: float | None = None  # the measured ceilings' floor time / median time, % (GPU only)
    # cuBLAS's median ms for the layer's FLOPs as two dense GEMMs of all T·(K + S) rows, timed in turn with the
    # case's levels (moe_benchmark.DenseGemms; GPU, cases under the matmul roof)
    dense_gemm_ms: float | None = None
    peak_mb: float | None = None  # device memory allocated at the forward's peak, weights included, MiB (GPU only)
    # Whether peak_mb was counted with the garbage collected first (moe_benchmark.set_up; the one-process levels).
    # Rows from before this field were not: a reference cycle left by one level's set-up could be counted against
    # another level, which put make bench's level 9 at journey 32768 at -1.1 MiB on an H100 (NOTES.md); the report
    # leaves their peaks out. (Level ep's rows measure their peak alone and the report does not show it.)
    peak_garbage_free: bool = False
    rel_err: float | None = None  # ‖out − ref‖ / ‖ref‖ against the fp32 reference, on the check's inputs
    # FP8 levels: rel_err is against the reference computed on the same quantized values (the kernels' error);
    # quant_err is ‖out − ref‖ / ‖ref‖ against the layer's fp32 reference, the quantization's cost.
    quant_err: float | None = None
    first_call_ms: float | None = None  # the first call, outside the timing: compilation, autotuning, graph capture

    # The lesson's counts (MoELevel.claims) and, on a GPU, the same measured (moe_benchmark.measure_counts).
    launches_claimed: tuple[int, int] | None = None  # kernels per forward, (low, high)
    launches_measured: int | None = None  # kernels per forward, from torch.profiler
    syncs_claimed: int | None = None  # host waits for the device per forward
    syncs_measured: int | None = None  # the same, from torch.cuda.set_sync_debug_mode
    extra_mb_claimed: tuple[float, float] | None = None  # memory beyond inputs, weights and output, (low, high) MiB
    extra_mb: float | None = None  # the same, measured, MiB
    # The SM clock right after the timed calls (nvidia-smi), MHz, and whether the software power cap held it down
    # then (GPU only; what the cap does to an H100's clock: `sm_clock_after_load`).
    sm_clock_mhz: int | None = None
    power_capped: bool | None = None
    gpu_busy_pct: float | None = None  # kernel time / forward time, %
    # The host's time to issue one forward: a loop's median, apart from the timing (GPU, levels that never wait for
    # the GPU: one that waits has its wait in its host time).
    host_ms: float | None = None
    host_bound: bool | None = None  # is_host_bound() of the row
    claims_contradicted: list[str] | None = None  # which of launches, syncs, extra memory the measurement contradicts

    # How the run went: one of STATUSES (checked: verified, not timed), and why.
    status: str = "ok"
    note: str = ""  # fallbacks, autotune picks, the reason for a status other than ok

    # How the timed forward's (token, slot) pairs spread over the experts (moe_model.load_metrics).
    tokens_per_expert: list[int] | None = None  # pairs per expert, E numbers
    load_cv: float | None = None  # their coefficient of variation
    load_gini: float | None = None  # their Gini coefficient: 0 even, 1 all on one expert
    load_max_over_mean: float | None = None  # the busiest expert's pairs / the mean
    dead_experts: int | None = None  # experts with under 1% of the mean load
    dropped_tokens: int | None = None  # pairs the router dropped (over the switch router's capacity)

    # --profile: mean ms per call of each stage (STAGES, then OUTSIDE_STAGES), and over how many calls.
    stage_ms: dict[str, float] | None = None
    profile_calls: int | None = None

    # The expert-parallel level (weak scaling: each of W ranks holds E/W experts and T/W tokens).
    world_size: int | None = ep_field()  # W, processes (one GPU each)
    tokens_per_rank: int | None = ep_field()  # T/W
    experts_per_rank: int | None = ep_field()  # E/W
    local_level: str | None = ep_field()  # the single-GPU level each rank runs its experts with, "7 triton_grouped"
    # The rank the phases and exposed times below are read on: "busiest" (the longest compute; from 2026-11-26);
    # None on older rows, which read them on the slowest rank (under skew a light rank, its wait in the combine).
    phases_rank: str | None = ep_field()
    # unpipelined: the start to the routed experts' compute (the shared experts' first half runs in it), ms
    dispatch_ms: float | None = ep_field()
    compute_ms: float | None = ep_field()  # unpipelined: the experts' compute, ms
    combine_ms: float | None = ep_field()  # unpipelined: the experts' compute to the end (the second half), ms
    a2a_bytes: int | None = ep_field()  # bytes crossing between ranks, dispatch and combine, all ranks
    # the busiest rank's dispatch bytes / dispatch_ms, GB/s: with shared experts, a floor on the link's rate
    dispatch_gbps: float | None = ep_field()
    chunks: int | None = ep_field()  # the pipelined forward's chunk count that was timed in full
    chunk_ms: dict[str, float] | None = ep_field()  # the brief timing's median ms per chunk count tried
    ms_c1: float | None = ep_field()  # the unpipelined (one chunk) forward's median, ms
    exposed_comm_ms_c1: float | None = ep_field()  # its time outside the experts' compute, ms
    exposed_comm_ms: float | None = ep_field()  # the same for the chosen chunk count, ms
    compute_ms_chunked: float | None = ep_field()  # the chosen chunk count's compute spans, summed, ms
    rank_load_max_over_mean: float | None = ep_field()  # the busiest rank's pairs / the mean
    a2a_busbw_gbps: float | None = ep_field()  # an all-to-all's bus bandwidth on this group, GB/s (None at W=1)
    allreduce_busbw_gbps: float | None = ep_field()  # an all-reduce's bus bandwidth on this group, GB/s

    def update(self, **values) -> None:
        """Set fields by name; an unknown name is an AttributeError (the slots have no room for it)."""
        for name, value in values.items():
            setattr(self, name, value)

    def is_host_bound(self) -> bool | None:
        """Whether the row's time depends on the host CPU: the GPU was busy under half of the forward, or a forward
        that never waits for the GPU took the host longer to issue than the GPU to run (back to back, the host would
        set the pace). None where the GPU's busy share was not measured (a CPU row). The harness stores it in
        `host_bound`; the report asks again, so that rows written under an older rule read as this one says (the
        published sweep of 2026-11-26 06:25 flagged its level-4 rows by a host time that held the level's sync)."""
        if self.gpu_busy_pct is None:
            return None
        issue_ms = self.issue_ms()
        return self.gpu_busy_pct < 50 or (issue_ms is not None and issue_ms > self.ms)

    def issue_ms(self) -> float | None:
        """host_ms where it is the host's time to issue a forward: a level that waits for the GPU has the wait in
        its host time (the harness records none for it now; older rows did)."""
        return self.host_ms if self.syncs_measured == 0 else None

    def to_json(self) -> dict:
        """The row as rows.jsonl holds it: every field, less the expert-parallel ones on a row of another level."""
        ep_row = self.world_size is not None
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if ep_row or not f.metadata}

    @classmethod
    def from_json(cls, values: dict) -> ResultRow:
        """A row read back. A field the row lacks (it is older than the field) takes its default. A field the
        schema lacks is refused: a row is written only from this class, so such a field comes from another
        version of the lab or a hand edit, and a report that dropped it silently would misreport the run."""
        unknown = [name for name in values if name not in COLUMNS]
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}: not a row this lab writes")
        missing = [name for name in REQUIRED if name not in values]
        if missing:
            raise ValueError(f"missing field(s) {', '.join(map(repr, missing))}")
        for name, value in values.items():
            if not isinstance(value, JSON_TYPES[name]):
                raise ValueError(f"field {name!r} holds {value!r}, not {ANNOTATIONS[name]}")
        if values.get("status", "ok") not in STATUSES:
            raise ValueError(f"status {values['status']!r} is none of {', '.join(STATUSES)}")
        if values["tokens"] < 1:
            raise ValueError(f"tokens {values['tokens']!r}: a forward has at least one token")
        if values.get("status", "ok") == "ok" and not 0 < (values.get("ms") or 0) < math.inf:  # NaN fails too
            # what every table of a timed row reads, and divides by
            raise ValueError(f"a timed row (status 'ok') needs its time, 'ms', a positive number: got "
                             f"{values.get('ms')!r}")
        return cls(**values)


COLUMNS = tuple(f.name for f in dataclasses.fields(ResultRow))  # every field, in the file's order
STATUSES = ("ok", "checked", "oom", "skipped", "error")
REQUIRED = tuple(f.name for f in dataclasses.fields(ResultRow)
                 if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
ANNOTATIONS = {f.name: f.type for f in dataclasses.fields(ResultRow)}  # as written above: "float | None"
# The values each annotation's parts allow, as JSON gives them back: a float may have been written as a whole
# number, and a tuple comes back as a list (a row not yet written holds the tuple).
_JSON_OF = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),),
            "tuple": (list, tuple), "list": (list,), "dict": (dict,)}
JSON_TYPES = {name: sum((_JSON_OF[part.strip().split("[")[0]] for part in annotation.split("|")), ())
              for name, annotation in ANNOTATIONS.items()}
