"""One row schema (result_row.ResultRow) for the harnesses that write rows and the report that reads them."""

import dataclasses
import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import bench

import ep_benchmark
import moe_benchmark
import result_row
from cli import report
from moe_model import Traffic
from result_row import COLUMNS, ResultRow

REPO = Path(__file__).resolve().parents[1]


def committed_rows() -> list[Path]:
    """The rows.jsonl of the committed runs, oldest first: git's list where this is a checkout, so that a user's own
    runs beside them (an interrupted one may have no row) are not taken for the lab's."""
    listed = subprocess.run(["git", "ls-files", "results/moe_journey/*/rows.jsonl"], cwd=REPO, capture_output=True,
                            text=True)
    if listed.returncode == 0 and listed.stdout.strip():
        return sorted(REPO / name for name in listed.stdout.split())
    return sorted(path for path in (REPO / "results" / "moe_journey").glob("*/rows.jsonl") if path.stat().st_size)


COMMITTED = committed_rows()
EP_FIELDS = [f.name for f in dataclasses.fields(ResultRow) if f.metadata]


def test_the_schema_does_not_import_torch():
    check = "import result_row, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], check=True, cwd=REPO)


def test_a_misspelled_field_is_an_error(levels, tiny):
    row = moe_benchmark.base_row(levels["4"], tiny, 8, torch.device("cpu"), Traffic())
    with pytest.raises(AttributeError):
        row.stauts = "ok"
    with pytest.raises(AttributeError):
        row.update(tokens_per_sec=1.0)


def test_rows_keep_their_keys_and_order(levels, tiny):
    """A single-GPU row lists every field but the EP ones, in the schema's order; an EP row every field."""
    row = moe_benchmark.benchmark(levels["4"], tiny, 8, torch.device("cpu"), warmup=1, repeats=5)
    assert list(row) == [name for name in COLUMNS if name not in EP_FIELDS]
    committed = [json.loads(path.read_text().splitlines()[0]) for path in COMMITTED]
    newest_single_gpu = next(r for r in reversed(committed) if r["level"] != "ep")
    assert set(newest_single_gpu) <= set(row)  # a committed row's keys
    ep_row = ResultRow(**{**row, "level": "ep", "world_size": 2}).to_json()
    assert list(ep_row) == list(COLUMNS) and ResultRow.from_json(ep_row) == ResultRow(**ep_row)


def test_ep_rows_are_built_from_the_schema(tiny, monkeypatch):
    import level_ep_expert_parallel
    import torch.distributed as dist
    from level9_persistent_tma import PersistentTmaLevel

    from level_ep_expert_parallel import ExpertParallelMoE

    # Level 9 as the local level, as on a Hopper GPU (in the interpreter here): its graph's wrapper holds the level,
    # so the layer sits in a reference cycle that only a collection frees.
    monkeypatch.setattr(level_ep_expert_parallel, "local_level_class", lambda device: PersistentTmaLevel)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    gc.disable()  # only the benchmark's own collection may free the layer
    try:
        (row,) = ep_benchmark.benchmark_ep(ExpertParallelMoE, tiny, 8, torch.device("cpu"), Traffic(),
                                           ep_benchmark.world_groups([1]), 1, 5, 0.5, "1")
        alive = [obj for obj in gc.get_objects() if isinstance(obj, (ExpertParallelMoE, PersistentTmaLevel))]
    finally:
        gc.enable()
        dist.destroy_process_group()
    assert row["status"] == "ok", row["note"]
    assert list(row) == list(COLUMNS) and row["world_size"] == 1 and row["chunks"] == 1
    # The case's layer is gone when it returns, collected: the next case's would otherwise be drawn beside it (a
    # GPU's deepseek-v3 layer holds 37 GB).
    assert not alive


def test_committed_rows_load_with_defaults_for_what_they_lack():
    for path in COMMITTED:
        for line in path.read_text().splitlines():
            values = json.loads(line)
            row = ResultRow.from_json(values)
            assert {name: getattr(row, name) for name in values} == values
    oldest = ResultRow.from_json(json.loads(COMMITTED[0].read_text().splitlines()[0]))
    assert (oldest.traffic, oldest.router, oldest.shared_experts, oldest.stage_ms) == ("uniform", "softmax-topk", 0,
                                                                                       None)


def test_an_unknown_or_missing_field_is_refused():
    values = json.loads(COMMITTED[-1].read_text().splitlines()[0])
    with pytest.raises(ValueError, match="unknown field.*'tokens_per_sec'"):
        ResultRow.from_json({**values, "tokens_per_sec": 1.0})
    with pytest.raises(ValueError, match="missing field.*'level'"):
        ResultRow.from_json({name: value for name, value in values.items() if name != "level"})


def test_report_names_the_line_of_a_row_with_an_unknown_field(tmp_path):
    # Line 2 of 3 rows from the newest run that has them: a damaged last line is only skipped, with a warning (an
    # interrupted write can cut it).
    lines = next(lines for lines in (path.read_text().splitlines()[:3] for path in reversed(COMMITTED))
                 if len(lines) == 3)
    lines[1] = json.dumps({**json.loads(lines[1]), "tokens_per_sec": 1.0})
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    result = bench("report", str(tmp_path))
    assert result.exit_code == 2 and "rows.jsonl, line 2" in result.output and "'tokens_per_sec'" in result.output


def test_frame_has_a_column_per_field():
    rows = [json.loads(line) for line in COMMITTED[0].read_text().splitlines()]
    df = report.frame(rows)
    assert set(COLUMNS) <= set(df.columns) and (df["traffic"] == "uniform").all()


def test_stages_are_named_once():
    assert moe_benchmark.STAGES is result_row.STAGES
    assert moe_benchmark.OUTSIDE_STAGES is report.OUTSIDE_STAGES is result_row.OUTSIDE_STAGES


@pytest.mark.parametrize("args, message", [(["--repeats", "0"], "--repeats ≥ 1"),
                                           (["--tokens", "0"], "must be positive"),
                                           (["--preset", "hidden=8,intermediate=8,experts=2,top_k=3"],
                                            "cannot exceed experts (2)"),
                                           (["--ep-chunks", "1,many"], "whole numbers")])
def test_ep_script_refuses_like_the_cli(args, message):
    script = REPO / "labs" / "moe_optimization_journey" / "level_ep_expert_parallel.py"
    result = subprocess.run([sys.executable, str(script), "--device", "cpu", *args], capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_a_gpu_row_names_the_clock_its_median_was_taken_at(monkeypatch):
    """nvidia-smi's SM clock and software-power-cap flag, read by the GPU's UUID right after the timed calls."""
    asked = []

    def fake_run(command, **kwargs):
        asked.append(command)
        return subprocess.CompletedProcess(command, 0, stdout="1470, Active\n")

    monkeypatch.setattr(moe_benchmark.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(moe_benchmark.subprocess, "run", fake_run)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("Props", (), {"uuid": "1234-abcd"}))
    assert moe_benchmark.sm_clock_after_load(torch.device("cuda", 0)) == (1470, True)
    assert asked[0][:3] == ["nvidia-smi", "-i", "GPU-1234-abcd"]
    assert moe_benchmark.sm_clock_after_load(torch.device("cpu")) is None


def test_an_ep_check_that_fails_is_an_error_row_and_nothing_is_timed(tiny, monkeypatch):
    from level_ep_expert_parallel import ExpertParallelMoE

    wrong = moe_benchmark.CheckResult(rel_err=0.5, passed=False, message="rel. error 0.5 over 0.02")
    monkeypatch.setattr(ep_benchmark, "compare_to_reference", lambda out_TH, ref_TH, tolerance: wrong)
    monkeypatch.setattr(ep_benchmark, "time_forwards", lambda *args: pytest.fail("a wrong layer was timed"))
    row = ep_row_in_one_process(ExpertParallelMoE, tiny)
    assert row["status"] == "error" and row["note"].startswith("wrong result: rank 0") and row["ms"] is None


def test_an_ep_layer_out_of_host_memory_is_an_oom_row(tiny):
    """The CPU allocator's failure (a plain RuntimeError) is an `oom` row, as a CUDA out-of-memory is."""

    class TooBig:
        def __init__(self, config, device):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory")

    TooBig.level, TooBig.name = "ep", "expert_parallel"
    row = ep_row_in_one_process(TooBig, tiny)
    assert row["status"] == "oom" and row["note"] == "out of host memory at 8 tokens per rank"


def ep_row_in_one_process(layer_cls: type, config) -> dict:
    """benchmark_ep's one row at W = 1 and 8 tokens, in a gloo group of this process alone."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        (row,) = ep_benchmark.benchmark_ep(layer_cls, config, 8, torch.device("cpu"), Traffic(),
                                           ep_benchmark.world_groups([1]), 1, 5, 0.5, "1")
    finally:
        dist.destroy_process_group()
    return row


def test_shape_label_names_the_shared_experts_only_where_the_layer_has_them():
    row = dict(hidden=1024, intermediate=2048, experts=8, top_k=2, shared_experts=0, dtype="bf16")
    assert result_row.shape_label(row) == "H=1024 I=2048 E=8 K=2 bf16"
    assert result_row.shape_label(row | dict(shared_experts=1)) == "H=1024 I=2048 E=8 K=2 S=1 bf16"
    assert result_row.shape_label(row | dict(shared_experts=float("nan"))) == "H=1024 I=2048 E=8 K=2 bf16"
