"""The `aisp` command end to end on the CPU, into temporary folders."""

import json
import re
from pathlib import Path

import PIL.Image
import pytest
import torch
from typer.testing import CliRunner

import moe_benchmark
from cli.aisp import app

runner = CliRunner()
FAST = ["--device", "cpu", "--preset", "tiny", "--repeats", "3", "--warmup", "1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench(*args):
    return runner.invoke(app, ["bench", *args], catch_exceptions=False)


def summary_of(run_dir: Path) -> str:
    """summary.md with the tables' padding squeezed out, so a test can look for `| 4 grouped | 1.23 |`."""
    return re.sub(r" +", " ", (run_dir / "summary.md").read_text())


def run_dirs(out: Path) -> list[Path]:
    return sorted(p for p in (out / "moe_journey").iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    result = bench("run", "-t", "moe_journey", "--levels", "0-2,4,5", "--tokens", "5,17", "--out", str(out), *FAST)
    assert result.exit_code == 0, result.output
    (run_dir,) = run_dirs(out)
    return run_dir


def test_run_writes_a_complete_folder(finished_run):
    names = {p.name for p in finished_run.iterdir()}
    assert {"rows.jsonl", "environment.json", "summary.md", "time_tiny.png", "speedup_tiny.png"} <= names
    for png in finished_run.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
    rows = [json.loads(line) for line in (finished_run / "rows.jsonl").read_text().splitlines()]
    assert [(r["level"], r["tokens"]) for r in rows] == [(lvl, t) for t in (5, 17) for lvl in (0, 1, 2, 4, 5)]
    assert all(r["status"] == "ok" and r["rel_err"] < 2e-2 and r["ms"] > 0 for r in rows)
    env = json.loads((finished_run / "environment.json").read_text())
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and "aisp bench run" in env["command"]
    assert env["interrupted"] is False and env["finished_utc"]
    # The code the run measured: this checkout's commit (a fresh clone in CI; None outside git), no GPU topology.
    assert env["code"] is None or len(env["code"].split()[0]) == 12
    assert env["topology"] is None
    summary = summary_of(finished_run)
    assert "| 4 grouped |" in summary and "Speedup over level 0" in summary and "![time_tiny.png]" in summary


def test_report_regenerates_from_rows(finished_run):
    summary = finished_run / "summary.md"
    before = summary.read_text()
    summary.unlink()
    for png in finished_run.glob("*.png"):
        png.unlink()
    result = bench("report", str(finished_run))
    assert result.exit_code == 0, result.output
    assert summary.read_text() == before and (finished_run / "time_tiny.png").exists()


def test_oom_cells_read_oom(finished_run, tmp_path):
    rows = [json.loads(line) for line in (finished_run / "rows.jsonl").read_text().splitlines()]
    rows[1].update(status="oom", ms=None, note="CUDA out of memory at 5 tokens")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert bench("report", str(tmp_path)).exit_code == 0
    assert "| 1 batched | OOM |" in summary_of(tmp_path)


def test_compare(finished_run, tmp_path):
    result = bench("run", "-t", "moe_journey", "--levels", "4", "--tokens", "5", "--out", str(tmp_path), *FAST)
    assert result.exit_code == 0, result.output
    (other,) = run_dirs(tmp_path)
    result = runner.invoke(app, ["bench", "compare", str(finished_run), str(other)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "grouped" in result.output and "x" in result.output.split("grouped")[1].splitlines()[0]


def test_runs_never_overwrite(tmp_path):
    for _ in range(2):
        assert bench("run", "-t", "moe_journey", "--levels", "0", "--tokens", "3", "--out", str(tmp_path),
                     *FAST).exit_code == 0
    assert len(run_dirs(tmp_path)) == 2


def test_interrupted_run_keeps_its_rows(tmp_path, monkeypatch):
    real_benchmark_case = moe_benchmark.benchmark_case
    calls = []

    def interrupt_second_case(*args, **kwargs):  # the first case's two rows are written, the second's never
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_benchmark_case(*args, **kwargs)

    monkeypatch.setattr(moe_benchmark, "benchmark_case", interrupt_second_case)
    result = bench("run", "-t", "moe_journey", "--levels", "0,4", "--tokens", "3,9", "--out", str(tmp_path), *FAST)
    assert result.exit_code == 130
    (run_dir,) = run_dirs(tmp_path)
    assert len((run_dir / "rows.jsonl").read_text().splitlines()) == 2
    assert json.loads((run_dir / "environment.json").read_text())["interrupted"] is True
    assert (run_dir / "summary.md").exists()


def test_inline_shape_and_toml_presets(tmp_path):
    inline = "hidden=32,intermediate=48,experts=6,top_k=3,shared_experts=1"
    result = bench("run", "-t", "moe_journey", "--levels", "4", "--tokens", "7", "--out", str(tmp_path),
                   "--device", "cpu", "--repeats", "3", "--preset", inline)
    assert result.exit_code == 0, result.output
    toml = tmp_path / "mine.toml"
    toml.write_text('name = "mine"\nhidden = 32\nintermediate = 40\nexperts = 5\ntop_k = 2\ndtype = "fp32"\n')
    result = bench("run", "-t", "moe_journey", "--levels", "4", "--tokens", "7", "--out", str(tmp_path),
                   "--device", "cpu", "--repeats", "3", "--preset", str(toml))
    assert result.exit_code == 0, result.output
    presets = [json.loads((d / "rows.jsonl").read_text().splitlines()[0])["preset"] for d in run_dirs(tmp_path)]
    assert sorted(presets) == ["custom-H32-I48-E6-K3", "mine"]
    summaries = "".join((d / "summary.md").read_text() for d in run_dirs(tmp_path))
    assert "K=3 S=1 bf16" in summaries


def test_list():
    result = bench("list")
    assert result.exit_code == 0 and "moe_journey" in result.output and "grouped" in result.output
    assert "deepseek-v3" in result.output and "expert_parallel" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["-t", "nope"], "unknown target 'nope'"),
        (["-t", "moe_journey", "--levels", "99"], "unknown level '99'"),
        (["-t", "moe_journey", "--levels", "4-2"], "runs backwards"),
        (["-t", "moe_journey", "--preset", "nope"], "unknown preset 'nope'"),
        (["-t", "moe_journey", "--preset", "hidden=8,intermediate=8,experts=2,top_k=3"], "cannot exceed"),
        (["-t", "moe_journey", "--preset", "hidden=0,intermediate=8,experts=2,top_k=1"], "must be positive"),
        (["-t", "moe_journey", "--preset", "hidden=8,experts=2,top_k=1"], "missing intermediate"),
        (["-t", "moe_journey", "--preset", "missing.toml"], "cannot read preset file"),
        (["-t", "moe_journey", "--device", "tpu"], "unknown device 'tpu'"),
        (["-t", "moe_journey", "--tokens", "12,abc"], "whole numbers"),
        (["-t", "moe_journey", "--tokens", "0"], "must be positive"),
        (["-t", "moe_journey", "--traffic", "bursty"], "unknown traffic 'bursty'"),
        (["-t", "moe_journey", "--router", "hash"], "unknown router 'hash'"),
        (["-t", "moe_journey", "--traffic", "hot", "--hot-share", "2"], "share"),
        (["-t", "moe_journey", "--traffic", "zipf", "--zipf-s", "inf"], "positive and finite"),
        (["-t", "moe_journey", "--router", "switch", "--capacity-factor", "inf"], "positive and finite"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    result = bench("run", *args, "--out", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_cuda_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = bench("run", "-t", "moe_journey", "--device", "cuda", "--out", str(tmp_path))
    assert result.exit_code == 2 and "no CUDA GPU" in result.output


def test_unwritable_out(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = bench("run", "-t", "moe_journey", "--out", str(blocker / "results"), *FAST)
    assert result.exit_code == 2 and "cannot write to" in result.output
    result = bench("run", "-t", "moe_journey", "--out", str(blocker), *FAST)
    assert result.exit_code == 2 and "is a file, not a folder" in result.output


def test_an_unusable_target_folder_under_a_writable_out(tmp_path):
    """--out itself can be written, but not the lab's folder in it (here a file has its name; a read-only folder
    is the same error, which root's tests could not make): one line, nothing written."""
    (tmp_path / "moe_journey").write_text("")
    result = bench("run", "-t", "moe_journey", "--out", str(tmp_path), *FAST)
    assert result.exit_code == 2 and "cannot write to" in result.output and "moe_journey" in result.output
    assert [path.name for path in tmp_path.iterdir()] == ["moe_journey"]


def test_compare_checks_the_markdown_folder_before_it_prints(finished_run, tmp_path):
    result = bench("compare", str(finished_run), str(finished_run), "--markdown", str(tmp_path / "no" / "x.md"))
    assert result.exit_code == 2 and "cannot write" in result.output and "×" not in result.output


def test_token_counts_past_int32_are_refused(tmp_path):
    result = bench("run", "-t", "moe_journey", "--tokens", "99999999999999999999", "--out", str(tmp_path), *FAST)
    assert result.exit_code == 2 and "at most 2147483647" in result.output and not list(tmp_path.iterdir())


def test_report_of_a_non_run_folder(tmp_path):
    result = bench("report", str(tmp_path))
    assert result.exit_code == 2 and "not a run folder" in result.output


def gpu_copy(finished_run, run_dir):
    """The finished CPU run's rows in a folder whose environment says GPU: what `publish` takes."""
    run_dir.mkdir(parents=True)
    (run_dir / "rows.jsonl").write_text((finished_run / "rows.jsonl").read_text())
    env = json.loads((finished_run / "environment.json").read_text()) | {"device_type": "cuda"}
    (run_dir / "environment.json").write_text(json.dumps(env))
    return run_dir


def test_publish_fills_the_readme_block(finished_run, tmp_path):
    run_dir = gpu_copy(finished_run, tmp_path / "moe_journey" / "20260101T000000Z-nvidia-test")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- results:start -->\nold\n<!-- results:end -->\ntail\n")
    result = bench("publish", str(run_dir), "--readme", str(readme))
    assert result.exit_code == 0, result.output
    text = readme.read_text()
    assert "old" not in text and text.endswith("tail\n")
    assert "moe_journey/20260101T000000Z-nvidia-test/time_tiny.png" in text
    assert (run_dir.parent / "LATEST.md").exists()


def test_decode_table_and_cross_preset_figure(finished_run, tmp_path):
    rows = [json.loads(line) for line in (finished_run / "rows.jsonl").read_text().splitlines()]
    for row in rows:
        row.update(pct_roofline=12.5, gbps=300.0)
    other = [dict(r, preset="other") for r in rows]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + other))
    env = json.loads((finished_run / "environment.json").read_text())
    env["ceilings"] = {"matmul_tflops": 700.0, "copy_gbps": 3000.0}
    (tmp_path / "environment.json").write_text(json.dumps(env))
    assert bench("report", str(tmp_path)).exit_code == 0
    summary = summary_of(tmp_path)
    assert "Decode regime" in summary and "300 (10.0%)" in summary
    assert "![across_presets.png](across_presets.png)" in summary
    assert (tmp_path / "across_presets.png").read_bytes()[:8] == PNG_MAGIC
    assert PIL.Image.open(tmp_path / "across_presets.png").mode == "P"  # 256 colours: a third of RGBA's bytes


def test_traffic_shapes_and_load_metrics_in_a_run(tmp_path):
    result = bench("run", "-t", "moe_journey", "--levels", "4", "--tokens", "16,40", "--traffic", "uniform,hot",
                   "--out", str(tmp_path), *FAST)
    assert result.exit_code == 0, result.output
    (run_dir,) = run_dirs(tmp_path)
    rows = [json.loads(line) for line in (run_dir / "rows.jsonl").read_text().splitlines()]
    assert [r["traffic"] for r in rows] == ["uniform", "uniform", "hot(50% of tokens)", "hot(50% of tokens)"]
    hot = rows[-1]
    assert sum(hot["tokens_per_expert"]) == 40 * 2 and 12 <= hot["tokens_per_expert"][0] <= 28  # about half
    assert hot["load_max_over_mean"] > 1.2 and hot["load_gini"] > 0
    summary = (run_dir / "summary.md").read_text()
    assert "## tiny, hot(50% of tokens)" in summary and "Load over the experts" in summary
    assert (run_dir / "load_tiny_hot_50_of_tokens.png").exists() and (run_dir / "imbalance_tiny.png").exists()


@pytest.mark.parametrize("router, extra, heading", [
    ("switch", ["--traffic", "zipf", "--capacity-factor", "1.0"], "## tiny, zipf(s=1.2), switch router"),
    ("expert-choice", [], "## tiny, expert-choice router"),
])
def test_routers_in_a_run(tmp_path, router, extra, heading):
    result = bench("run", "-t", "moe_journey", "--levels", "0,7", "--tokens", "24", "--router", router, *extra,
                   "--out", str(tmp_path), *FAST)
    assert result.exit_code == 0, result.output
    (run_dir,) = run_dirs(tmp_path)
    rows = [json.loads(line) for line in (run_dir / "rows.jsonl").read_text().splitlines()]
    assert all(r["status"] in ("ok", "checked") and r["router"] == router for r in rows)  # 7: checked on a CPU
    if router == "switch":
        assert all(r["top_k"] == 1 for r in rows) and rows[0]["dropped_tokens"] > 0
    summary = (run_dir / "summary.md").read_text()
    assert heading in summary and "dropped tokens" in summary


def test_profile_adds_the_breakdown(tmp_path):
    result = bench("run", "-t", "moe_journey", "--levels", "0,4", "--tokens", "8,24", "--router", "switch",
                   "--traffic", "zipf", "--profile", "--out", str(tmp_path), *FAST)
    assert result.exit_code == 0, result.output
    (run_dir,) = run_dirs(tmp_path)
    rows = [json.loads(line) for line in (run_dir / "rows.jsonl").read_text().splitlines()]
    assert all(r["stage_ms"]["expert GEMMs"] > 0 for r in rows)
    summary = summary_of(run_dir)
    assert "Where the time goes at 8 tokens" in summary and "Where the time goes at 24 tokens" in summary
    assert "| level \\ stage | routing | permute | expert GEMMs |" in summary
    assert (run_dir / "stages_tiny_zipf_s_1.2_switch_router.png").read_bytes()[:8] == PNG_MAGIC
    assert "--profile" in json.loads((run_dir / "environment.json").read_text())["command"]


def test_publish_several_runs_of_one_sweep(finished_run, tmp_path):
    """A sweep that ran as one process per GPU: both folders in the README block and LATEST.md."""
    names = ["20260101T000000Z-nvidia-test", "20260101T000000Z-nvidia-test-2"]
    for name in names:
        gpu_copy(finished_run, tmp_path / "moe_journey" / name)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\n<!-- results:end -->\n")
    result = bench("publish", *(str(tmp_path / "moe_journey" / name) for name in names), "--readme", str(readme))
    assert result.exit_code == 0, result.output
    text, latest = readme.read_text(), (tmp_path / "moe_journey" / "LATEST.md").read_text()
    assert all(f"moe_journey/{name}/summary.md" in text and f"copied from {name}/" in latest for name in names)


def test_a_run_interrupted_before_its_first_row_leaves_no_folder(tmp_path, monkeypatch):
    """Nothing finished, nothing kept: an empty folder would become the newest run that `aisp bench report` reads."""
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(moe_benchmark, "benchmark_case", interrupt)
    result = bench("run", "-t", "moe_journey", "--levels", "4", "--tokens", "3", "--out", str(tmp_path), *FAST)
    assert result.exit_code == 130 and "before any row finished: no run folder kept" in result.output
    assert run_dirs(tmp_path) == []


def test_a_terminated_run_keeps_its_rows_as_an_interrupted_one_does(tmp_path, monkeypatch):
    """SIGTERM (a scheduler's kill, `timeout`) ends the run as Ctrl-C does: its rows, summary and report written,
    exit 128 + 15; the handler is the process's own again afterwards."""
    import os
    import signal

    real_benchmark_case = moe_benchmark.benchmark_case
    calls = []

    def terminate_in_second_case(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_benchmark_case(*args, **kwargs)

    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(moe_benchmark, "benchmark_case", terminate_in_second_case)
    result = bench("run", "-t", "moe_journey", "--levels", "0,4", "--tokens", "3,9", "--out", str(tmp_path), *FAST)
    assert result.exit_code == 143 and "interrupted (SIGTERM)" in result.output
    (run_dir,) = run_dirs(tmp_path)
    assert len((run_dir / "rows.jsonl").read_text().splitlines()) == 2 and (run_dir / "summary.md").exists()
    assert signal.getsignal(signal.SIGTERM) is handler


def test_a_trial_publish_leaves_the_repositorys_latest_alone(finished_run, tmp_path, monkeypatch):
    """Publishing the repository's runs into another README (a trial) does not change LATEST.md, which `aisp lab
    show` reads as the published run; into the repository's README it does."""
    import cli.aisp

    monkeypatch.setattr(cli.aisp, "REPO_ROOT", tmp_path)
    run_dir = tmp_path / "results" / "moe_journey" / "20260101T000000Z-nvidia-test"
    gpu_copy(finished_run, run_dir)
    block = "<!-- results:start -->\n<!-- results:end -->\n"
    (tmp_path / "README.md").write_text(block)
    trial = tmp_path / "elsewhere" / "README.md"
    trial.parent.mkdir()
    trial.write_text(block)
    result = bench("publish", str(run_dir), "--readme", str(trial))
    assert result.exit_code == 0 and "left as it was" in result.output, result.output
    assert not (run_dir.parent / "LATEST.md").exists() and "summary.md" in trial.read_text()
    assert bench("publish", str(run_dir), "--readme", str(tmp_path / "README.md")).exit_code == 0
    assert (run_dir.parent / "LATEST.md").exists()
