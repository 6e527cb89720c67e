"""What trying the lab as a new user found, each pinned by a test: the CLI's edges answer in one line (exit 2 for
bad input), write nothing before the request is known to be good, and a setup too big for memory is a result
row, never a traceback."""

import json
import sys

import pytest
from test_cli import FAST, bench, finished_run, gpu_copy, run_dirs  # noqa: F401  (finished_run: a fixture)

import cli.aisp
import moe_benchmark


def test_compare_refuses_one_run_twice(finished_run):  # noqa: F811
    result = bench("compare", str(finished_run), f"{finished_run}/")
    assert result.exit_code == 2 and "same run folder" in result.output


def test_compare_refuses_a_run_without_rows(finished_run, tmp_path):  # noqa: F811
    empty = tmp_path / "stopped-early"
    empty.mkdir()
    (empty / "rows.jsonl").write_text("")
    result = bench("compare", str(finished_run), str(empty))
    assert result.exit_code == 2 and "has no rows" in result.output


def test_compare_says_when_no_case_is_shared(finished_run, tmp_path):  # noqa: F811
    other = tmp_path / "other-preset"
    other.mkdir()
    rows = [json.loads(line) | {"preset": "elsewhere"}
            for line in (finished_run / "rows.jsonl").read_text().splitlines()]
    (other / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = bench("compare", str(finished_run), str(other))
    assert result.exit_code == 2 and "no case was timed in both runs" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_compare_never_overwrites_a_file(finished_run, tmp_path):  # noqa: F811
    summary = finished_run / "summary.md"
    before = summary.read_bytes()
    result = bench("compare", str(finished_run), str(finished_run), "--markdown", str(summary))
    assert result.exit_code == 2 and "exists" in result.output and summary.read_bytes() == before


def test_out_is_refused_inside_a_run_or_as_the_target_folder(finished_run):  # noqa: F811
    for out in (finished_run, finished_run / "deeper", finished_run.parent):
        result = bench("run", "-t", "moe_journey", "--levels", "4", "--preset", "tiny", "--tokens", "8",
                       "--out", str(out))
        assert result.exit_code == 2 and "--out is the results root" in result.output, result.output
    assert not (finished_run / "deeper").exists() and not (finished_run / "moe_journey").exists()


def test_publish_checks_the_readme_before_writing_anything(finished_run, tmp_path):  # noqa: F811
    run_dir = gpu_copy(finished_run, tmp_path / "moe_journey" / "20260101T000000Z-nvidia-test")
    for readme in (tmp_path / "missing.md", tmp_path):
        result = bench("publish", str(run_dir), "--readme", str(readme))
        assert result.exit_code == 2 and "is not a file" in result.output
    assert not (run_dir.parent / "LATEST.md").exists() and not (run_dir / "summary.md").exists()


def test_publish_takes_each_run_once(finished_run, tmp_path):  # noqa: F811
    run_dir = gpu_copy(finished_run, tmp_path / "moe_journey" / "20260101T000000Z-nvidia-test")
    readme = tmp_path / "README.md"
    texts = []
    for given in ([run_dir], [run_dir, run_dir]):
        readme.write_text("<!-- results:start -->\n<!-- results:end -->\n")
        assert bench("publish", *map(str, given), "--readme", str(readme)).exit_code == 0
        texts.append(readme.read_text())
    assert texts[0] == texts[1]


@pytest.mark.parametrize("args, message", [
    (["--levels", "4", "--world-size", "2"], "level ep's options"),
    (["--levels", "4", "--ep-chunks", "2"], "level ep's options"),
    (["--levels", "4", "--world-size", "abc"], "level ep's options"),
    (["--preset", ""], "unknown preset ''"),
    (["--tokens", ""], "whole numbers"),
    (["--out", " "], "--out is empty"),
])
def test_empty_or_misplaced_options_are_refused(args, message, tmp_path):
    result = bench("run", "-t", "moe_journey", "--out", str(tmp_path), *FAST, *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "moe_journey").exists()


def test_repeated_presets_and_traffic_run_once(tmp_path):
    result = bench("run", "-t", "moe_journey", "--levels", "0", "--tokens", "3", "--out", str(tmp_path), *FAST,
                   "--preset", "tiny,tiny", "--traffic", "uniform,uniform")
    assert result.exit_code == 0, result.output
    (run_dir,) = run_dirs(tmp_path)
    assert len((run_dir / "rows.jsonl").read_text().splitlines()) == 1


def test_weights_too_big_for_memory_are_oom_rows(tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes")

    monkeypatch.setattr(moe_benchmark, "init_weights", out_of_memory)
    result = bench("run", "-t", "moe_journey", "--levels", "0,4", "--tokens", "3,9", "--out", str(tmp_path), *FAST)
    assert result.exit_code == 0, result.output
    (run_dir,) = run_dirs(tmp_path)
    rows = [json.loads(line) for line in (run_dir / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(row["status"] == "oom" and "tiny's weights" in row["note"] for row in rows)


def test_a_run_with_a_failed_row_is_written_and_exits_1(tmp_path, monkeypatch):
    wrong = moe_benchmark.CheckResult(rel_err=0.5, passed=False, message="rel. error 0.5 over 0.02")
    monkeypatch.setattr(moe_benchmark, "compare_to_reference", lambda *args, **kwargs: wrong)
    result = bench("run", "-t", "moe_journey", "--levels", "4", "--tokens", "3", "--out", str(tmp_path), *FAST)
    assert result.exit_code == 1 and "1 of 1 rows failed" in result.output, result.output
    (run_dir,) = run_dirs(tmp_path)
    assert (run_dir / "summary.md").exists() and "finished_utc" in (run_dir / "environment.json").read_text()


def test_an_environment_that_is_not_an_object_is_refused(finished_run, tmp_path):  # noqa: F811
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "rows.jsonl").write_text((finished_run / "rows.jsonl").read_text())
    (damaged / "environment.json").write_text("[1, 2]")
    result = bench("report", str(damaged))
    assert result.exit_code == 2 and "not a JSON object" in result.output


def test_an_unforeseen_error_is_one_line(finished_run, monkeypatch, capsys):  # noqa: F811
    from cli import report

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug no check foresaw")

    monkeypatch.setattr(report, "write_report", broken)
    monkeypatch.setattr(sys, "argv", ["aisp", "bench", "report", str(finished_run)])
    with pytest.raises(SystemExit) as exit_info:
        cli.aisp.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert "ZeroDivisionError: a bug no check foresaw" in err and "--debug" in err


def test_a_row_with_a_wrong_type_names_its_field(finished_run, tmp_path):  # noqa: F811
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    first, *rest = (finished_run / "rows.jsonl").read_text().splitlines()
    (damaged / "rows.jsonl").write_text("\n".join([json.dumps(json.loads(first) | {"tokens": "x"}), *rest]) + "\n")
    result = bench("report", str(damaged))
    assert result.exit_code == 2 and "line 1" in result.output and "field 'tokens' holds 'x'" in result.output


def test_one_case_compared_in_markdown_has_no_empty_column(finished_run, tmp_path):  # noqa: F811
    faster = tmp_path / "faster"
    faster.mkdir()
    rows = [json.loads(line) for line in (finished_run / "rows.jsonl").read_text().splitlines()]
    (faster / "rows.jsonl").write_text("".join(json.dumps(row | {"ms": row["ms"] / 2}) + "\n" for row in rows))
    table = tmp_path / "compare.md"
    assert bench("compare", str(finished_run), str(faster), "--markdown", str(table)).exit_code == 0
    header = table.read_text().split("\n\n")[1].splitlines()[0]
    assert [cell.strip() for cell in header.strip("|").split("|")][:3] == ["level", "T", "A ms"]
    assert "| 2.00x |" in table.read_text()


def damaged_copy_of(finished_run, tmp_path, rows_text: str | bytes):
    damaged = tmp_path / "damaged"
    damaged.mkdir(parents=True)
    (damaged / "environment.json").write_text((finished_run / "environment.json").read_text())
    rows = damaged / "rows.jsonl"
    if isinstance(rows_text, bytes):
        rows.write_bytes(rows_text)
    else:
        rows.write_text(rows_text)
    return damaged


def test_rows_that_are_not_text_or_lack_their_time_are_refused(finished_run, tmp_path):  # noqa: F811
    binary = damaged_copy_of(finished_run, tmp_path / "a", bytes(range(256)))
    for command in (["report", str(binary)], ["compare", str(finished_run), str(binary)]):
        result = bench(*command)
        assert result.exit_code == 2 and "not text" in result.output, result.output
    first, *rest = (finished_run / "rows.jsonl").read_text().splitlines()
    timeless_row = {field: value for field, value in json.loads(first).items() if field != "ms"}
    timeless = damaged_copy_of(finished_run, tmp_path / "b", "\n".join([json.dumps(timeless_row), *rest]))
    for command in (["report", str(timeless)], ["compare", str(finished_run), str(timeless)]):
        result = bench(*command)
        assert result.exit_code == 2 and "line 1" in result.output and "needs its time" in result.output
    for ms in (0.0, -1.0, float("nan")):  # a report would divide by it, or print a negative speedup
        bad = damaged_copy_of(finished_run, tmp_path / f"ms{ms}",
                              "\n".join([json.dumps({**timeless_row, "ms": ms}), *rest]))
        result = bench("report", str(bad))
        assert result.exit_code == 2 and "positive number" in result.output, result.output


def test_a_folder_or_rows_of_another_lab_are_refused(finished_run, tmp_path):  # noqa: F811
    env = json.loads((finished_run / "environment.json").read_text())
    foreign = damaged_copy_of(finished_run, tmp_path / "env", (finished_run / "rows.jsonl").read_text())
    (foreign / "environment.json").write_text(json.dumps({**env, "target": "other_lab"}))
    result = bench("report", str(foreign))
    assert result.exit_code == 2 and "not a moe_journey run" in result.output
    first, *rest = (finished_run / "rows.jsonl").read_text().splitlines()
    other_rows = damaged_copy_of(finished_run, tmp_path / "rows",
                                 "\n".join([json.dumps({**json.loads(first), "target": "other_lab"}), *rest]))
    result = bench("compare", str(finished_run), str(other_rows))
    assert result.exit_code == 2 and "not of moe_journey" in result.output


def test_compare_reads_an_interrupted_runs_rows_as_report_does(finished_run, tmp_path):  # noqa: F811
    text = (finished_run / "rows.jsonl").read_text()
    cut = damaged_copy_of(finished_run, tmp_path, text[:-40])  # the last row cut mid-write
    result = bench("compare", str(finished_run), str(cut))
    assert result.exit_code == 0 and "skipped it" in result.output, result.output


def test_a_failed_ep_launch_names_the_workers_error():
    output = ("[rank0]: Traceback (most recent call last):\n"
              "[rank0]: RuntimeError: DefaultCPUAllocator: can't allocate memory\n"
              "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n")
    assert cli.aisp.launch_failure(output, 1) == "RuntimeError: DefaultCPUAllocator: can't allocate memory"
    assert cli.aisp.launch_failure("", 3) == "torchrun exited with code 3"


def test_a_report_leaves_no_plot_of_an_earlier_one(finished_run, tmp_path):  # noqa: F811
    emptied = damaged_copy_of(finished_run, tmp_path, "")
    (emptied / "time_tiny.png").write_bytes((finished_run / "time_tiny.png").read_bytes())
    result = bench("report", str(emptied))
    assert result.exit_code == 0 and not list(emptied.glob("*.png"))
    assert "No rows were recorded." in (emptied / "summary.md").read_text()


def test_brackets_in_a_name_or_path_are_plain_text(tmp_path):
    """rich reads [...] as markup: a preset named "[/x]" once crashed the progress line and left half a run."""
    out = tmp_path / "[o]ut"
    result = bench("run", "-t", "moe_journey", "--levels", "4", "--tokens", "2", "--out", str(out), *FAST,
                   "--preset", "hidden=8,intermediate=8,experts=2,top_k=1,name=[/x]")
    assert result.exit_code == 0, result.output
    (run_dir,) = run_dirs(out)
    assert (run_dir / "summary.md").exists() and "[/x] (H=8" in result.output


def test_the_speedup_over_the_level_built_on_skips_levels_the_run_lacks():
    """7 builds on 4; 9 builds on 8, which the run lacks, and 8 on 7, which it has; 6 builds on 4 too, and the peer
    on 4, as lab show compares it."""
    import pandas as pd

    from cli import report

    df = pd.DataFrame({"level": [4, 6, 7, 9, "peer"],
                       "label": ["4 grouped", "6 compiled", "7 triton", "9 tma", "peer: torch"]})
    assert [report.previous_level_label(df, row) for _, row in df.iterrows()] == [None, "4 grouped", "4 grouped",
                                                                                   "7 triton", "4 grouped"]
    assert report.previous_level_caption(df) == ("Speedup over the level each builds on (6 over 4, 7 over 4, 9 over 7, "
                                                 "peer over 4)")


def test_profile_with_level_ep_alone_is_refused(tmp_path):
    result = bench("run", "-t", "moe_journey", "--levels", "ep", "--profile", "--out", str(tmp_path), *FAST)
    assert result.exit_code == 2 and "drop --profile" in result.output and not list(tmp_path.iterdir())


def test_more_cpu_processes_than_the_machine_can_start_are_refused(tmp_path):
    result = bench("run", "-t", "moe_journey", "--levels", "ep", "--world-size", "1,512", "--out", str(tmp_path),
                   *FAST)
    assert result.exit_code == 2 and "CPU cores" in result.output and not list(tmp_path.iterdir())


@pytest.mark.parametrize("low, high", [(0.255, 0.29), (0.99, 1.13), (0.04, 3.0), (0.03, 300.0)])
def test_log_axes_label_plain_numbers_at_any_span(low, high):
    """A log value axis spanning less than a decade gets labels too, and none reads like 2.9×10⁻¹."""
    import matplotlib.pyplot as plt

    from cli import report

    fig, ax = plt.subplots()
    ax.plot([1, 2], [low, high])
    ax.set_yscale("log")
    report.log_value_axis(ax.yaxis, "×")
    fig.canvas.draw()
    labels = [tick.get_text() for tick in ax.get_yticklabels(which="both") if tick.get_text()]
    plt.close(fig)
    assert len(labels) >= 2 and all(label.endswith("×") and "10^" not in label and "$" not in label
                                    for label in labels), labels
