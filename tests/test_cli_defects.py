"""Issue 10's CLI defects, each pinned by a test: compare keys on whole cases, bad input never a traceback, the
run's records, what the console shows, the level scripts' options, and the Makefile's set-up check."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

import moe_benchmark
from cli.aisp import app
from moe_model import ConfigError, MoEConfig

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "moe_journey"
runner = CliRunner()
FAST = ["--device", "cpu", "--preset", "tiny", "--repeats", "3", "--warmup", "1"]


def bench(*args, **kwargs):
    return runner.invoke(app, ["bench", *args], **kwargs)


def run(tmp_path, *args):
    return bench("run", "-t", "moe_journey", "--out", str(tmp_path), *args)


def only_run_dir(out: Path) -> Path:
    (run_dir,) = (out / "moe_journey").iterdir()
    return run_dir


# 1. compare keys rows on every field that makes a case ------------------------------------------------------------
def test_compare_keeps_every_traffic_shape_of_the_committed_runs(tmp_path):
    a, b = next(RESULTS.glob("20261125T111956Z-*")), next(RESULTS.glob("20261125T103910Z-*"))
    table = tmp_path / "compare.md"
    result = bench("compare", str(a), str(b), "--markdown", str(table), terminal_width=80)
    assert result.exit_code == 0, result.output
    assert all(len(line) <= 80 for line in result.output.splitlines())
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table.read_text().splitlines()
             if "qwen3-moe" in line and "4 grouped" in line and "| 16384 |" in line]
    assert sorted(c[0] for c in cells) == ["preset=qwen3-moe, traffic=hot(50% of tokens)",
                                           "preset=qwen3-moe, traffic=uniform", "preset=qwen3-moe, traffic=zipf(s=1.2)"]
    uniform = next(c for c in cells if c[0].endswith("uniform"))
    assert uniform[3:] == ["17.3", "15.6", "1.11x"]
    assert "geometric mean of A/B" in table.read_text() and "geometric mean of A/B" in result.output


def test_compare_marks_host_bound_times(tmp_path):
    a, b = next(RESULTS.glob("20261126T052421Z-*")), next(RESULTS.glob("20261126T062524Z-*"))
    table = tmp_path / "compare.md"
    assert bench("compare", str(a), str(b), "--markdown", str(table), terminal_width=120).exit_code == 0
    text = table.read_text()
    level9_one_token = next(line for line in text.splitlines() if "9 persistent_tma |     1 |" in line)
    assert "0.21 (h)" in level9_one_token  # the sweep's host-bound cell (GPU busy 9%)
    assert "(h): host-bound" in text
    # ... and the per-level mean leaves it out: 6.85x there would have made level 9's 1.14x
    (level9_mean,) = [line for line in text.splitlines() if line.startswith("| 9 persistent_tma ")]
    assert [cell.strip() for cell in level9_mean.strip("|").split("|")][1:] == ["14", "1", "0.99x"]


# 2. never a traceback ---------------------------------------------------------------------------------------------
def damaged_copy(tmp_path, rows_cut_at: int | None = None, env_cut: bool = False) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    source = next(RESULTS.glob("20261125T110300Z-*"))
    lines = (source / "rows.jsonl").read_text().splitlines()
    if rows_cut_at is not None:
        lines[rows_cut_at] = lines[rows_cut_at][:40]
    (run_dir / "rows.jsonl").write_text("\n".join(lines) + "\n")
    env = (source / "environment.json").read_text()
    (run_dir / "environment.json").write_text(env[:100] if env_cut else env)
    return run_dir


def test_a_damaged_row_names_its_file_and_line(tmp_path):
    run_dir = damaged_copy(tmp_path, rows_cut_at=1)
    for command in (["report", str(run_dir)], ["compare", str(run_dir), str(run_dir)]):
        result = bench(*command)
        assert result.exit_code == 2 and "rows.jsonl, line 2" in result.output, result.output
        assert "Traceback" not in result.output


def test_report_skips_a_damaged_last_row_with_a_warning(tmp_path):
    run_dir = damaged_copy(tmp_path, rows_cut_at=-1)
    result = bench("report", str(run_dir))
    assert result.exit_code == 0 and "warning" in result.output and "line 4" in result.output, result.output
    assert (run_dir / "summary.md").exists()


def test_a_damaged_environment_names_its_file_and_line(tmp_path):
    run_dir = damaged_copy(tmp_path, env_cut=True)
    result = bench("report", str(run_dir))
    assert result.exit_code == 2 and "environment.json, line" in result.output, result.output


@pytest.mark.parametrize("toml, message", [
    ('seed = "abc"', "seed must be a whole number, got 'abc'"),
    ("seed = 1.5", "seed must be a whole number, got 1.5"),
    ("name = 5", "name must be a non-empty string, got 5"),
])
def test_bad_toml_presets(tmp_path, toml, message):
    preset = tmp_path / "mine.toml"
    preset.write_text(f"hidden = 32\nintermediate = 48\nexperts = 4\ntop_k = 2\n{toml}\n")
    result = run(tmp_path / "out", "--preset", str(preset), "--levels", "0", "--tokens", "3")
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "out" / "moe_journey").exists()  # checked before the run folder is made


@pytest.mark.parametrize("shape, message", [
    ("hidden=32,intermediate=48,experts=4,top_k=2,seed=abc", "seed must be a whole number"),
    ("hidden=32,intermediate=48,experts=4,top_k=2,name=", "name must be a non-empty string"),
    ("hidden=32,intermediate=48,experts=4,top_k=2,hidden=64", "'hidden' is given twice"),
    ("hidden=32,intermediate=48,experts=4,top_k=2,num_experts=8", "'experts' and 'num_experts' both set"),
    ("hidden=32,intermediate=48,experts=2,top_k=3", "cannot exceed experts (2)"),
    ("hidden=32,intermediate=48,experts=x,top_k=2", "experts must be a whole number, got 'x'"),
])
def test_bad_inline_shapes_name_the_users_keys(tmp_path, shape, message):
    result = run(tmp_path, "--preset", shape, "--levels", "0", "--tokens", "3")
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    assert "num_experts" not in result.output or "num_experts=8" in shape
    assert not (tmp_path / "moe_journey").exists()


def test_config_validates_seed_and_name():
    for fields in ({"seed": "abc"}, {"seed": 1.5}, {"seed": True}, {"name": 5}, {"name": " "}):
        with pytest.raises(ConfigError):
            MoEConfig(hidden=8, intermediate=8, num_experts=2, top_k=1, **fields)


def test_more_tokens_than_memory_is_an_oom_row(tmp_path):
    result = run(tmp_path, "--levels", "0", "--tokens", "2000000000", *FAST)
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in (only_run_dir(tmp_path) / "rows.jsonl").read_text().splitlines()]
    assert row["status"] == "oom" and "memory" in row["note"]


def test_a_python_without_the_labs_packages_gets_one_line():
    """`python -m cli.aisp` from a Python that lacks typer (here: its import blocked) says where the packages are."""
    blocked = "import runpy, sys; sys.modules['typer'] = None; runpy.run_module('cli.aisp', run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", blocked, "bench", "list"], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "has no typer" in result.stderr and "make bench" in result.stderr


def test_debug_re_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("AISP_DEBUG", "0")  # so that the "1" --debug sets goes at the end of the test
    shape = "hidden=32,intermediate=48,experts=2,top_k=3"
    result = runner.invoke(app, ["--debug", "bench", "run", "-t", "moe_journey", "--preset", shape,
                                 "--out", str(tmp_path)])
    assert result.exit_code != 0 and "cannot exceed" in str(result.exception)
    monkeypatch.setenv("AISP_DEBUG", "0")  # --debug set it for the levels; without it, a crash is a row

    class Crashing(moe_benchmark.MoELevel):
        level, name, summary = 99, "crashing", "raises"

        def forward(self, *args):
            raise ZeroDivisionError("my bug")

    from moe_model import get_preset

    row = moe_benchmark.benchmark(Crashing, get_preset("tiny"), 3, moe_benchmark.resolve_device("cpu"))
    assert row["status"] == "error" and "my bug" in row["note"]
    monkeypatch.setenv("AISP_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        moe_benchmark.benchmark(Crashing, get_preset("tiny"), 3, moe_benchmark.resolve_device("cpu"))


# 4. output a person can read --------------------------------------------------------------------------------------
def test_the_final_table_is_one_line_per_row_at_80_columns(tmp_path):
    result = run(tmp_path, "--levels", "0,7", "--tokens", "3,5", *FAST)
    assert result.exit_code == 0, result.output
    # The table, up to the run folder's path, which is never broken at its spaces (the terminal wraps it).
    table = result.output[result.output.index("moe_journey on cpu"):result.output.index("rows, summary.md")]
    lines = table.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert len([line for line in lines if "7 triton_grouped" in line]) == 2  # a row is one line, nothing folded
    assert "interpreter" in table[table.index("\n[1] "):]  # notes below the table, numbered
    assert "% roof" not in table and "MiB" not in table  # a CPU run has neither


def test_rows_table_shows_expert_parallel_world_size():
    row = {"level": "ep", "level_name": "expert_parallel", "preset": "tiny", "hidden": 64, "intermediate": 96,
           "experts": 4, "top_k": 2, "shared_experts": 0, "dtype": "bf16", "traffic": "uniform", "tokens": 64,
           "world_size": 2, "tokens_per_rank": 32, "ms": 10.04, "tflops": 0.0123, "pct_roofline": None,
           "peak_mb": None, "rel_err": 1e-3, "status": "ok", "note": ""}
    out = io.StringIO()
    Console(file=out, width=80).print(moe_benchmark.rows_table([row]))
    header, line = [ln for ln in out.getvalue().splitlines() if "T/rank" in ln or "expert_parallel" in ln]
    assert header.split()[:4] == ["level", "W", "T/rank", "T"] and line.split()[2:7] == ["2", "32", "64", "10.0",
                                                                                         "0.0123"]


def test_rows_table_puts_a_level_beside_ep_and_cuts_names_not_numbers():
    """`--levels ep,4` at W = 1 puts both in one case: the level's row has no W; at 80 columns a long level name
    is cut, its numbers are not."""
    ep = {"level": "ep", "level_name": "expert_parallel", "preset": "tiny", "hidden": 64, "intermediate": 96,
          "experts": 4, "top_k": 2, "shared_experts": 0, "dtype": "bf16", "traffic": "uniform", "tokens": 8192,
          "world_size": 1, "tokens_per_rank": 8192, "ms": 10.4812, "tflops": 551.123, "pct_roofline": 79.71,
          "peak_mb": 5759.3, "rel_err": 2.9e-3, "status": "ok", "note": ""}
    level = {key: value for key, value in ep.items() if key not in ("world_size", "tokens_per_rank")}
    level.update(level="peer-ogs", level_name="triton_kernels_matmul_ogs", quant_err=0.0657, note="a long note")
    out = io.StringIO()
    Console(file=out, width=80).print(moe_benchmark.rows_table([ep, level], width=80))
    lines = out.getvalue().splitlines()
    (line,) = [ln for ln in lines if ln.strip().startswith("peer-ogs")]
    assert all(len(ln) <= 80 for ln in lines)
    assert line.split()[2:] == ["-", "-", "8192", "10.5", "551", "79.7", "5,759", "2.9e-03", "6.6e-02", "ok", "[1]"]


def test_one_number_formatter():
    from cli.numbers import fmt

    assert [fmt(v) for v in (0.0123, 3.31e-05, 10.04, 1234.6, None)] == ["0.0123", "3.31e-05", "10.0", "1,235", "-"]
    assert not hasattr(moe_benchmark, "format_cell")


def test_list_keeps_brackets():
    result = bench("list", terminal_width=200)
    assert "w[expert_ids]" in result.output


def test_a_cpu_summary_has_no_empty_gpu_tables(tmp_path):
    result = run(tmp_path, "--levels", "0", "--tokens", "3", *FAST)
    assert result.exit_code == 0, result.output
    summary = (only_run_dir(tmp_path) / "summary.md").read_text()
    assert "% of the roofline" not in summary and "Peak GPU memory" not in summary
    assert "ran out of GPU memory" not in summary and "Time per forward, ms (median):" in summary


# 5. records -------------------------------------------------------------------------------------------------------
def test_environment_records_the_calls_that_ran(tmp_path):
    result = run(tmp_path, "--levels", "0", "--tokens", "3", *FAST)  # --repeats 3: never under 5 ran
    assert result.exit_code == 0, result.output
    run_dir = only_run_dir(tmp_path)
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["args"]["repeats"] == 3 and env["timed_calls"] == [6, 6]  # two rounds of at least 3
    summary = (run_dir / "summary.md").read_text()
    assert "timed calls per row: 6 (asked for 3" in summary
    assert env["args"]["timing_rounds"] == 2 and "timed in turn: 2 rounds" in summary


def test_a_gpu_run_leaves_latest_alone(tmp_path, monkeypatch):
    """A run on a (faked) GPU: only `aisp bench publish` may write LATEST.md."""
    import torch

    cpu = torch.device("cpu")
    real_benchmark_case, real_init_weights = moe_benchmark.benchmark_case, moe_benchmark.init_weights
    monkeypatch.setattr(moe_benchmark, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(moe_benchmark, "device_label", lambda device: "Fake GPU")
    monkeypatch.setattr(moe_benchmark, "measure_ceilings", lambda device: None)
    monkeypatch.setattr(moe_benchmark, "init_weights", lambda config, device: None)
    monkeypatch.setattr(moe_benchmark, "benchmark_case",
                        lambda classes, config, tokens, device, **kw: real_benchmark_case(
                            classes, config, tokens, cpu, **kw | {"weights": real_init_weights(config, cpu)}))
    result = run(tmp_path, "--levels", "0", "--tokens", "3", "--preset", "tiny", "--repeats", "3")
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "moe_journey").iterdir()
    assert json.loads((run_dir / "rows.jsonl").read_text())["status"] == "ok"
    assert not (tmp_path / "moe_journey" / "LATEST.md").exists()


def test_an_interrupted_summary_says_so(tmp_path):
    run_dir = damaged_copy(tmp_path)
    env = json.loads((run_dir / "environment.json").read_text()) | {"interrupted": True}
    (run_dir / "environment.json").write_text(json.dumps(env))
    assert bench("report", str(run_dir)).exit_code == 0
    assert (run_dir / "summary.md").read_text().splitlines()[2].startswith("**Interrupted:**")


# 6. level scripts speak the CLI's language -----------------------------------------------------------------------
def level_script(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "labs" / "moe_optimization_journey" / "level0_naive.py"),
                           *args], capture_output=True, text=True, env=os.environ | {"TRITON_INTERPRET": "1"})


def test_level_script_help_is_the_lesson():
    result = level_script("--help")
    assert result.returncode == 0 and "Level 0" in result.stdout and "--traffic" in result.stdout
    assert "--router" in result.stdout and "--profile" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--repeats", "0"], "--repeats ≥ 1"),
    (["--warmup", "-3"], "--warmup must be ≥ 0"),
    (["--preset", "hidden=8,intermediate=8,experts=2,top_k=3"], "cannot exceed experts (2)"),
    (["--traffic", "bursty"], "unknown traffic 'bursty'"),
])
def test_level_script_refuses_like_the_cli(args, message):
    result = level_script(*args, "--device", "cpu")
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["bench", "run", "-t", "moe_journey", "--warmup", "abc"], "Invalid value for '--warmup'"),
    (["bench", "run", "--no-such-option"], "No such option: --no-such-option"),
    (["bogus"], "No such command 'bogus'"),
])
def test_options_click_cannot_parse_are_one_line(args, message):
    """What typer's parser refuses (before any of the CLI's own checks) is one line too, not its framed box."""
    result = subprocess.run([sys.executable, "-m", "cli.aisp", *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr and "--help" in result.stderr, result.stderr


def test_level_script_parse_errors_are_one_line():
    result = level_script("--warmup", "abc")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "invalid int value: 'abc'" in result.stderr and "--help" in result.stderr


def test_level_script_takes_an_inline_shape_traffic_and_router():
    result = level_script("--device", "cpu", "--preset", "hidden=32,intermediate=48,experts=4,top_k=2",
                          "--tokens", "5", "--traffic", "hot", "--router", "switch", "--profile", "--repeats", "3")
    assert result.returncode == 0, result.stderr
    assert "custom-H32-I48-E4-K2, hot(50% of tokens), switch router (H=32" in " ".join(result.stdout.split())


# 3. the Makefile --------------------------------------------------------------------------------------------------
def make_dry_run(tmp_path, missing: str, *args) -> str:
    """`make -n` with a python that imports everything but the module `missing`."""
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\ncase "$2" in *{missing}*) exit 1;; esac\nexit 0\n')
    python.chmod(0o755)
    result = subprocess.run(["make", "-n", "-C", str(REPO), *args, f"SYSTEM_PYTHON={python}"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_test_needs_pytest(tmp_path):
    assert ".venv/bin/python -m pytest" in make_dry_run(tmp_path, "pytest", "test")
    assert f"{tmp_path}/python -m pytest" in make_dry_run(tmp_path, "nothing-missing", "test")


def test_make_level_runs_a_level_script(tmp_path):
    out = make_dry_run(tmp_path, "nothing-missing", "level", "N=4", "ARGS=--preset small --tokens 256")
    assert f"{tmp_path}/python labs/moe_optimization_journey/level4_grouped.py --preset small --tokens 256" in out



def test_make_level_runs_each_levels_own_script():
    """`make level N=key` for every key `--levels` takes (and ep): the file that defines that level, and a missing
    or unknown key is one line and exit 2."""
    from cli.aisp import journey

    repo = Path(__file__).resolve().parent.parent
    levels = {**journey().load_levels(), "ep": journey().expert_parallel().ExpertParallelMoE}
    for key, cls in levels.items():
        dry_run = subprocess.run(["make", "-s", "-n", "level", f"N={key}", "BENCH_SETUP="], cwd=repo,
                                 capture_output=True, text=True)
        script = Path(sys.modules[cls.__module__].__file__).relative_to(repo)
        assert dry_run.returncode == 0 and str(script) in dry_run.stdout.splitlines()[-1], (key, dry_run.stdout)
    for key in ("", "99", "ep_benchmark"):
        result = subprocess.run(["make", "-s", "level", f"N={key}", "BENCH_SETUP="], cwd=repo, capture_output=True,
                                text=True)
        assert result.returncode == 2 and result.stderr.startswith(f"make level: no level N={key};"), result.stderr


@pytest.mark.parametrize("run", ["20261125T103910Z-nvidia-h100-80gb-hbm3", "20261127T005427Z-nvidia-h100-80gb-hbm3"])
def test_make_report_leaves_a_committed_run_as_committed(run, tmp_path):
    """`make report RUN=...` on a committed run rewrites its summary.md byte for byte (it is generated from the
    rows by the code committed with it), so that rebuilding a run's report.html leaves git's tree clean."""
    import shutil

    copy = tmp_path / run
    shutil.copytree(RESULTS / run, copy, ignore=shutil.ignore_patterns("*.png"))
    assert bench("report", str(copy)).exit_code == 0
    assert (copy / "summary.md").read_text() == (RESULTS / run / "summary.md").read_text()


def test_a_level_scripts_help_fits_the_screen():
    """--help prints the lesson refilled to the terminal's width, as `aisp lab show` does (the docstrings are 120
    columns wide)."""
    script = REPO / "labs" / "moe_optimization_journey" / "level9_persistent_tma.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "80"})
    assert result.returncode == 0 and "Level 9" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
