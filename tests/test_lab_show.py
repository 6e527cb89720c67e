"""`aisp lab show`: a level's lesson, its code's diff, its claims and its measured row, read from committed runs."""

import json
import re
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import labs.moe_optimization_journey as journey
from cli.aisp import REPO_ROOT, app
from cli.report import fmt

runner = CliRunner()
H100_RUN = REPO_ROOT / "results" / "moe_journey" / "20261125T111956Z-nvidia-h100-80gb-hbm3"
GROUPED = journey.load_levels()["4"]


def show(*args):
    return runner.invoke(app, ["lab", "show", *args], catch_exceptions=False)


def words(text: str) -> str:
    """The text with its line breaks and runs of spaces made single spaces: the lesson is refilled to the screen."""
    return " ".join(text.split())


@pytest.fixture
def h100_results(tmp_path):
    """A results folder holding only the committed H100 run, so that a GPU run committed later does not change what
    these tests read."""
    run_dir = tmp_path / "moe_journey" / H100_RUN.name
    run_dir.mkdir(parents=True)
    for name in ("environment.json", "rows.jsonl"):
        shutil.copy(H100_RUN / name, run_dir / name)
    return tmp_path


def journey_row(level: str, tokens: int) -> dict:
    rows = [json.loads(line) for line in (H100_RUN / "rows.jsonl").read_text().splitlines()]
    (row,) = [r for r in rows if str(r["level"]) == level and r["preset"] == "journey" and r["tokens"] == tokens]
    return row


class StubClaims:
    """What a level's `claims` looks like: formulas in the shape letters and their values at a shape."""

    launches = "3·E + 4"
    syncs = "1"
    extra_bytes = "T·K·(2H + I)·2"

    def evaluate(self, config, num_tokens):
        pairs = num_tokens * config.top_k
        return {"launches": 3 * config.num_experts + 4, "syncs": 1,
                "extra_mb": pairs * (2 * config.hidden + config.intermediate) * 2 / 2**20}


def test_show_level_4(h100_results, monkeypatch):
    monkeypatch.setattr(GROUPED, "claims", StubClaims(), raising=False)
    result = show("4", "--results", str(h100_results))
    assert result.exit_code == 0, result.output
    lesson_first_line = sys.modules[GROUPED.__module__].__doc__.splitlines()[0]
    assert words(lesson_first_line) in words(result.output)
    assert any(line.startswith("+") and "argsort" in line for line in result.output.splitlines())
    assert "--- level 3" in result.output and "+++ level 4" in result.output
    # the claims: each formula and its value on journey (H=1024, I=2048, E=8, K=2) at T=8192
    assert re.search(r"launches +3·E \+ 4 +28\n", result.output)
    assert re.search(r"extra memory +T·K·\(2H \+ I\)·2 +128 MiB\n", result.output)
    # the measured row, the level before it and the peer from the same run
    row, before, peer = journey_row("4", 8192), journey_row("3", 8192), journey_row("peer", 8192)
    assert f"{fmt(row['ms'])} ms" in result.output and "NVIDIA H100 80GB HBM3" in result.output
    assert H100_RUN.name in result.output
    assert f"{before['ms'] / row['ms']:.2f}x" in result.output and f"{peer['ms'] / row['ms']:.2f}x" in result.output


def test_a_level_without_claims_shows_none(h100_results, monkeypatch):
    monkeypatch.setattr(GROUPED, "claims", None, raising=False)
    result = show("4", "--results", str(h100_results))
    assert result.exit_code == 0 and "Claimed" not in result.output


def test_level_0_builds_on_no_level(h100_results):
    result = show("0", "--results", str(h100_results))
    assert result.exit_code == 0, result.output
    assert "no level it builds on" in result.output and "+++" not in result.output


def test_no_such_row_says_where_the_level_ran(h100_results):
    result = show("4", "--tokens", "77", "--results", str(h100_results))
    assert result.exit_code == 0, result.output
    assert "No GPU run" in words(result.output) and "T=77" in result.output
    assert "It ran at: deepseek-v3 T=1,64,512,2048,8192,16384,32768; journey T=1,64," in words(result.output)


def test_show_lists_every_level():
    result = show()
    assert result.exit_code == 0, result.output
    listed = {tuple(line.split()[:2]) for line in result.output.splitlines() if line.strip()}
    levels = {**journey.load_levels(), "ep": journey.expert_parallel().ExpertParallelMoE}
    assert {(key, cls.name) for key, cls in levels.items()} <= listed


def test_headline_speedups_of_the_h100_run(h100_results):
    result = show("--results", str(h100_results))
    assert result.exit_code == 0, result.output
    assert "T=2048" in result.output and H100_RUN.name in result.output  # level 1 and 2 OOM above 2048
    (line,) = [line for line in result.output.splitlines() if line.split()[:2] == ["4", "grouped"]]
    assert f"{journey_row('3', 2048)['ms'] / journey_row('4', 2048)['ms']:.2f}x" in line


def test_the_overview_reads_the_published_run(h100_results):
    """A run newer than the published one (a decode run of two levels) does not blank the others' speedups; without
    a published run, the newest is read."""
    decode_run = h100_results / "moe_journey" / "20261126T000000Z-nvidia-h100-80gb-hbm3"
    decode_run.mkdir()
    shutil.copy(H100_RUN / "environment.json", decode_run / "environment.json")
    rows = [line for line in (H100_RUN / "rows.jsonl").read_text().splitlines()
            if json.loads(line)["level"] in (7, 8)]
    (decode_run / "rows.jsonl").write_text("\n".join(rows) + "\n")
    assert decode_run.name in show("--results", str(h100_results)).output
    (h100_results / "moe_journey" / "LATEST.md").write_text(
        f"<!-- copied from {H100_RUN.name}/summary.md by aisp; do not edit -->\n# the run\n")
    result = show("--results", str(h100_results))
    assert result.exit_code == 0, result.output
    assert H100_RUN.name in result.output and decode_run.name not in result.output


def test_unknown_level_is_one_line_and_exit_2():
    result = show("42")
    assert result.exit_code == 2
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1 and "'42'" in result.stderr


def test_help_imports_no_torch():
    script = ("import sys; from typer.testing import CliRunner; from cli.aisp import app; "
              "result = CliRunner().invoke(app, ['lab', 'show', '--help']); "
              "assert result.exit_code == 0 and '--tokens' in result.output, result.output; "
              "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, check=True)


def test_show_the_fp8_peer_diffs_it_from_the_peer(h100_results):
    result = show("peer-fp8", "--results", str(h100_results))
    assert result.exit_code == 0, result.output
    assert "--- level peer" in result.output and "+++ level peer-fp8" in result.output
    assert any(line.startswith("+") and "_scaled_grouped_mm" in line for line in result.output.splitlines())
    assert "No GPU run" in result.output  # the committed H100 run predates it


def test_an_fp8_row_is_compared_with_both_peers(h100_results):
    """Level 10 beside level 9, the bf16 peer and the FP8 peer, from a run that has all four."""
    rows_path = next(h100_results.glob("moe_journey/*/rows.jsonl"))
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    eight, peer = journey_row("8", 8192), journey_row("peer", 8192)  # the committed run predates level 9
    nine = dict(eight, level=9, level_name="persistent_tma")
    added = [nine, dict(nine, level=10, level_name="fp8", ms=nine["ms"] / 2, quant_err=0.064),
             dict(peer, level="peer-fp8", level_name="torch_scaled_grouped_mm", ms=nine["ms"], quant_err=0.064)]
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows + added))
    result = show("10", "--results", str(h100_results))
    assert result.exit_code == 0, result.output
    assert re.search(r"× level 9 +2\.00x", result.output) and re.search(r"× FP8 peer +2\.00x", result.output)
    assert re.search(r"× peer +[0-9.]+x", result.output)


def test_level_9_is_compared_with_the_matmul_ogs_peer(h100_results):
    """Level 9 beside its yardstick, OpenAI's triton_kernels, where the run has it, and says so where it has not."""
    rows_path = next(h100_results.glob("moe_journey/*/rows.jsonl"))
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    nine = dict(journey_row("8", 8192), level=9, level_name="persistent_tma")  # the committed run predates level 9
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows + [nine]))
    assert re.search(r"× matmul_ogs peer +not in this run", show("9", "--results", str(h100_results)).output)
    ogs = dict(nine, level="peer-ogs", level_name="triton_kernels_matmul_ogs", ms=nine["ms"] * 1.25)
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows + [nine, ogs]))
    result = show("9", "--results", str(h100_results))
    assert result.exit_code == 0, result.output
    assert re.search(r"× matmul_ogs peer +1\.25x", result.output)


def test_a_row_with_cublas_beside_it_shows_its_share(h100_results):
    """A row timed beside cuBLAS's dense GEMMs on the same FLOPs says what share of their rate it reached."""
    rows_path = next(h100_results.glob("moe_journey/*/rows.jsonl"))
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    for row in rows:
        if str(row["level"]) == "4" and row["preset"] == "journey" and row["tokens"] == 8192:
            row["dense_gemm_ms"] = row["ms"] * 0.8
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = show("4", "--results", str(h100_results))
    assert result.exit_code == 0, result.output
    assert re.search(r"cuBLAS, same FLOPs +80\.0%", result.output)
    assert "cuBLAS, same FLOPs" not in show("3", "--results", str(h100_results)).output  # not timed beside it


def test_a_lesson_is_refilled_with_its_numbered_items_and_bullets_kept():
    """On a projector's 80 columns each numbered item and each bullet starts its own line and its continuations
    stay under its text; a bullet is not run into the paragraph before it."""
    from cli.lab import reflowed

    lesson = ("The idea\n"
              "    A paragraph that ends in a list:\n"
              "    1. An item whose text goes on past one line of eighty columns, so that it has to be\n"
              "       refilled under its own text.\n"
              "       - A bullet inside the item, long enough to wrap once more at eighty columns when it\n"
              "         is refilled.\n"
              "       - A second bullet.\n"
              "       The item's text again, after its bullets.\n"
              "    - A bullet of the section body.\n")
    lines = reflowed(lesson, 80)
    assert lines[1] == "    A paragraph that ends in a list:"
    starts = [line for line in lines if line.lstrip().startswith(("1. ", "- "))]
    assert [line[:9] for line in starts] == ["    1. An", "       - ", "       - ", "    - A b"]
    for line in lines[lines.index(starts[1]) + 1:lines.index(starts[2])]:
        assert line.startswith(" " * 9) and not line.startswith(" " * 10)  # under the bullet's text
    assert "       The item's text again, after its bullets." in lines
    assert all(len(line) <= 80 for line in lines)


def test_the_overview_compares_with_the_nearest_level_the_run_has(h100_results):
    """A run of levels 4 and 8 only: 8 builds on 7, which builds on 4, so 8 is compared with 4, said so; the levels
    the run lacks "-"; 4 is its first."""
    run_dir = h100_results / "moe_journey" / H100_RUN.name
    rows = [line for line in (H100_RUN / "rows.jsonl").read_text().splitlines()
            if json.loads(line)["level"] in (4, 8)]
    (run_dir / "rows.jsonl").write_text("\n".join(rows) + "\n")
    result = show("--results", str(h100_results))
    assert result.exit_code == 0, result.output
    line = {ln.split()[0]: ln.split()[2:4] for ln in result.output.splitlines() if ln.split()[:1] in
            (["3"], ["4"], ["8"])}
    assert line["3"][0] == "-" and line["4"][0] == "first" and line["8"][1] == "(vs", line
    T = int(re.search(r"T=(\d+)", result.output).group(1))
    assert line["8"][0] == f"{journey_row('4', T)['ms'] / journey_row('8', T)['ms']:.2f}x"


def test_levels_5_6_and_7_are_compared_with_level_4_the_level_they_build_on(h100_results):
    """In the diff, the overview and a level's row alike: the side roads 5 and 6 and level 7 build on level 4."""
    assert "level 4 (level4_grouped.py)" in show("6").output
    overview = {ln.split()[0]: ln.split()[2:4] for ln in show("--results", str(h100_results)).output.splitlines()
                if ln.split()[:1] in (["5"], ["6"], ["7"])}
    assert all(len(cells) < 2 or cells[1] != "(vs" for cells in overview.values()), overview
    assert "× level 4" in show("7", "--results", str(h100_results)).output


def test_a_levels_row_comes_from_the_published_run(h100_results):
    """A newer run that has level 4 at the case but not the levels it is compared with does not hide the published
    run's row."""
    newer = h100_results / "moe_journey" / "20261126T000000Z-nvidia-h100-80gb-hbm3"
    newer.mkdir()
    shutil.copy(H100_RUN / "environment.json", newer / "environment.json")
    rows = [line for line in (H100_RUN / "rows.jsonl").read_text().splitlines() if json.loads(line)["level"] == 4]
    (newer / "rows.jsonl").write_text("\n".join(rows) + "\n")
    assert newer.name in show("4", "--tokens", "2048", "--results", str(h100_results)).output  # newest, unpublished
    (h100_results / "moe_journey" / "LATEST.md").write_text(
        f"<!-- copied from {H100_RUN.name}/summary.md by aisp; do not edit -->\n# the run\n")
    result = show("4", "--tokens", "2048", "--results", str(h100_results))
    assert result.exit_code == 0, result.output
    assert H100_RUN.name in result.output and newer.name not in result.output
    assert "× level 3" in result.output and "not in this run" not in result.output.split("× level 3")[1].split("\n")[0]


def test_a_host_bound_row_is_marked(h100_results):
    rows_path = next((h100_results / "moe_journey").glob("*/rows.jsonl"))
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    for row in rows:
        row["host_bound"] = row["preset"] == "journey" and row["tokens"] == 8192 and str(row["level"]) == "4"
    rows_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = show("4", "--results", str(h100_results))
    assert result.exit_code == 0 and "(h): host-bound" in words(result.output), result.output
    assert "note host-bound (" in words(result.output)  # the note that says why


def test_the_overview_gives_each_idea_whole_at_80_columns():
    result = show()
    said = words(result.output)
    assert all(" ".join(cls.summary.split()) in said for cls in journey.load_levels().values()), said


def test_results_without_runs_are_refused(tmp_path):
    result = show("--results", str(tmp_path / "nowhere"))
    assert result.exit_code == 2 and "holds no moe_journey folder" in result.output


def test_the_overview_takes_the_token_count_asked_for(h100_results):
    output = show("--tokens", "2048", "--results", str(h100_results)).output
    assert "T=2048\n" in output and "largest T" not in output
    assert "largest T every level of this run has" in show("--results", str(h100_results)).output


def test_the_overview_at_a_token_count_the_run_lacks_says_where_it_ran(h100_results):
    result = show("--tokens", "3", "--results", str(h100_results))
    said = " ".join(result.output.split())  # as one line, whatever the screen's width
    assert result.exit_code == 0 and "did not run journey at T=3; it ran at 1, 64," in said, result.output
    assert "first" not in result.output
