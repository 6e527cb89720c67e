"""Every level against the fp32 reference on the CPU, on the awkward cases."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_config

import moe_benchmark
from moe_benchmark import compare_to_reference, make_inputs
from moe_model import Traffic, init_weights, reference_forward

REPO = Path(__file__).resolve().parents[1]
LEVELS = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "peer"]
# No CPU kernels: tests/test_fp8.py checks torch._scaled_grouped_mm's peer with an emulation, and
# tests/test_peer_matmul_ogs.py the matmul_ogs peer's glue with one of triton_kernels' API.
GPU_ONLY = ["peer-fp8", "peer-ogs"]


def run_level(level_cls, config, weights, tokens_TH, routing_weights_TK, expert_ids_TK):
    level = level_cls(config, weights)
    level.prepare()
    out = level.forward(tokens_TH, routing_weights_TK, expert_ids_TK)
    check = compare_to_reference(out, level.reference(tokens_TH, routing_weights_TK, expert_ids_TK), config.tolerance)
    assert check.passed, check.message
    if level_cls.fp8:  # the kernels match their quantized values; the quantization itself costs a few percent
        layer_ref = reference_forward(tokens_TH, weights, routing_weights_TK, expert_ids_TK)
        assert 1e-3 < compare_to_reference(out, layer_ref, 1.0).rel_err < 0.1
    return out


def random_routing(num_tokens, num_experts, top_k, allowed, seed):
    """Distinct experts per token drawn from `allowed`, with random positive weights summing to one."""
    generator = torch.Generator().manual_seed(seed)
    allowed = torch.tensor(allowed)
    ids = torch.stack([allowed[torch.randperm(len(allowed), generator=generator)[:top_k]]
                       for _ in range(num_tokens)])
    weights = torch.rand((num_tokens, top_k), generator=generator) + 0.1
    return (weights / weights.sum(-1, keepdim=True)).bfloat16(), ids


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("num_tokens", [1, 37, 100])
def test_router_inputs(levels, tiny, tiny_weights, level, num_tokens):
    """T = 1, and T that is not a multiple of 8 or 16."""
    inputs = make_inputs(tiny, tiny_weights, num_tokens, seed=num_tokens)
    run_level(levels[level], tiny, tiny_weights, *inputs.as_args())


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("shape", ["zipf", "hot"])
def test_skewed_traffic(levels, tiny, tiny_weights, level, shape):
    inputs = make_inputs(tiny, tiny_weights, 41, seed=5, traffic=Traffic(shape, hot_share=0.5))
    run_level(levels[level], tiny, tiny_weights, *inputs.as_args())


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("router", ["sigmoid-bias", "switch", "expert-choice"])
def test_every_router(levels, level, router):
    config = make_config(router=router, top_k=1 if router == "switch" else 2, capacity_factor=0.8)
    weights = init_weights(config, "cpu")
    inputs = make_inputs(config, weights, 31, seed=7, traffic=Traffic("zipf"))
    if router == "switch":
        assert inputs.dropped_tokens > 0  # a capacity under the mean load must drop something
    run_level(levels[level], config, weights, *inputs.as_args())


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("num_shared", [1, 2])
def test_shared_experts(levels, level, num_shared):
    config = make_config(num_shared_experts=num_shared)
    weights = init_weights(config, "cpu")
    inputs = make_inputs(config, weights, 19, seed=num_shared)
    run_level(levels[level], config, weights, *inputs.as_args())


@pytest.mark.parametrize("level", LEVELS)
def test_uneven_routing_with_idle_experts(levels, tiny, tiny_weights, level):
    """Experts 0 and 2 get nothing; expert 3 gets every token."""
    tokens = torch.randn(29, tiny.hidden).bfloat16()
    routing_weights, _ = random_routing(29, 4, 2, [1, 3], seed=1)
    expert_ids = torch.tensor([[3, 1]] * 29)
    run_level(levels[level], tiny, tiny_weights, tokens, routing_weights, expert_ids)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("top_k", [1, 4])
def test_top_k_one_and_all(levels, level, top_k):
    config = make_config(top_k=top_k)
    weights = init_weights(config, "cpu")
    routing_weights, expert_ids = random_routing(23, 4, top_k, [0, 1, 2, 3], seed=top_k)
    tokens = torch.randn(23, config.hidden).bfloat16()
    run_level(levels[level], config, weights, tokens, routing_weights, expert_ids)


@pytest.mark.parametrize("level", ["0", "4"])
def test_fp32_meets_the_tight_tolerance(levels, level):
    config = make_config(dtype="fp32")
    weights = init_weights(config, "cpu")
    inputs = make_inputs(config, weights, 33, seed=3)
    out = run_level(levels[level], config, weights, *inputs.as_args())
    assert out.dtype == torch.float32


def test_levels_are_the_journey(levels):
    assert list(levels) == LEVELS + GPU_ONLY
    for key, cls in levels.items():
        if key.startswith("peer"):
            continue
        module = sys.modules[cls.__module__]
        assert module.__doc__ and "The idea" in module.__doc__ and "What it costs" in module.__doc__, key


# --- the base class's rows ------------------------------------------------------------------------------------
class FailingLevel(moe_benchmark.MoELevel):
    level, name, summary = 90, "fails", "raises"
    error: Exception = RuntimeError("boom")

    def forward(self, tokens_TH, routing_weights_TK, expert_ids_TK):
        raise self.error


def test_out_of_memory_becomes_a_row(tiny):
    class OutOfMemory(FailingLevel):
        error = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    row = moe_benchmark.benchmark(OutOfMemory, tiny, 16, torch.device("cpu"))
    assert row["status"] == "oom" and row["ms"] is None and "out of memory" in row["note"]


def test_error_becomes_a_row(tiny):
    row = moe_benchmark.benchmark(FailingLevel, tiny, 16, torch.device("cpu"))
    assert row["status"] == "error" and row["note"] == "RuntimeError: boom"


def test_wrong_result_is_reported_with_where(tiny):
    class OffByOne(FailingLevel):
        def forward(self, tokens_TH, routing_weights_TK, expert_ids_TK):
            out = reference_forward(tokens_TH, self.weights, routing_weights_TK, expert_ids_TK).to(tokens_TH.dtype)
            out[3, 5] += 100
            return out

    row = moe_benchmark.benchmark(OffByOne, tiny, 16, torch.device("cpu"))
    assert row["status"] == "error"
    assert "1 of 1024 elements off, first at [(3, 5)]" in row["note"]


def test_nan_never_passes():
    ref = torch.randn(4, 8)
    out = ref.clone()
    out[1, 1] = float("nan")
    assert not compare_to_reference(out, ref, 2e-2).passed


def test_cuda_only_level_is_skipped_on_cpu(tiny):
    class NeedsCuda(FailingLevel):
        needs_cuda = True

    row = moe_benchmark.benchmark(NeedsCuda, tiny, 16, torch.device("cpu"))
    assert row["status"] == "skipped" and "CUDA" in row["note"]


@pytest.mark.parametrize("level", ["7", "8"])
def test_interpreter_only_levels_are_checked_not_timed_on_cpu(levels, tiny, level):
    row = moe_benchmark.benchmark(levels[level], tiny, 21, torch.device("cpu"), warmup=1, repeats=5)
    assert row["status"] == "checked" and row["rel_err"] < 2e-2 and row["ms"] is None
    assert "interpreter" in row["note"] and row["first_call_ms"] > 0


def test_cpu_timing_runs_elementwise_kernels_as_torch_ops(levels, tiny, monkeypatch):
    """The check runs silu_mul in Triton's interpreter; the timed calls run it as torch ops."""
    import moe_kernels

    kernel_calls = []
    real_launch = moe_kernels._silu_mul_kernel.__getitem__
    monkeypatch.setattr(type(moe_kernels._silu_mul_kernel), "__getitem__",
                        lambda self, grid: kernel_calls.append(grid) or real_launch(grid))
    row = moe_benchmark.benchmark(levels["2"], tiny, 9, torch.device("cpu"), warmup=1, repeats=5)
    assert row["status"] == "ok" and row["repeats"] >= 5
    assert len(kernel_calls) == 1  # the check's one call, not the warm-up's or the timed ones


FAST_SETTINGS = moe_benchmark.Settings(warmup=1, repeats=3)


def counting_levels(names):
    """One level per name (its `level`), each computing the reference: the timing, not the layer, is under test."""
    class Named(moe_benchmark.MoELevel):
        summary = "the reference, by name"

        def forward(self, tokens_TH, routing_weights_TK, expert_ids_TK):
            return reference_forward(tokens_TH, self.weights, routing_weights_TK, expert_ids_TK).to(tokens_TH.dtype)

    return [type(f"Level{name}", (Named,), {"level": name, "name": f"level-{name}"}) for name in names]


def timed_level(call):
    """Which level a timed call is: `MoELevel.timed_call` binds the level's forward to its timing inputs."""
    return call.func.__self__.level


def test_a_case_times_its_levels_in_order_then_in_reverse(tiny, monkeypatch):
    """A GPU under its power cap slows as it heats: each level of a case is timed once in level order and once in
    reverse, so a steady heating weighs on all alike. A level that fails its check is never timed, and the rows
    come back in level order."""
    first, wrong, last = counting_levels(["a", "wrong", "b"])
    wrong.forward = lambda self, tokens_TH, *routing: tokens_TH * 0 + 1
    order = []
    monkeypatch.setattr(moe_benchmark, "time_calls",
                        lambda fn, *args, **kwargs: order.append(timed_level(fn)) or [1.0, 1.0, 1.0])
    rows = moe_benchmark.benchmark_case([first, wrong, last], tiny, 9, torch.device("cpu"))
    assert order == ["a", "b", "b", "a"]
    assert [row["level"] for row in rows] == ["a", "wrong", "b"]
    assert [row["status"] for row in rows] == ["ok", "error", "ok"] and rows[0]["repeats"] == 6


def test_a_level_out_of_memory_beside_others_is_set_up_again_alone(tiny, monkeypatch):
    """Out of memory beside the levels waiting: those are timed (and their memory freed) first, then the level is set
    up again on its own; only out of memory alone makes an `oom` row."""
    first, second = counting_levels(["a", "b"])
    prepares = []

    def prepare(self):
        prepares.append(1)
        if len(prepares) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    second.prepare = prepare
    order = []
    monkeypatch.setattr(moe_benchmark, "time_calls",
                        lambda fn, *args, **kwargs: order.append(timed_level(fn)) or [1.0, 1.0, 1.0])
    rows = moe_benchmark.benchmark_case([first, second], tiny, 9, torch.device("cpu"))
    assert order == ["a", "a", "b", "b"] and [row["status"] for row in rows] == ["ok", "ok"]


def test_a_level_is_freed_once_timed(tiny, monkeypatch):
    """Where two levels do not fit together, the first is timed and its memory freed before the second is set up:
    nothing else may keep a reference to it (deepseek-v3's levels each hold a 22.5 GB copy of the weights)."""
    import weakref

    first, second = counting_levels(["a", "b"])
    alive = []

    def prepare_in_a_cycle(self):  # as a level and its CUDA graph are: only the collector frees it
        alive.append(weakref.ref(self))
        self.itself = self

    def prepare(self):
        assert alive and alive[0]() is None, "level a is still alive"

    first.prepare, second.prepare = prepare_in_a_cycle, prepare
    monkeypatch.setattr(moe_benchmark, "room_for_another", lambda device, weights: False)
    rows = moe_benchmark.benchmark_case([first, second], tiny, 9, torch.device("cpu"), settings=FAST_SETTINGS)
    assert [row["status"] for row in rows] == ["ok", "ok"], rows[1]["note"]


def test_claims_evaluate_to_numbers(levels, tiny):
    for key, cls in levels.items():
        claimed = cls.claims.evaluate(tiny, 37)
        low, high = claimed["launches"]
        assert 0 < low <= high and claimed["syncs"] >= 0 and 0 <= claimed["extra_mb"][0] <= claimed["extra_mb"][1], key


def test_graph_pool_bytes_counts_private_pools_on_the_device_only(monkeypatch):
    """A graph level's extra memory is its graphs' private pools, read from the allocator's own record: segments of
    the default pool (0, 0) and of other devices do not count."""
    segments = [{"device": 0, "segment_pool_id": (0, 0), "total_size": 100},
                {"device": 0, "segment_pool_id": (3, 0), "total_size": 20},
                {"device": 0, "segment_pool_id": [3, 0], "total_size": 2},
                {"device": 1, "segment_pool_id": (4, 0), "total_size": 7}]
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda *args, **kwargs: {"segments": segments})
    assert moe_benchmark.graph_pool_bytes(torch.device("cuda", 0)) == 22


def test_a_gpu_row_warms_up_for_a_quarter_second_and_a_cpu_row_for_its_calls(monkeypatch):
    """On a GPU the warm-up runs at least GPU_WARM_UP_S of calls (the first tenth of a second can run slow); on
    the CPU, just the calls asked for. The device's sync is stubbed: the logic, not a GPU, is under test."""
    import time

    monkeypatch.setattr(moe_benchmark, "synchronize", lambda device: None)
    calls = []

    def forward():
        calls.append(1)
        time.sleep(0.01)

    repeats, estimate_ms = moe_benchmark.warm_up(forward, torch.device("cuda"), 3, 20, budget_s=3.0)
    assert len(calls) > 3 and len(calls) * estimate_ms / 1e3 >= moe_benchmark.GPU_WARM_UP_S
    assert repeats == 20 and 9 < estimate_ms < 30
    calls.clear()
    moe_benchmark.warm_up(forward, torch.device("cpu"), 3, 20, budget_s=3.0)
    assert len(calls) == 3
    calls.clear()  # the EP level's ranks: a count, never a clock, or their collectives would not pair up
    moe_benchmark.warm_up(forward, torch.device("cuda"), 3, 20, budget_s=3.0, least_s=0)
    assert len(calls) == 3


def test_gpu_timing_asks_do_bench_for_the_calls_and_their_clears(monkeypatch):
    """do_bench sizes its loop by a call and its L2 clear together: asked for the calls' time alone, graphed forwards
    of one token beside a 97 µs clear got 5-16 timed calls where 20 were asked. The warm-up, the clear's time and
    do_bench are stubbed: the sizing, not a GPU, is under test."""
    import triton.testing

    monkeypatch.setattr(moe_benchmark, "warm_up", lambda *args, **kwargs: (20, 0.03))
    monkeypatch.setattr(moe_benchmark, "cache_clear_ms", lambda device: 0.097)
    asked = {}
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep, return_mode: asked.update(rep=rep) or [1.0])
    moe_benchmark.time_calls(lambda: None, torch.device("cuda"), 3, 20)
    assert asked["rep"] == pytest.approx(20 * (0.03 + 0.097))


def test_gpu_timing_never_keeps_fewer_than_five_calls(monkeypatch):
    """do_bench sizes its loop by 5 calls of its own, and a host stall among them can leave it one timed call (an
    H100 timed qwen3-moe's level 10 at one token once, at 1225 µs, the GPU idle 98% of it): asked again until five
    have run."""
    import triton.testing

    monkeypatch.setattr(moe_benchmark, "warm_up", lambda *args, **kwargs: (20, 0.03))
    monkeypatch.setattr(moe_benchmark, "cache_clear_ms", lambda device: 0.097)
    answers = iter([[1225.0], [0.05, 0.05, 0.05], [0.05] * 20])
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep, return_mode: next(answers))
    times_ms = moe_benchmark.time_calls(lambda: None, torch.device("cuda"), 3, 20)
    assert times_ms == [1225.0, 0.05, 0.05, 0.05] + [0.05] * 20


def test_host_issue_time_is_a_loop_median(monkeypatch):
    """The host's time to issue a forward: the median over about 0.1 s of the GPU's time, 20 to 1000 calls."""
    import time

    monkeypatch.setattr(moe_benchmark, "synchronize", lambda device: None)
    calls = []

    def forward():
        calls.append(1)
        time.sleep(0.002)

    assert 1.9 < moe_benchmark.host_issue_ms(forward, torch.device("cuda"), gpu_ms=2.0) < 5
    assert len(calls) == 50  # 0.1 s at 2 ms a call
    calls.clear()
    moe_benchmark.host_issue_ms(forward, torch.device("cuda"), gpu_ms=50.0)
    assert len(calls) == 20


def test_contradicted_claims():
    row = {"launches_claimed": (8, 8), "launches_measured": 8, "syncs_claimed": 100, "syncs_measured": 100,
           "extra_mb_claimed": (20.0, 20.0), "extra_mb": 22.0}
    assert moe_benchmark.contradicted_claims(row) == []
    row.update(launches_measured=20, syncs_measured=103, extra_mb=60.0)
    assert moe_benchmark.contradicted_claims(row) == ["launches", "syncs", "extra memory"]


def test_ok_row_has_every_field(levels, tiny):
    row = moe_benchmark.benchmark(levels["4"], tiny, 40, torch.device("cpu"), warmup=1, repeats=5)
    assert row["status"] == "ok", row["note"]
    assert row["ms"] > 0 and row["tokens_per_s"] > 0 and row["tflops"] > 0 and row["rel_err"] < 2e-2
    assert row["pct_roofline"] is None and row["peak_mb"] is None  # no ceilings, no peak memory on the CPU
    assert row["dense_gemm_ms"] is None  # no ceilings: no case is known to be under the matmul roof
    assert row["ms_p20"] <= row["ms"] <= row["ms_p80"]


def test_dense_gemms_take_turns_where_the_case_is_under_the_matmul_roof(levels, tiny):
    """cuBLAS's dense GEMMs on the case's FLOPs join the levels' turns where the FLOPs set the floor, and every row
    of the case records their time; where the bytes set it (a decode size), they are not timed. The ceilings are
    made up here (the CPU measures none): a matmul roof so low that 40 tokens are under it, and 1 token not."""
    ceilings = moe_benchmark.Ceilings(matmul_tflops=1e-3, copy_gbps=1.0)
    flops_bound = lambda T: ceilings.flops_bound(moe_benchmark.flop_count(tiny, T),  # noqa: E731
                                                 moe_benchmark.min_bytes(tiny, T, tiny.num_experts))
    assert flops_bound(40) and not flops_bound(1)
    settings = moe_benchmark.Settings(ceilings=ceilings, warmup=1, repeats=4)
    prefill = moe_benchmark.benchmark_case([levels["2"], levels["4"]], tiny, 40, torch.device("cpu"),
                                           settings=settings)
    assert [r["status"] for r in prefill] == ["ok", "ok"]
    assert prefill[0]["dense_gemm_ms"] > 0 and prefill[0]["dense_gemm_ms"] == prefill[1]["dense_gemm_ms"]
    decode = moe_benchmark.benchmark_case([levels["4"]], tiny, 1, torch.device("cpu"), settings=settings)
    assert decode[0]["status"] == "ok" and decode[0]["dense_gemm_ms"] is None


# --- --profile: where each level's time goes ------------------------------------------------------------------
EXPECTED_STAGES = {
    "0": {"permute", "expert GEMMs", "activation", "combine"}, "1": {"expert GEMMs", "activation", "combine"},
    "2": {"expert GEMMs", "activation", "combine"}, "3": {"permute", "expert GEMMs", "activation", "combine"},
    "4": {"permute", "expert GEMMs", "activation", "combine"},
    "5": {"permute", "expert GEMMs", "activation", "combine"},
    "6": {"permute", "expert GEMMs", "activation", "combine"},
    "peer": {"permute", "expert GEMMs", "activation", "combine"},
}


@pytest.mark.parametrize("level", sorted(EXPECTED_STAGES))
def test_profile_times_each_marked_stage(levels, level):
    config = make_config(num_shared_experts=1)
    row = moe_benchmark.benchmark(levels[level], config, 21, torch.device("cpu"), warmup=1, repeats=5,
                                  profile=True)
    assert row["status"] == "ok", row["note"]
    stages = row["stage_ms"]
    assert set(stages) == {"routing", *EXPECTED_STAGES[level], "shared experts", moe_benchmark.OUTSIDE_STAGES}
    assert all(ms >= 0 for ms in stages.values()) and stages["expert GEMMs"] > 0
    assert list(stages)[0] == "routing" and list(stages)[-1] == moe_benchmark.OUTSIDE_STAGES
    assert row["profile_calls"] >= 3


def test_stage_markers_are_off_outside_a_profile():
    with moe_benchmark.stage("permute"):
        pass
    assert moe_benchmark.stage.recorder is None
    spans = moe_benchmark.profile_stages(lambda: None, lambda: None, torch.device("cpu"), calls=2)
    assert set(spans) == {"routing", moe_benchmark.OUTSIDE_STAGES} and moe_benchmark.stage.recorder is None


# --- each level file runs alone --------------------------------------------------------------------------------
LAB_FILES = sorted(p.name for p in (REPO / "labs/moe_optimization_journey").glob("*.py")
                   if p.name.startswith(("level", "peer")))


@pytest.mark.parametrize("level_file", LAB_FILES)
def test_level_script_runs_alone(level_file):
    result = subprocess.run(
        [sys.executable, f"labs/moe_optimization_journey/{level_file}", "--preset", "tiny", "--tokens", "13",
         "--device", "cpu", "--repeats", "3", "--warmup", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=os.environ | {"COLUMNS": "200", "TRITON_INTERPRET": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    expected = ("checked" if level_file.startswith(("level7", "level8", "level9", "level10"))  # Triton GEMMs
                else "skipped" if level_file in ("peer_torch_scaled_grouped_mm.py", "peer_triton_kernels_matmul_ogs.py")
                else "ok")  # the GPU-only peers
    assert f"│ {expected}" in result.stdout or f" {expected} " in result.stdout


def test_level_script_bad_preset_is_one_line():
    result = subprocess.run(
        [sys.executable, "labs/moe_optimization_journey/level0_naive.py", "--preset", "nope"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "unknown preset 'nope'" in result.stderr and "Traceback" not in result.stdout + result.stderr


def test_graph_inputs_are_copied_by_one_launch():
    """CapturedGraph's three inputs go into its static buffers with one kernel (CopyThree, here through Triton's
    interpreter): any mix of dtypes and sizes, past one 4096-element block and not a multiple of it, a non-contiguous
    source included, arrives bit-equal, call after call; mismatched shapes are refused when the copy is made."""
    import moe_kernels

    sources = (torch.randn(3, 2731).bfloat16(), torch.rand(2, 3).t(), torch.randint(0, 8, (3, 2)))
    destinations = tuple(torch.empty(s.shape, dtype=s.dtype) for s in sources)
    copy = moe_kernels.CopyThree(sources, destinations)
    for _ in range(2):
        copy(sources)
        assert all(torch.equal(s, d) for s, d in zip(sources, destinations))
        sources = tuple(s + 1 for s in sources)
    with pytest.raises(ValueError, match="cannot copy"):
        moe_kernels.CopyThree(sources, (destinations[0], destinations[2], destinations[1]))


def test_a_graphed_level_times_the_replay_alone(tiny):
    """Levels 5 and 8 (and so 9 and 10) are timed as a graph of the whole model runs a layer: `timed_call` writes the
    timing inputs into the graph once, and each timed call only replays. A stand-in graph (the CPU has none) records
    what each step did; on the CPU the timed call is the eager forward."""
    from level5_cudagraphs import CudaGraphLevel
    from level8_triton_graphed import TritonGraphedLevel

    class RecordingGraph:
        def __init__(self):
            self.steps = []

        def __call__(self, *inputs):  # capture, or copy the inputs in, then replay
            self.steps.append("copy in and replay")
            return inputs[0]

        def replay(self):
            self.steps.append("replay")
            return torch.zeros(())

    weights = init_weights(tiny, torch.device("cpu"))
    inputs = make_inputs(tiny, weights, 5, seed=1)
    for level_cls in (CudaGraphLevel, TritonGraphedLevel):
        level = level_cls(tiny, weights)
        level.prepare()
        on_cpu = level.timed_call(inputs)()
        assert torch.equal(on_cpu, level.forward(*inputs.as_args()))  # no graph: the eager forward
        level.device, level.graphed_forward = torch.device("cuda"), RecordingGraph()
        call = level.timed_call(inputs)
        for _ in range(3):
            call()
        assert level.graphed_forward.steps == ["copy in and replay", "replay", "replay", "replay"]


def test_a_cases_steps_add_up_to_one_row_a_level(levels, tiny):
    """What the progress bar hears: each level's check, turns and counts, or its whole row where it ends at its
    check (level 7 is only checked on the CPU), add up to one row a level."""
    shares = []
    rows = moe_benchmark.benchmark_case([levels["4"], levels["7"], levels["0"]], tiny, 9, torch.device("cpu"),
                                        settings=FAST_SETTINGS, done=shares.append)
    assert [row["status"] for row in rows] == ["ok", "checked", "ok"]
    assert sum(shares) == pytest.approx(len(rows)) and len(shares) > len(rows)
