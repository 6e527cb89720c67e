"""Mechanics shared by every level: inputs, the reference check, timing, memory, the result row.

A level subclasses `MoELevel`, sets `level`, `name`, `summary` and `claims` (its lesson's counts), and writes
`forward(tokens_TH, routing_weights_TK, expert_ids_TK) -> out_TH` (and `prepare()` for a one-time weight
re-layout). Everything else is here, once, so the level files hold nothing but their idea:

- `benchmark_case()` takes the levels of one case (preset, traffic, T): for each it builds inputs and checks the
  level against the fp32 reference on fresh random inputs (its first call, timed apart); then it times the levels
  in turn, measures on a GPU their kernels, syncs, extra memory and GPU-busy share against their claims, and
  returns one result row per level; an out-of-memory becomes a row with status `oom`, never a crash.
  `benchmark()` is the same for one level.
- `stage(name)` marks a stage of a level's forward (permute, expert GEMMs, ...); `benchmark(..., profile=True)`
  adds to the row the time each stage took (`stage_ms`). Off, a marker costs a few hundred nanoseconds.
- `run_level_script()` is the entry point each level file calls under `if __name__ == "__main__"`.

Timing: on CUDA, `triton.testing.do_bench`: device events around each call, after warm-up, the L2 cache cleared
before each so that no repeat finds the previous one's weights in cache; the median of many repeats, taken in two
rounds (the case's levels in order, then in reverse: a GPU under its power cap slows as it heats). On the CPU,
a host clock, median, with the elementwise Triton kernel run as torch ops; levels whose GEMMs are Triton kernels
are checked in the interpreter there, not timed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import math
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout, without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

import moe_kernels  # noqa: E402
from cli.options import debugging, error_line  # noqa: E402
from moe_model import (  # noqa: E402
    ConfigError,
    MoEConfig,
    MoEWeights,
    Traffic,
    flop_count,
    init_weights,
    load_metrics,
    make_router,
    min_bytes,
    quantize_fp8,
    reference_forward,
    router_logits,
    shared_experts_forward,
)
from result_row import OUTSIDE_STAGES, STAGES, TARGET, ResultRow, shape_label  # noqa: E402


def device_clock(device: torch.device) -> object:
    """A point on the device's own timeline: a recorded CUDA event on the GPU (so a span includes the device idling
    while the host prepares its launches), the host clock on the CPU. `elapsed_ms` reads two of them."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def elapsed_ms(begin: object, end: object) -> float:
    return begin.elapsed_time(end) if isinstance(begin, torch.cuda.Event) else (end - begin) * 1e3


def l2_flush_buffer(device: torch.device) -> torch.Tensor | None:
    """On a GPU, a buffer larger than L2: writing it between calls evicts whatever the previous call left cached."""
    return torch.empty(256 * 2**20, dtype=torch.int8, device=device) if device.type == "cuda" else None


class StageRecorder:
    """The stage spans of a running profile, on the device's clock."""

    def __init__(self, device: torch.device):
        self.device = device
        self.spans: list[tuple[str, object, object]] = []

    def clock(self) -> object:
        return device_clock(self.device)

    def recording(self) -> bool:
        return not (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


class stage:  # noqa: N801 (used like a function: `with stage("permute"):`)
    """`with stage("permute"): ...` marks one stage of a forward. Nothing happens unless `profile_stages` is
    running; stages do not nest. Inside a CUDA graph capture it stays off."""

    recorder: ClassVar[StageRecorder | None] = None
    __slots__ = ("name", "begin")

    def __init__(self, name: str):
        self.name = name
        self.begin = None

    def __enter__(self) -> None:
        recorder = stage.recorder
        if recorder is not None and recorder.recording():
            self.begin = recorder.clock()

    def __exit__(self, *exc_info) -> None:
        if self.begin is not None:
            stage.recorder.spans.append((self.name, self.begin, stage.recorder.clock()))


class LevelUnavailable(RuntimeError):
    """Raised by a level that cannot run here (no GPU, no Triton); its row becomes `skipped` with the reason."""


# The kernels `MoELevel.add_shared_experts` launches per shared expert, (fewest, most): three GEMMs (cuBLAS may
# split one where few rows meet a deep reduction), SiLU, the multiply and the adds. On one H100 the torch peer ran 31
# kernels a forward on deepseek-v3 (one shared expert), 21 on journey (none) (NOTES.md, "Every level's claims").
SHARED_EXPERT_KERNELS = (8, 26)


@dataclass(frozen=True)
class Claims:
    """What a level's lesson says one forward costs, as data the harness measures on a GPU: kernels the GPU runs
    (a CUDA graph's replay counts every kernel in it), host syncs (the CPU waits for the GPU), and device memory
    beyond the inputs, the weights (prepare()'s re-layouts included) and the output. Each is a Python expression
    of the shape legend's T, H, I, E, K and S, `bytes` (per element), E_used (experts that get at least one pair
    under uniform routing: E·(1 − (1 − K/E)^T)), padded_rows(pairs, experts) (P_max: the rows levels 7-10's
    alignment may pad that many pairs to, moe_kernels.padded_length at choose_block_m's block), and
    shared_kernels_min and shared_kernels_max (what `add_shared_experts` launches: SHARED_EXPERT_KERNELS times S).
    A launch count may be a range (low, high) where a library chooses (cuBLAS splits a GEMM with few rows and a deep
    reduction into two kernels), and so may the memory where an allocator rounds (a CUDA graph's pool reserves whole
    segments)."""

    launches: str
    syncs: str
    extra_bytes: str

    def evaluate(self, config: MoEConfig, num_tokens: int) -> dict:
        T, K, E = num_tokens, config.top_k, config.num_experts
        shape = {"T": T, "H": config.hidden, "I": config.intermediate, "E": E, "K": K,
                 "S": config.num_shared_experts, "bytes": torch.finfo(config.torch_dtype).bits // 8,
                 "E_used": E * (1 - (1 - K / E) ** T), "padded_rows": padded_rows, "min": min, "max": max,
                 "shared_kernels_min": SHARED_EXPERT_KERNELS[0] * config.num_shared_experts,
                 "shared_kernels_max": SHARED_EXPERT_KERNELS[1] * config.num_shared_experts}

        def span(formula: str) -> tuple:
            """(low, high) of a formula that gives one number or a range: the lab's own formulas, evaluated."""
            value = eval(formula, {"__builtins__": {}}, shape)
            return value if isinstance(value, tuple) else (value, value)

        return {"launches": tuple(round(n) for n in span(self.launches)), "syncs": round(span(self.syncs)[0]),
                "extra_mb": tuple(n / 2**20 for n in span(self.extra_bytes))}


def padded_rows(pairs: int, experts: int) -> int:
    return moe_kernels.padded_length(pairs, experts, moe_kernels.choose_block_m(pairs, experts))


def contradicted_claims(row: dict) -> list[str]:
    """The claims a GPU row's measurements contradict. Syncs must match (within 1%, where they follow the
    routing); launches must fall in the claimed range give or take 10% (a library kernel more or less); extra memory
    in its range give or take 30% or 8 MiB (the caching allocator rounds sizes up)."""
    wrong = []
    low, high = row["launches_claimed"]
    if not low * 0.9 - 1 <= row["launches_measured"] <= high * 1.1 + 1:
        wrong.append("launches")
    if abs(row["syncs_measured"] - row["syncs_claimed"]) > 0.01 * row["syncs_claimed"]:
        wrong.append("syncs")
    low, high = row["extra_mb_claimed"]
    if not min(low * 0.7, low - 8) <= row["extra_mb"] <= max(high * 1.3, high + 8):
        wrong.append("extra memory")
    return wrong


class MoELevel:
    level: ClassVar[int | str]
    name: ClassVar[str]
    summary: ClassVar[str]  # one line for `aisp bench list`
    claims: ClassVar[Claims]  # the lesson's counts, next to its docstring
    needs_cuda: ClassVar[bool] = False
    # Its only CPU form is Triton's interpreter (its GEMMs are Triton kernels): on the CPU it is checked, not timed.
    interpreter_only: ClassVar[bool] = False
    keeps_buffers: ClassVar[bool] = False  # memory it holds between calls (a CUDA graph's pool) counts as extra
    # Its GEMMs take FP8 operands: its weights count one byte each, its % of roofline is against the FP8 matmul
    # ceiling, and its row splits the error in two (the check against `reference()`, and `quant_err`).
    fp8: ClassVar[bool] = False

    def __init__(self, config: MoEConfig, weights: MoEWeights):
        self.config = config
        self.weights = weights
        self.device = weights.device
        self.notes: list[str] = []  # what the row's `note` should tell (fallbacks, ...)

    @classmethod
    def skip_reason(cls, config: MoEConfig, num_tokens: int) -> str | None:
        """Why this level should not be run at this size (too slow to be worth the sweep's time), or None."""
        return None

    def prepare(self) -> None:
        """One-time work before the first forward (weight re-layout). Not timed."""

    def after_first_call(self) -> str:
        """What the first call chose that the row should say (autotuned tiles, say); the base times that call
        (compilation, autotuning, graph capture) into the row's first_call_ms."""
        return ""

    def forward(
        self, tokens_TH: torch.Tensor, routing_weights_TK: torch.Tensor, expert_ids_TK: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    def timed_call(self, inputs: Inputs) -> Callable[[], torch.Tensor]:
        """What the clock times, and the counts count: one forward on the timing inputs. (A level that replays a CUDA
        graph times the replay alone, its inputs written into the graph's buffers once: level 5's `Graphed`.)"""
        return functools.partial(self.forward, *inputs.as_args())

    def reference(self, tokens_TH: torch.Tensor, routing_weights_TK: torch.Tensor,
                  expert_ids_TK: torch.Tensor) -> torch.Tensor:
        """The fp32 result this level's output is checked against: the layer's reference. A quantized level
        overrides it with the same reference computed on its quantized values, so that the check measures the
        kernels, and the base reports the quantization's own error beside it (`quant_err`)."""
        return reference_forward(tokens_TH, self.weights, routing_weights_TK, expert_ids_TK)

    def add_shared_experts(self, out_TH: torch.Tensor, tokens_TH: torch.Tensor) -> torch.Tensor:
        """out_TH plus the config's shared experts, run as a separate dense MLP (not fused with the routed
        experts; level 7 fuses them instead). Without shared experts it returns out_TH untouched, at no cost."""
        if self.config.num_shared_experts:
            with stage("shared experts"):
                out_TH += shared_experts_forward(tokens_TH, self.weights)
        return out_TH


# ---------------------------------------------------------------------------------------------------------------
# Devices and inputs
# ---------------------------------------------------------------------------------------------------------------
def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cuda", "cpu"):
        raise ConfigError(f"unknown device {name!r}; choose auto, cuda or cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but PyTorch sees no CUDA GPU here")
    return torch.device(name)


def device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@dataclass
class Inputs:
    tokens_TH: torch.Tensor
    routing_weights_TK: torch.Tensor
    expert_ids_TK: torch.Tensor
    router_logits_TE: torch.Tensor  # what the router read (moe_model.router_logits), kept to time the router
    dropped_tokens: int = 0  # pairs the router dropped (weight 0), e.g. over the switch router's capacity

    def as_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.tokens_TH, self.routing_weights_TK, self.expert_ids_TK


def input_seed(config: MoEConfig, num_tokens: int, purpose: str) -> int:
    """Fixed per (config seed, T, purpose) so runs repeat, yet the check and the timing draw different tokens."""
    return config.seed * 1_000_003 + zlib.crc32(f"{purpose}:{num_tokens}".encode())


def make_inputs(
    config: MoEConfig, weights: MoEWeights, num_tokens: int, seed: int, traffic: Traffic = Traffic()
) -> Inputs:
    """Unit-variance random tokens, routed by the config's router from the logits the traffic shape makes
    (moe_model.router_logits: the router's own for uniform traffic)."""
    generator = torch.Generator(device=weights.device).manual_seed(seed)
    tokens_TH = torch.randn(
        (num_tokens, config.hidden), generator=generator, device=weights.device, dtype=torch.float32
    ).to(config.torch_dtype)
    logits_TE = router_logits(tokens_TH, weights.router_HE, traffic, generator)
    routing = make_router(config)(logits_TE, config.top_k)
    return Inputs(tokens_TH, routing.routing_weights_TK.to(config.torch_dtype), routing.expert_ids_TK,
                  logits_TE, routing.dropped_tokens)


# ---------------------------------------------------------------------------------------------------------------
# The reference check
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class CheckResult:
    rel_err: float
    passed: bool
    message: str


def compare_to_reference(out_TH: torch.Tensor, ref_TH: torch.Tensor, tolerance: float) -> CheckResult:
    """‖out − ref‖ / ‖ref‖ against the tolerance; on failure, say how many elements are off, where, and by how much."""
    if out_TH.shape != ref_TH.shape:
        return CheckResult(math.nan, False, f"output shape {tuple(out_TH.shape)}, expected {tuple(ref_TH.shape)}")
    diff = out_TH.float() - ref_TH
    rel_err = (diff.norm() / ref_TH.norm().clamp_min(1e-30)).item()
    if math.isfinite(rel_err) and rel_err < tolerance:
        return CheckResult(rel_err, True, "")
    # An element is "off" when its error is large against the typical output magnitude.
    ref_rms = ref_TH.norm().item() / math.sqrt(max(ref_TH.numel(), 1))
    bad = ~torch.isfinite(diff) | (diff.abs() > 4 * tolerance * ref_rms)
    positions = [tuple(p) for p in torch.nonzero(bad)[:3].tolist()]
    finite = diff[torch.isfinite(diff)]
    max_err = finite.abs().max().item() if finite.numel() else math.nan
    message = (
        f"rel. error {rel_err:.3g} ≥ {tolerance:g}: {int(bad.sum())} of {bad.numel()} elements off, "
        f"first at {positions}, max abs error {max_err:.3g}"
    )
    return CheckResult(rel_err, False, message)


# ---------------------------------------------------------------------------------------------------------------
# Timing, memory and the roofline
# ---------------------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


GPU_WARM_UP_S = 0.25  # a GPU's least warm-up, in seconds of back-to-back calls
MIN_TIMED_CALLS = 5  # a row's median and p20/p80 come from at least this many timed calls


def warm_up(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int,
            budget_s: float, least_s: float | None = None,
            least_calls: int = MIN_TIMED_CALLS) -> tuple[int, float]:
    """Call fn `warmup` times (at least once), and for at least `least_s` (on a GPU GPU_WARM_UP_S unless given); return
    (how many timed calls fit, ms per call): `repeats`, fewer (never under `least_calls`) when the calls are slow
    enough that `repeats` of them would pass `budget_s`. A GPU's first tenth of a second of calls can run slow: an H100
    read deepseek-v3 at one token in 360-370 µs for its first 40 ms of timed calls and 317-325 from 0.1 s on, for levels
    8, 9 and 10 alike (NOTES.md); the timed calls are the sustained rate's. Processes whose calls must match in number
    (each of the EP level's forwards is a collective) pass least_s=0: a clock would not stop them together."""
    if least_s is None:
        least_s = GPU_WARM_UP_S if device.type == "cuda" else 0.0
    start = time.perf_counter()
    calls = 0
    while calls < max(warmup, 1) or time.perf_counter() - start < least_s:
        fn()
        calls += 1
        if calls % 20 == 0:
            synchronize(device)  # the launch queue never fills, and the clock counts finished calls
    synchronize(device)
    estimate_s = (time.perf_counter() - start) / calls
    return max(least_calls, min(repeats, int(budget_s / max(estimate_s, 1e-6)))), estimate_s * 1e3


@functools.cache
def cache_clear_ms(device: torch.device) -> float:
    """How long do_bench's L2 clear before each timed call takes on this GPU, measured once per process: a write of
    a buffer of the same size as do_bench's (256 MB: 97 µs on an H100)."""
    flush = l2_flush_buffer(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    flush.zero_()
    start.record()
    for _ in range(10):
        flush.zero_()
    end.record()
    synchronize(device)
    return start.elapsed_time(end) / 10


def time_calls(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, budget_s: float = 3.0,
    least_calls: int = MIN_TIMED_CALLS,
) -> list[float]:
    """Milliseconds of each timed call of fn, after warm-up (`warm_up` decides how many calls fit the budget).
    On a GPU `triton.testing.do_bench` times them: a CUDA event pair around each call, the L2 cache cleared before
    each so that no call finds the previous one's weights in cache. do_bench sizes its loop in milliseconds, by its
    own estimate of a call and a clear together, so the loop asked for is that many calls and clears at the
    warm-up's estimate (do_bench may still time a few more or fewer: environment.json records how many). On the
    CPU, the host clock."""
    repeats, estimate_ms = warm_up(fn, device, warmup, repeats, budget_s, least_calls=least_calls)
    if device.type == "cuda":
        from triton.testing import do_bench

        # Sized by the calls alone, graphed one-token forwards beside the 97 µs clear got 5-16 timed calls, not 20.
        # do_bench sizes its loop by 5 calls of its own, and one host stall among them can leave it a single timed
        # call (an H100's qwen3-moe level 10 at one token: 1 call of 1225 µs, the GPU busy 2% of it, NOTES.md):
        # asked again until `least_calls` have run.
        times_ms = []
        for _ in range(4):
            times_ms += do_bench(fn, warmup=0, rep=repeats * (estimate_ms + cache_clear_ms(device)),
                                 return_mode="all")
            if len(times_ms) >= least_calls:
                break
        return times_ms
    times_ms = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times_ms.append((time.perf_counter() - begin) * 1e3)
    return times_ms


def host_issue_ms(fn: Callable[[], object], device: torch.device, gpu_ms: float) -> float:
    """The host's time to issue one call of fn on a GPU, the median over a loop of calls, as a decode loop makes
    them (about 0.1 s of the GPU's time, 20 to 1000 calls; a sync every 20, so no call waits for a full launch
    queue). do_bench clears L2 before each timed call, and the GPU's time on that (about 0.1 ms) hides a host
    slower than the GPU; back to back, the slower of the two sets the pace. Measured apart from the timed calls:
    inside do_bench's loop the same forward took the host up to half as long again (its own launches between
    calls), NOTES.md."""
    calls = max(20, min(1000, round(100 / gpu_ms)))
    issue_s = []
    synchronize(device)
    for call in range(calls):
        begin = time.perf_counter()
        fn()
        issue_s.append(time.perf_counter() - begin)
        if call % 20 == 19:
            synchronize(device)
    synchronize(device)
    return 1e3 * statistics.median(issue_s)


def sm_clock_after_load(device: torch.device) -> tuple[int, bool] | None:
    """(SM clock in MHz, whether the driver's software power cap holds it down) read by nvidia-smi right after
    the timed calls. An H100 at its 700 W cap runs back-to-back GEMMs at 1425-1500 MHz instead of 1980, 10-16%
    slower (NOTES.md), so a row says which clock its median was taken at. None off a GPU, without nvidia-smi, or
    where it cannot answer for this GPU."""
    if device.type != "cuda" or shutil.which("nvidia-smi") is None:
        return None
    gpu = f"GPU-{torch.cuda.get_device_properties(device).uuid}"  # by UUID: indices differ under CUDA_VISIBLE_DEVICES
    query = ["nvidia-smi", "-i", gpu, "--format=csv,noheader,nounits",
             "--query-gpu=clocks.sm,clocks_event_reasons.sw_power_cap"]
    try:
        result = subprocess.run(query, capture_output=True, text=True, timeout=10)
        clock, power_cap = (field.strip() for field in result.stdout.split(","))
        return int(clock), power_cap == "Active"
    except (subprocess.TimeoutExpired, ValueError):  # a hung nvidia-smi, an error, or "[N/A]": no clock, no crash
        return None


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class Counts:
    """What one forward did on the GPU, measured: the counterpart of a level's Claims."""

    launches: int  # kernels the GPU ran (torch.profiler's kernel events; a graph replay's kernels included)
    syncs: int  # times the host waited for the device (torch.cuda.set_sync_debug_mode warnings)
    extra_mb: float  # device memory beyond inputs, weights and output: a call's transient peak plus what the
    #                  level keeps between calls (a graph's private pool, static buffers)
    peak_mb: float  # everything allocated at the call's peak, weights and inputs included (not what other levels
    #                 waiting for their turn hold)
    gpu_busy_pct: float  # kernel time over the timed forward's time: under 50%, the GPU mostly waits for the host


def measure_counts(fn: Callable[[], torch.Tensor], device: torch.device, ms: float, pool_bytes: int = 0,
                   held_elsewhere: int = 0, calls: int = 3) -> Counts:
    """Kernels, syncs and memory of one forward (the mean of `calls` for the kernels). `pool_bytes`: what the
    level's CUDA graphs' private pools hold between calls, which counts as extra memory too. `held_elsewhere`:
    bytes that other levels hold meanwhile (their weight layouts, graphs and inputs), left out of the peak."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset"))]
    busy_us = sum(e.device_time for e in kernels) / calls

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchronizing" in str(w.message) for w in caught)

    gc.collect()  # nothing freed by a collection in the middle of the call
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    transient = peak - before - out.numel() * out.element_size()
    del out
    return Counts(launches=round(len(kernels) / calls), syncs=syncs, extra_mb=(max(0, transient) + pool_bytes) / 2**20,
                  peak_mb=(peak - held_elsewhere) / 2**20, gpu_busy_pct=min(100.0, 100 * busy_us / 1e3 / ms))


def graph_pool_bytes(device: torch.device) -> int:
    """What CUDA graphs' private memory pools hold on the device: the allocator's segments outside its default pool,
    (0, 0), read from its own record (torch.cuda.memory._snapshot). The growth of `memory_reserved` over the first
    call, measured before, read 0 MiB at some sizes and 3x the pool at others: segments that the inputs had pinned
    before the call were released during it (NOTES.md)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return sum(segment["total_size"] for segment in torch.cuda.memory._snapshot()["segments"]
               if segment["device"] == index and tuple(segment["segment_pool_id"]) != (0, 0))


def profile_stages(
    forward: Callable[[], object], routing: Callable[[], object], device: torch.device, calls: int
) -> dict[str, float]:
    """Mean ms per call of each stage the level marks, of `routing` (run before each forward) and of the forward
    time outside the marked stages. The markers' own cost (an event record each) is included, so the stages can
    sum to a little more than the timed forward."""
    recorder = StageRecorder(device)
    forward_spans = []
    l2_flush = l2_flush_buffer(device)
    stage.recorder = recorder
    try:
        for _ in range(calls):
            if l2_flush is not None:
                l2_flush.zero_()
            with stage("routing"):
                routing()
            begin = recorder.clock()
            forward()
            forward_spans.append((begin, recorder.clock()))
        synchronize(device)
    finally:
        stage.recorder = None
    total_ms = defaultdict(float)
    for name, begin, end in recorder.spans:
        total_ms[name] += elapsed_ms(begin, end)
    forward_ms = sum(elapsed_ms(begin, end) for begin, end in forward_spans)
    inside_ms = sum(ms for name, ms in total_ms.items() if name != "routing")
    per_call = {name: total_ms[name] / calls for name in STAGES if name in total_ms}
    per_call[OUTSIDE_STAGES] = max(0.0, forward_ms - inside_ms) / calls
    return per_call


@dataclass
class Ceilings:
    """The two rates one GPU actually reaches, measured with the same timer as the levels."""

    matmul_tflops: float  # a large bf16 matmul
    copy_gbps: float  # a large device-to-device copy, bytes read plus bytes written
    fp8_matmul_tflops: float | None = None  # a large FP8 matmul with rowwise scales; None where torch has none

    def flops_bound(self, flops: float, nbytes: float) -> bool:
        """Whether a forward of these FLOPs and bytes is under the matmul roof rather than the copy roof (bf16)."""
        return flops / (self.matmul_tflops * 1e12) >= nbytes / (self.copy_gbps * 1e9)

    def floor_ms(self, flops: float, nbytes: float, fp8: bool = False) -> float | None:
        """The time a forward of these FLOPs and bytes cannot beat here; None for FP8 GEMMs with no FP8 ceiling."""
        matmul_tflops = self.fp8_matmul_tflops if fp8 else self.matmul_tflops
        if matmul_tflops is None:
            return None
        return max(flops / (matmul_tflops * 1e12), nbytes / (self.copy_gbps * 1e9)) * 1e3


def measure_ceilings(device: torch.device) -> Ceilings | None:
    if device.type != "cuda":
        return None
    size = 8192
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn((size, size), generator=generator, device=device, dtype=torch.bfloat16)
    b = torch.randn((size, size), generator=generator, device=device, dtype=torch.bfloat16)
    matmul_ms = statistics.median(time_calls(lambda: a @ b, device, warmup=5, repeats=30))
    fp8_matmul_ms = None
    if hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(device) >= (8, 9):  # FP8 tensor cores
        # e4m3 operands with one scale per row of a and per column of b (rowwise: what level 10 applies), the
        # second operand column-major as cuBLAS's FP8 GEMM requires.
        a8, a_scales = quantize_fp8(a)
        b8, b_scales = quantize_fp8(b.T)
        try:
            fp8_matmul_ms = statistics.median(time_calls(
                lambda: torch._scaled_mm(a8, b8.T, scale_a=a_scales, scale_b=b_scales.T, out_dtype=torch.bfloat16),
                device, warmup=5, repeats=30))
        except RuntimeError:  # torch builds that take rowwise scales on sm_90 only: no FP8 ceiling, FP8 rows no %
            pass
        del a8, b8
    del a, b
    src = torch.randn((2**28,), generator=generator, device=device, dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = statistics.median(time_calls(lambda: dst.copy_(src), device, warmup=5, repeats=30))
    del src, dst
    return Ceilings(
        matmul_tflops=2 * size**3 / (matmul_ms * 1e-3) / 1e12,
        copy_gbps=2 * 2**30 / (copy_ms * 1e-3) / 1e9,
        fp8_matmul_tflops=2 * size**3 / (fp8_matmul_ms * 1e-3) / 1e12 if fp8_matmul_ms else None,
    )


# ---------------------------------------------------------------------------------------------------------------
# One measurement → one row
# ---------------------------------------------------------------------------------------------------------------
def base_row(
    level_cls: type[MoELevel], config: MoEConfig, num_tokens: int, device: torch.device, traffic: Traffic
) -> ResultRow:
    """The row of this case before anything is measured: status ok until something says otherwise."""
    return ResultRow(target=TARGET, level=level_cls.level, level_name=level_cls.name, preset=config.name,
                     hidden=config.hidden, intermediate=config.intermediate, experts=config.num_experts,
                     top_k=config.top_k, shared_experts=config.num_shared_experts, tokens=num_tokens,
                     traffic=traffic.label, router=config.router, device=device_label(device),
                     device_type=device.type, dtype=config.dtype)


def out_of_host_memory(error: BaseException) -> bool:
    """Whether `error` is the CPU allocator's out-of-memory, which torch raises as a plain RuntimeError."""
    return isinstance(error, RuntimeError) and ("can't allocate memory" in str(error)
                                                or "not enough memory" in str(error))


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


TIMING_ROUNDS = 2  # a case's levels are timed in turn: in level order, then in reverse (see benchmark_case)
LEVEL_STEPS = TIMING_ROUNDS + 2  # a level's steps in a case: its check, its turns of timed calls, its counts


@dataclass(frozen=True)
class Settings:
    """How every row of a run is measured: the run's options, the same for each case."""

    ceilings: Ceilings | None = None
    warmup: int = 3
    repeats: int = 50
    time_budget_s: float = 3.0
    profile: bool = False


@dataclass
class Waiting:
    """A level set up and checked, its timing inputs drawn: waiting for its turns on the clock."""

    row: ResultRow
    level: MoELevel
    inputs: Inputs
    call: Callable[[], torch.Tensor]  # the level's `timed_call` on those inputs
    held_bytes: int  # device memory it holds while it waits: its weight layouts, graph and timing inputs
    pool_bytes: int  # of which its CUDA graphs' private pools (for a level that `keeps_buffers`)
    times_ms: list[float] = dataclasses.field(default_factory=list)
    clock: tuple[int, bool] | None = None  # sm_clock_after_load() after its last turn

    def take_turn(self, device: torch.device, settings: Settings) -> None:
        """One round's share of the row's timed calls, warm-up first, and the clock they left the GPU at."""
        with moe_kernels.torch_ops_on_cpu():
            self.times_ms += time_round(self.call, device, settings)
        self.clock = sm_clock_after_load(device)


def time_round(call: Callable[[], object], device: torch.device, settings: Settings) -> list[float]:
    """One round's share of a turn's timed calls, warm-up first."""
    return time_calls(call, device, settings.warmup, math.ceil(settings.repeats / TIMING_ROUNDS),
                      settings.time_budget_s / TIMING_ROUNDS, least_calls=math.ceil(MIN_TIMED_CALLS / TIMING_ROUNDS))


@dataclass
class DenseGemms:
    """The yardstick of a case under the matmul roof: cuBLAS on the layer's FLOPs with none of MoE's work. All
    N = T·(K + S) rows go as one matrix through two dense GEMMs, [N, H] @ [H, 2I] and [N, I] @ [I, H] (no routing,
    gather, padding, SiLU or sum over K), timed in turn with the case's levels, so that the card's heat weighs on
    it as on them: an H100 under that load ran mixtral's two at 684 TF/s where an 8192³ matmul on the cool card
    had read 791 (NOTES.md). Its operands are drawn for each turn and freed after it (at deepseek-v3's 32768 tokens
    they are 12 GB), so the levels keep their room; where a turn fails (no room beside them), the case has no
    yardstick."""

    config: MoEConfig
    num_tokens: int
    times_ms: list[float] = dataclasses.field(default_factory=list)
    failed: bool = False

    def take_turn(self, device: torch.device, settings: Settings) -> None:
        if self.failed:
            return
        try:
            self.times_ms += self.draw_and_time_round(device, settings)
        except Exception:  # out of memory, or cuBLAS without room for its workspace: no yardstick, the case goes on
            if debugging():
                raise
            self.failed = True
        release_memory(device)  # the round's operands are gone: the levels get their room back

    def draw_and_time_round(self, device: torch.device, settings: Settings) -> list[float]:
        """This round's operands, drawn here so that they are freed on return, and its timed calls."""
        H, I, dtype = self.config.hidden, self.config.intermediate, self.config.torch_dtype
        rows = self.num_tokens * (self.config.top_k + self.config.num_shared_experts)
        generator = torch.Generator(device=device).manual_seed(0)
        tokens_NH, w13_H2I, hidden_NI, w_down_IH = (
            torch.randn(shape, generator=generator, device=device, dtype=dtype)
            for shape in ((rows, H), (H, 2 * I), (rows, I), (I, H)))
        gate_up_N2I = torch.empty((rows, 2 * I), device=device, dtype=dtype)
        y_NH = torch.empty((rows, H), device=device, dtype=dtype)

        def call() -> None:
            torch.matmul(tokens_NH, w13_H2I, out=gate_up_N2I)  # 2·N·H·2I FLOPs
            torch.matmul(hidden_NI, w_down_IH, out=y_NH)  # 2·N·I·H FLOPs

        return time_round(call, device, settings)

    def median_ms(self) -> float | None:
        return None if self.failed or not self.times_ms else statistics.median(self.times_ms)


def benchmark(level_cls: type[MoELevel], config: MoEConfig, num_tokens: int, device: torch.device, *,
              weights: MoEWeights | None = None, traffic: Traffic = Traffic(), **settings) -> dict:
    """One level at one size: `benchmark_case` with a single level. `settings` are Settings' fields."""
    return benchmark_case([level_cls], config, num_tokens, device, weights=weights, traffic=traffic,
                          settings=Settings(**settings))[0]


def benchmark_case(level_classes: list[type[MoELevel]], config: MoEConfig, num_tokens: int, device: torch.device,
                   *, weights: MoEWeights | None = None, traffic: Traffic = Traffic(),
                   settings: Settings = Settings(), status: Callable[[str], None] | None = None,
                   done: Callable[[float], None] | None = None) -> list[dict]:
    """Check each level at one size, then time them in turn (and with `profile`, time their stages too). Always
    returns one row per level, in their order (ResultRow.to_json(), as rows.jsonl holds them); never raises for a
    level's failure. `status` hears what is being done, for a progress line, and `done` each share of a row done
    (1/LEVEL_STEPS a step: its check, each turn of timed calls, its counts; the whole row where it ends at its
    check), for a progress bar: the rows themselves come only once every level of the case has been timed.

    Why in turn: a GPU under its power cap runs slower as it heats, and timed one after the other each level would
    meet the card the levels before it had heated. On an H100, sweeps that timed one level after the other read
    level 8 (level 7's kernels, graphed) 5-9% slower than level 7 at mixtral's 16384 tokens; timed in turn, 2.5%: the
    copy of its inputs into the graph, and the card's spread (NOTES.md).
    So the levels are set up and checked first, then timed in TIMING_ROUNDS rounds, in level order and then in
    reverse: a card that heats steadily through the case weighs on each level alike. On a GPU a level joins those
    waiting only while the device has room for twice the weights (another copy of them and the forward's buffers);
    past that, and where a level runs out of memory beside others, the levels waiting are timed first.

    On the CPU the row times what a CPU user would run: the elementwise Triton kernels as torch ops
    (`moe_kernels.torch_ops_on_cpu`); the check still runs them in Triton's interpreter. A level whose GEMMs
    exist only as Triton kernels (`interpreter_only`) is checked there and not timed: status `checked`."""
    weights = weights if weights is not None else init_weights(config, device)
    status = status or (lambda message: None)
    done = done or (lambda share: None)
    rows: list[ResultRow] = []
    waiting: list[Waiting] = []

    def time_waiting() -> None:
        time_in_turn(waiting, config, num_tokens, device, settings, status, done)
        waiting.clear()  # the last reference to each: their memory goes (a level and its graph hold a cycle,
        release_memory(device)  # which only the collector here frees)

    def set_up_beside_waiting(level_cls: type[MoELevel]) -> ResultRow:
        """Set the level up; unless its row ends there, it joins the levels waiting (the only reference to it, so
        that its memory goes when they have been timed)."""
        status(f"checking level {level_cls.level} {level_cls.name}")
        row = base_row(level_cls, config, num_tokens, device, traffic)
        turn = set_up(row, level_cls, config, num_tokens, device, weights, traffic)
        if row.status == "oom" and waiting:  # no room beside the levels waiting after all: time them, then alone
            time_waiting()
            return set_up_beside_waiting(level_cls)
        if turn is not None:
            waiting.append(turn)
        done(1 / LEVEL_STEPS if turn is not None else 1)
        return row

    for level_cls in level_classes:
        if waiting and not room_for_another(device, weights):
            time_waiting()
        rows.append(set_up_beside_waiting(level_cls))
    time_waiting()
    return [row.to_json() for row in rows]


def time_in_turn(waiting: list[Waiting], config: MoEConfig, num_tokens: int, device: torch.device,
                 settings: Settings, status: Callable[[str], None], done: Callable[[float], None]) -> None:
    """Time the waiting levels in TIMING_ROUNDS rounds, in order and then in reverse, and fill in their rows. On a
    GPU, where the case is under the matmul roof, cuBLAS's dense GEMMs on its FLOPs take a turn first in each round
    (`DenseGemms`), and each row records their time."""
    dense = DenseGemms(config, num_tokens) if waiting and settings.ceilings and settings.ceilings.flops_bound(
        flop_count(config, num_tokens), min_bytes(config, num_tokens, config.num_experts)) else None
    for round_ in range(TIMING_ROUNDS):
        if dense:
            status(f"timing cuBLAS's dense GEMMs on these FLOPs, round {round_ + 1} of {TIMING_ROUNDS}")
            dense.take_turn(device, settings)
        for turn in waiting if round_ % 2 == 0 else waiting[::-1]:
            status(f"timing level {turn.row.level}, round {round_ + 1} of {TIMING_ROUNDS}")
            timed(turn.row, lambda turn=turn: turn.take_turn(device, settings))
            done(1 / LEVEL_STEPS)
    for turn in waiting:
        if dense and turn.row.status == "ok":
            turn.row.dense_gemm_ms = dense.median_ms()
        status(f"counting level {turn.row.level}'s launches, syncs and memory" if device.type == "cuda" else
               f"summing up level {turn.row.level}'s times")
        held_elsewhere = sum(other.held_bytes for other in waiting if other is not turn)
        timed(turn.row, lambda turn=turn: finish(turn, config, num_tokens, device, settings, held_elsewhere))
        add_level_notes(turn.row, turn.level)
        done(1 / LEVEL_STEPS)


def add_level_notes(row: ResultRow, level: MoELevel) -> None:
    """What the level asked its row to tell (fallbacks, ...), after what the row says already."""
    row.note = "; ".join(filter(None, [row.note, *level.notes]))


def room_for_another(device: torch.device, weights: MoEWeights) -> bool:
    """Whether another level may be set up beside those waiting: on a GPU, free memory for twice the weights."""
    if device.type != "cuda":
        return True
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return free_bytes >= 2 * weights.nbytes()


@contextlib.contextmanager
def failure_ends_row(row: ResultRow):
    """A level's failure inside ends its row (status and note) instead of the run: a broken level is a row that
    says so, and the sweep goes on."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        row.update(status="oom", note=f"CUDA out of memory at {row.tokens} tokens")
    except LevelUnavailable as reason:
        row.update(status="skipped", note=str(reason))
    except Exception as error:
        if debugging():  # `aisp --debug`, AISP_DEBUG=1: the level's own traceback instead
            raise
        if out_of_host_memory(error):
            row.update(status="oom", note=f"out of host memory at {row.tokens} tokens")
        else:
            row.update(status="error", note=error_line(error))


def timed(row: ResultRow, step: Callable[[], object]) -> None:
    """Run one step of a waiting level's measurement (failure_ends_row). A row that has already failed takes no
    further steps."""
    if row.status != "ok":
        return
    with failure_ends_row(row):
        step()


def set_up(row: ResultRow, level_cls: type[MoELevel], config: MoEConfig, num_tokens: int, device: torch.device,
           weights: MoEWeights, traffic: Traffic) -> Waiting | None:
    """Make the level, check its first call against the reference, and draw its timing inputs. Returns the level
    waiting to be timed, or None where `row` already says why it ends here (skipped, wrong, checked, oom, error)."""
    if level_cls.needs_cuda and device.type != "cuda":
        row.update(status="skipped", note="needs a CUDA GPU")
        return None
    if reason := level_cls.skip_reason(config, num_tokens):
        row.update(status="skipped", note=reason)
        return None
    if claims := getattr(level_cls, "claims", None):
        claimed = claims.evaluate(config, num_tokens)
        row.update(launches_claimed=claimed["launches"], syncs_claimed=claimed["syncs"],
                   extra_mb_claimed=claimed["extra_mb"])
    level = None
    on_gpu = device.type == "cuda"
    # What a level holds is what it adds to the allocated memory, counted without garbage: reference cycles of
    # earlier work (a level and its graph hold one) that only the collector frees, and that a graph capture's own
    # collection may free halfway through a set-up. Counted with it, make bench's level 9 at journey 32768 read
    # -1.1 MiB at its peak on an H100 (its set-up freed 517 MiB that level 7's had held; NOTES.md). The CPU's
    # rows count no memory.
    if on_gpu:
        gc.collect()
    allocated_before = torch.cuda.memory_allocated(device) if on_gpu else 0
    pools_before = graph_pool_bytes(device) if on_gpu and level_cls.keeps_buffers else 0
    with failure_ends_row(row):
        level = level_cls(config, weights)
        level.prepare()
        timing_inputs = make_inputs(config, weights, num_tokens, input_seed(config, num_tokens, "timing"), traffic)
        check_inputs = make_inputs(config, weights, num_tokens, input_seed(config, num_tokens, "check"), traffic)

        begin = time.perf_counter()  # the first call: compilation, autotuning and graph capture happen here
        out_TH = level.forward(*check_inputs.as_args())
        synchronize(device)
        row.first_call_ms = (time.perf_counter() - begin) * 1e3
        check = compare_to_reference(out_TH, level.reference(*check_inputs.as_args()), config.tolerance)
        if level_cls.fp8:  # the quantization's own error: against the layer's reference, as the other levels are
            layer_ref_TH = reference_forward(check_inputs.tokens_TH, weights, check_inputs.routing_weights_TK,
                                             check_inputs.expert_ids_TK)
            row.quant_err = compare_to_reference(out_TH, layer_ref_TH, math.inf).rel_err
            del layer_ref_TH
        del out_TH, check_inputs  # what waits for its turn holds only what the timing needs
        row.rel_err = check.rel_err
        if not check.passed:
            row.update(status="error", note=f"wrong result: {check.message}")
        else:
            row.note = level.after_first_call()
            row.update(**load_metrics(timing_inputs.expert_ids_TK, config.num_experts),
                       dropped_tokens=timing_inputs.dropped_tokens)
            if level_cls.interpreter_only and not on_gpu:
                row.update(status="checked", note="checked in Triton's interpreter, not timed: its GEMMs are Triton "
                                                  "kernels, and the interpreter's speed says nothing about a CPU's")
            else:
                call = level.timed_call(timing_inputs)
                if on_gpu:
                    gc.collect()
                held_bytes = torch.cuda.memory_allocated(device) - allocated_before if on_gpu else 0
                pool_bytes = graph_pool_bytes(device) - pools_before if on_gpu and level_cls.keeps_buffers else 0
                return Waiting(row, level, timing_inputs, call, held_bytes, pool_bytes)
    if level is not None:
        add_level_notes(row, level)
    del level
    release_memory(device)
    return None


def finish(turn: Waiting, config: MoEConfig, num_tokens: int, device: torch.device, settings: Settings,
           held_elsewhere: int) -> None:
    """Fill in a timed level's row: its rates from the timed calls, and on a GPU its counts against its claims
    (`held_elsewhere`: what the other levels waiting hold, which its peak memory leaves out)."""
    row, times_ms, call = turn.row, turn.times_ms, turn.call
    if turn.clock:
        row.sm_clock_mhz, row.power_capped = turn.clock
    ms = statistics.median(times_ms)
    flops = flop_count(config, num_tokens)
    nbytes = min_bytes(config, num_tokens, int(turn.inputs.expert_ids_TK.unique().numel()),
                       weight_bytes=1 if turn.level.fp8 else None)
    row.update(
        ms=ms,
        ms_p20=quantile(times_ms, 0.2),
        ms_p80=quantile(times_ms, 0.8),
        repeats=len(times_ms),
        tokens_per_s=num_tokens / (ms * 1e-3),
        tflops=flops / (ms * 1e-3) / 1e12,
        gbps=nbytes / (ms * 1e-3) / 1e9,
        pct_roofline=(100 * floor_ms / ms if settings.ceilings
                      and (floor_ms := settings.ceilings.floor_ms(flops, nbytes, turn.level.fp8)) else None),
    )
    if device.type == "cuda":
        counts = measure_counts(call, device, ms, turn.pool_bytes, held_elsewhere)
        row.update(launches_measured=counts.launches, syncs_measured=counts.syncs, extra_mb=counts.extra_mb,
                   peak_mb=counts.peak_mb, peak_garbage_free=True, gpu_busy_pct=counts.gpu_busy_pct,
                   host_ms=host_issue_ms(call, device, ms) if counts.syncs == 0 else None)
        row.host_bound = row.is_host_bound()
        if row.launches_claimed is not None:
            row.claims_contradicted = contradicted_claims(row.to_json())
    if settings.profile:
        router = make_router(config)
        tokens_TH, logits_TE = turn.inputs.tokens_TH, turn.inputs.router_logits_TE

        def routing() -> None:  # the router's projection and its choice (skewed traffic replaces the logits)
            tokens_TH @ turn.level.weights.router_HE
            router(logits_TE, config.top_k)

        row.profile_calls = max(3, min(20, len(times_ms)))
        with moe_kernels.torch_ops_on_cpu():
            row.stage_ms = profile_stages(call, routing, device, row.profile_calls)


# ---------------------------------------------------------------------------------------------------------------
# Printing rows, and the entry point of every level script
# ---------------------------------------------------------------------------------------------------------------
def row_case(row: dict) -> str:
    """The case a row belongs to, as the console and the report title it: the preset, then the traffic and the
    router where they are not the default."""
    extras = [row["traffic"] if row.get("traffic", "uniform") != "uniform" else "",
              f"{row['router']} router" if row.get("router", "softmax-topk") != "softmax-topk" else ""]
    return f"{', '.join([row['preset'], *filter(None, extras)])} ({shape_label(row)})"


def rows_table(rows: list[dict], title: str = "", width: int | None = None):
    """The rows for a terminal: a table per case, one line per row at 80 columns or in a pipe (the level's name is
    cut where the width runs out, never a number, and nothing is folded), each row's notes as a numbered list below
    its table. Columns with nothing in them (a CPU run's roofline and memory) are left out; the EP rows show their
    world size W and tokens per rank ("-" in a level's row beside them)."""
    from rich import box
    from rich.console import Console, Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from cli.numbers import fmt

    width = width or Console().width  # the terminal's, or 80 in a pipe

    columns = {"level": lambda r: f"{r['level']} {r['level_name']}",
               "W": lambda r: str(r.get("world_size") or "-"),
               "T/rank": lambda r: str(r.get("tokens_per_rank") or "-"),
               "T": lambda r: str(r["tokens"]),
               "ms": lambda r: fmt(r["ms"]),
               "TFLOP/s": lambda r: fmt(r["tflops"]),
               "% roof": lambda r: fmt(r["pct_roofline"]),
               "MiB": lambda r: fmt(r["peak_mb"]),
               "rel err": lambda r: "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}",
               "quant err": lambda r: "-" if r.get("quant_err") is None else f"{r['quant_err']:.1e}",
               "status": lambda r: r["status"]}
    needs = {"W": "world_size", "T/rank": "tokens_per_rank", "% roof": "pct_roofline", "MiB": "peak_mb",
             "quant err": "quant_err"}
    notes = list(dict.fromkeys(row["note"] for row in rows if row.get("note")))
    parts = [Text(title)] if title else []
    for case in dict.fromkeys(map(row_case, rows)):
        part = [row for row in rows if row_case(row) == case]
        shown = [c for c in columns if c not in needs or any(row.get(needs[c]) is not None for row in part)]
        parts.append(Text(f"\n{case}", style="bold"))
        cells = [[columns[c](row) for c in shown] + [f"[{notes.index(row['note']) + 1}]" if row.get("note") else ""]
                 for row in part]
        # Each column as wide as its header and cells; where that is too wide, the numbers' columns as wide as their
        # cells (the header is cut instead) and the level's name gets what is left.
        headers = [*shown, "note"]
        widths = [max(len(header), *(len(line[i]) for line in cells)) for i, header in enumerate(headers)]
        if sum(widths) + 2 * len(widths) > width:
            widths[1:] = [max(len(line[i]) for line in cells) for i in range(1, len(headers))]
            widths[0] = max(8, min(widths[0], width - sum(widths[1:]) - 2 * len(widths)))
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for column, column_width in zip(headers, widths):
            table.add_column(column, no_wrap=True, overflow="ellipsis", width=max(column_width, 1),
                             justify="left" if column in ("level", "status") else "right")
        for line in cells:
            table.add_row(*map(escape, line))
        parts.append(table)
    if notes:
        parts.append(Text("\n".join(f"[{i}] {note}" for i, note in enumerate(notes, 1))))
    return Group(*parts)


@contextlib.contextmanager
def interrupted_in_one_line(prog: str, quiet: bool = False):
    """A level script stopped by Ctrl-C: one line on stderr (none where `quiet`: the expert-parallel script's ranks
    other than 0) and exit code 130 (128 + SIGINT), as `aisp bench run` ends, not a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        if not quiet:
            print(f"{prog}: interrupted (SIGINT); no rows printed", file=sys.stderr)
        sys.exit(130)


def print_stages(rows: list[dict]) -> None:
    """A level script's --profile: where each timed row's time went, stage by stage, as the run's summary.md shows
    it (`report.stage_table`)."""
    from cli import report

    df = report.frame(rows)
    for case in dict.fromkeys(df["case"]):
        part = df[df["case"] == case]
        for tokens in sorted(report.profiled(part)["tokens"].unique()):
            print(f"\n{case} at {tokens} tokens: ms per call in each stage, and its share (the mean of the profiled "
                  f"calls; \"forward\" leaves out routing, \"timed\" is the unprofiled median)\n"
                  f"{report.stage_table(part, tokens)}")


def run_level_script(level_cls: type[MoELevel]) -> None:
    """`python levelN_*.py [options]`: check, time and print this level's rows. The options are `aisp bench run`'s
    (the same parsers, in cli/options.py), less the sweep over levels; `--help` prints the level's lesson."""
    from rich.console import Console

    from cli.options import (CAPACITY_FACTOR, ROUTER, UsageError, configs_for, refuse, script_cases, script_parser,
                             use_threads)

    parser = script_parser(Path(sys.argv[0]).name, sys.modules[level_cls.__module__].__doc__)
    parser.add_argument("--router", default=ROUTER, help="softmax-topk, sigmoid-bias, switch or expert-choice")
    parser.add_argument("--capacity-factor", type=float, default=CAPACITY_FACTOR,
                        help="switch and expert-choice routers")
    parser.add_argument("--profile", action="store_true", help="also time the stages of the forward")
    args = parser.parse_args()
    try:
        device = resolve_device(args.device)
        cases = script_cases(args, device.type)
        configs = configs_for(args.preset or cases.defaults.preset, args.router, args.capacity_factor)
    except (UsageError, ConfigError) as error:
        refuse(parser.prog, error)
    use_threads(cases.defaults)
    rows = []
    with interrupted_in_one_line(parser.prog):
        ceilings = measure_ceilings(device)
        for config in configs:
            weights = init_weights(config, device)
            rows += [benchmark(level_cls, config, num_tokens, device, weights=weights, traffic=traffic,
                               ceilings=ceilings, warmup=cases.warmup, repeats=cases.repeats,
                               time_budget_s=cases.defaults.time_budget_s, profile=args.profile)
                     for traffic in cases.traffics for num_tokens in cases.token_counts]
            del weights
            release_memory(device)
    Console().print(rows_table(rows, title=f"level {level_cls.level} {level_cls.name} on {device_label(device)}"))
    if args.profile:
        print_stages(rows)
    failed = [row for row in rows if row["status"] not in ("ok", "oom", "skipped", "checked")]
    if failed:  # the first failure's note, as one line where errors go
        print(f"{parser.prog}: {len(failed)} of {len(rows)} rows failed; the first: {failed[0]['note']}",
              file=sys.stderr)
    sys.exit(1 if failed else 0)
