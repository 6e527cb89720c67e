"""A CPU run tells what it measured: its summary and page open with what a CPU can and cannot show, a level
checked in Triton's interpreter is `checked` in the time table and absent from the speed tables and plots, and a
bare run takes its preset, token counts and threads from cli/options.py's one table."""

import dataclasses
import json
import re
import sys

import pytest
import torch
from typer.testing import CliRunner

import moe_benchmark
from cli import options, report
from cli.aisp import app

runner = CliRunner()


@pytest.fixture
def restore_threads():
    """A CPU run sets torch's threads for the whole process (DEFAULTS["cpu"].threads); the suite keeps its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("results")
    result = runner.invoke(app, ["bench", "run", "-t", "moe_journey", "--levels", "0,4,5,7", "--tokens", "5,17",
                                 "--device", "cpu", "--preset", "tiny", "--repeats", "3", "--warmup", "1",
                                 "--out", str(out)], catch_exceptions=False)
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    (run_dir,) = (out / "moe_journey").iterdir()
    return run_dir


def between(text: str, start: str, end: str) -> str:
    return text[text.index(start):text.index(end, text.index(start))]


def test_cpu_summary_opens_with_what_a_cpu_run_shows(cpu_run):
    env = json.loads((cpu_run / "environment.json").read_text())
    intro = report.cpu_intro(env, report.load_rows(cpu_run))
    assert intro.count(". ") == 1 and "levels 7-10" in intro and f"on {options.DEFAULTS['cpu'].threads} thread" in intro
    summary = (cpu_run / "summary.md").read_text()
    assert summary.split("\n\n")[1] == intro  # right under the title
    page = (cpu_run / "report.html").read_text()
    assert page.index(report_html_text(intro)) < page.index('id="environment"')


def report_html_text(text: str) -> str:
    from cli.report_html import esc

    return esc(text)


def test_checked_level_is_in_the_time_table_only(cpu_run):
    summary = re.sub(r" +", " ", (cpu_run / "summary.md").read_text())
    assert "| 7 triton_grouped | checked | checked |" in summary
    speed = between(summary, "Speedup over level 0", "Notes from the rows")
    assert "triton_grouped" not in speed and "| 4 grouped |" in speed
    assert "- 5 cudagraphs: no CUDA graph on the CPU" in speed  # the GPU idea without a CPU counterpart, said
    assert "- 7 triton_grouped, 5 tokens: checked: checked in Triton's interpreter" in summary
    page = (cpu_run / "report.html").read_text()
    assert '<span class="status">checked</span>' in page
    assert "triton_grouped" not in between(page, "<h3>Speedup over level 0", "<h3>Notes from the rows")


def test_checked_level_is_left_out_of_the_speedup_plot(cpu_run, monkeypatch):
    drawn = {}
    plot_speedup, strip = report.plot_speedup, report.not_timed_strip
    monkeypatch.setattr(report, "plot_speedup", lambda df, *a: drawn.setdefault("speedup", set(df["label"]))
                        and plot_speedup(df, *a))
    monkeypatch.setattr(report, "not_timed_strip", lambda ax, df, colors: drawn.setdefault(
        "strip", set(df.loc[df["status"].isin(report.STATUS_MARKER), "label"])) and strip(ax, df, colors))
    report.write_report(cpu_run)
    assert drawn["speedup"] == {"0 naive", "4 grouped", "5 cudagraphs"}
    assert drawn["strip"] == {"7 triton_grouped"}  # the time plot says why it has no line


def test_a_bare_cpu_run_takes_the_one_table(tmp_path, monkeypatch, restore_threads):
    monkeypatch.setitem(options.DEFAULTS, "cpu", dataclasses.replace(options.DEFAULTS["cpu"], preset="tiny",
                                                                    tokens="6", threads=1))
    torch.set_num_threads(2)
    result = runner.invoke(app, ["bench", "run", "-t", "moe_journey", "--levels", "0", "--device", "cpu",
                                 "--repeats", "3", "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "moe_journey").iterdir()
    (row,) = [json.loads(line) for line in (run_dir / "rows.jsonl").read_text().splitlines()]
    env = json.loads((run_dir / "environment.json").read_text())
    assert (row["preset"], row["tokens"], env["cpu_threads"]) == ("tiny", 6, 1)
    assert env["args"]["warmup"] == options.DEFAULTS["cpu"].warmup


def test_a_level_script_takes_the_one_table(monkeypatch, capsys, levels, restore_threads):
    monkeypatch.setitem(options.DEFAULTS, "cpu", dataclasses.replace(options.DEFAULTS["cpu"], preset="tiny",
                                                                    script_tokens="7", threads=1))
    monkeypatch.setattr(sys, "argv", ["level4_grouped.py", "--device", "cpu", "--repeats", "3"])
    with pytest.raises(SystemExit) as exit_:
        moe_benchmark.run_level_script(levels["4"])
    assert exit_.value.code == 0 and torch.get_num_threads() == 1
    out = capsys.readouterr().out
    assert "tiny (H=64" in out and re.search(r"\n 4 grouped +7 ", out)


def test_a_level_script_with_a_failed_row_says_so_on_stderr(monkeypatch, capsys, levels, restore_threads):
    monkeypatch.setitem(options.DEFAULTS, "cpu", dataclasses.replace(options.DEFAULTS["cpu"], preset="tiny",
                                                                    script_tokens="7", threads=1))
    wrong = moe_benchmark.CheckResult(rel_err=0.5, passed=False, message="rel. error 0.5 over 0.02")
    monkeypatch.setattr(moe_benchmark, "compare_to_reference", lambda *args, **kwargs: wrong)
    monkeypatch.setattr(sys, "argv", ["level4_grouped.py", "--device", "cpu", "--repeats", "3"])
    with pytest.raises(SystemExit) as exit_:
        moe_benchmark.run_level_script(levels["4"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1
    assert err.startswith("level4_grouped.py: 1 of 1 rows failed; the first: wrong result")


def test_the_cpu_defaults_parse():
    cpu = options.DEFAULTS["cpu"]
    assert options.parse_presets(cpu.preset)[0].dtype == "fp32"  # the CPU's own arithmetic, no bf16 emulation
    assert options.parse_counts(cpu.tokens, "--tokens") and options.parse_counts(cpu.script_tokens, "--tokens")
