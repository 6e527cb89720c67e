"""`aisp lab`: step through the journey, one level at a time (what an instructor projects).

    aisp lab show                   every level, one line each, with its speedup over the level it builds on,
                                    from the published GPU run (results/moe_journey/LATEST.md names it)
    aisp lab show 4 [--preset journey] [--tokens 8192]
                                    level 4's lesson, its code's diff from level 3's, its claimed counts and its
                                    measured row in the published GPU run (else the newest that has it)

The levels are found the way `aisp bench` finds them (`load_levels()`), so a new levelN file shows up here too.
Measured rows come from GPU runs only: a CPU run measures Python and the CPU, not the lessons' GPU story.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import re
import sys
import textwrap
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cli.options import MAX_COUNT
from result_row import TARGET

console = Console()
lab = typer.Typer(help="Step through the journey: each level's lesson, code diff, claims and measured row.",
                  no_args_is_help=True)

# The one case the lab shows: the committed runs also hold zipf/hot traffic and other routers.
SHOWN_CASE = {"traffic": "uniform", "router": "softmax-topk"}


def level_classes() -> dict[str, type]:
    """Every level in journey order, then the peer, then ep: imported on first use so `--help` stays fast."""
    from cli.aisp import journey

    levels = journey().load_levels()
    levels["ep"] = journey().expert_parallel().ExpertParallelMoE
    return levels


# ---------------------------------------------------------------------------------------------------------------
# The lesson, at the width of the screen
# ---------------------------------------------------------------------------------------------------------------
# The lessons and the code are written 120 columns wide; a projector shows about 80. rich wraps at the screen's
# width but starts every continuation at column 0, which breaks indented prose and code, so lines are wrapped here
# with textwrap, each continuation indented under its line.
LIST_ITEM = re.compile(r"(\d+\.|-) ")  # a numbered item or a bullet
CONTINUATION_INDENT = 8  # deeper than a nested block (4), as PEP 8 continues a line: not mistaken for the next


def wrap_line(line: str, width: int) -> list[str]:
    """One line of code or a diagram, wrapped to `width`, its continuations indented under it."""
    indent = len(line) - len(line.lstrip())
    return textwrap.wrap(line, width, subsequent_indent=" " * (indent + CONTINUATION_INDENT),
                         break_long_words=False, break_on_hyphens=False) or [line]


def reflowed(lesson: str, width: int) -> list[str]:
    """The lesson's words, its paragraphs refilled to `width`. A paragraph is a run of lines at one indent (a
    numbered item or a bullet: its first line, then the rest indented under its text); a line indented deeper than
    the section body it sits in (a diagram, a formula) is kept as its own line."""
    out, paragraph, first, body = [], [], 0, 0

    def flush():
        out.extend(textwrap.wrap(" ".join(paragraph), width, initial_indent=" " * first,
                                 subsequent_indent=" " * body, break_long_words=False, break_on_hyphens=False))
        paragraph.clear()

    for line in lesson.splitlines():
        text = line.lstrip()
        indent, item = len(line) - len(text), LIST_ITEM.match(text)
        if paragraph and text and indent == body and not item:
            paragraph.append(text)
            continue
        flush()
        if not text:
            out.append("")
            body = 0
        elif 0 < body < indent and not item:
            out.extend(wrap_line(line, width))
        else:
            first, body = indent, indent + (item.end() if item else 0)
            paragraph.append(text)
    flush()
    return out


# ---------------------------------------------------------------------------------------------------------------
# The code: what a level's file does, without its prose
# ---------------------------------------------------------------------------------------------------------------
def docstring_lines(node: ast.AST) -> set[int]:
    """Line numbers (1-based) of every docstring inside `node`."""
    lines = set()
    for inner in ast.walk(node):
        if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and ast.get_docstring(inner):
            first = inner.body[0]
            lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def lines_of(source: list[str], node: ast.AST) -> list[str]:
    """A function's or class's lines, decorators included, docstrings left out."""
    start = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
    skip = docstring_lines(node)
    return [source[n - 1] for n in range(start, node.end_lineno + 1) if n not in skip]


def code_lines(cls: type) -> list[str]:
    """The level class's methods (under its `class` line) and the module's helper functions and classes, in file
    order, docstrings left out: the part of the file that changes from level to level. The class attributes
    (name, summary, claims) are shown elsewhere; imports and the `__main__` stanza are the same in every file."""
    source = inspect.getsource(sys.modules[cls.__module__]).splitlines()
    blocks = []
    for node in ast.parse("\n".join(source)).body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            continue
        if node.name == cls.__name__:
            blocks.append([source[node.lineno - 1]])
            blocks += [lines_of(source, item) for item in node.body if isinstance(item, ast.FunctionDef)]
        else:
            blocks.append(lines_of(source, node))
    return [line for i, block in enumerate(blocks) for line in ([""] if i else []) + block]


def file_of(cls: type) -> str:
    return Path(inspect.getsourcefile(cls)).name


DIFF_STYLES = {"+": "green", "-": "red", "@": "cyan"}


def print_diff(levels: dict[str, type], key: str) -> None:
    from cli import report

    cls, before = levels[key], report.builds_on(key)
    if before is None:
        console.print(f"Level {key} is the first: there is no level it builds on to diff against. Its code:\n",
                      highlight=False)
        for line in code_lines(cls):
            console.print(Text("\n".join(wrap_line(line, console.width))))
        return
    diff = difflib.unified_diff(code_lines(levels[before]), code_lines(cls),
                                f"level {before} ({file_of(levels[before])})", f"level {key} ({file_of(cls)})",
                                lineterm="")
    for line in diff:
        if line.startswith(("---", "+++", "@@")):
            console.print(Text(line, style="bold" if line[0] != "@" else DIFF_STYLES["@"]))
            continue
        for piece in wrap_line(line[1:], console.width - 1):  # the marker on every piece: piped, it is the colour
            console.print(Text(line[0] + piece, style=DIFF_STYLES.get(line[0], "")))


# ---------------------------------------------------------------------------------------------------------------
# Claims and measurements
# ---------------------------------------------------------------------------------------------------------------
def print_claims(cls: type, config, num_tokens: int) -> None:
    """What the level's lesson claims per forward: each formula and its value at this shape. Nothing for a level
    that declares no claims."""
    claims = getattr(cls, "claims", None)
    if claims is None:
        return
    from cli.report import fmt_span

    values = claims.evaluate(config, num_tokens)
    console.print(f"Claimed per forward: {config.name}, T={num_tokens}", highlight=False)
    table = Table.grid(padding=(0, 2))
    table.add_column()
    table.add_column()
    table.add_column(justify="right")
    table.add_row("  launches", Text(claims.launches), fmt_span(values["launches"]))
    table.add_row("  host syncs", Text(claims.syncs), fmt_span(values["syncs"]))
    table.add_row("  extra memory", Text(claims.extra_bytes), f"{fmt_span(values['extra_mb'])} MiB")
    console.print(table, "")


def gpu_runs(results: Path) -> list[tuple[Path, dict, list[dict]]]:
    """(folder, environment, rows) of every GPU run under results/moe_journey/, newest first (folders are named
    by their UTC start)."""
    from cli import report

    runs = []
    for rows_path in sorted((results / TARGET).glob("*/rows.jsonl"), key=lambda p: p.parent.name,
                            reverse=True):
        env = report.load_environment(rows_path.parent)
        if env.get("device_type") == "cuda":
            runs.append((rows_path.parent, env, report.load_rows(rows_path.parent)))
    return runs


def shown_rows(rows: list[dict], preset: str) -> list[dict]:
    """The rows of `preset` in the shown case (rows from before traffic shapes and routers existed are uniform,
    softmax-topk)."""
    return [row for row in rows if row["preset"] == preset
            and all(row.get(field, value) == value for field, value in SHOWN_CASE.items())]


def row_of(rows: list[dict], key: str, num_tokens: int) -> dict | None:
    return next((row for row in rows if str(row["level"]) == key and row["tokens"] == num_tokens), None)


def speedup(reference: dict | None, row: dict) -> str:
    """reference ms / row ms, or why there is none."""
    from cli.report import STATUS_CELL

    if reference is None:
        return "not in this run"
    if reference["status"] != "ok":
        return STATUS_CELL.get(reference["status"], reference["status"])
    return f"{reference['ms'] / row['ms']:.2f}x"


def print_measured(levels: dict[str, type], key: str, preset: str, num_tokens: int, results: Path) -> None:
    """The level's row in the published GPU run that has it at (preset, T), else in the newest that has it, beside
    the level before it and the peer from the same run (an FP8 level's beside the FP8 peer too, level 9's beside
    the matmul_ogs peer): the published sweep has them all, a newer run of two levels would not."""
    from cli import report
    from cli.report import HOST_BOUND_MARK, STATUS_CELL, dense_gemm_pct, fmt

    case = f"{preset}, T={num_tokens} ({SHOWN_CASE['traffic']} traffic, {SHOWN_CASE['router']} router)"
    for run_dir, env, rows in published_first(gpu_runs(results), results):
        rows = shown_rows(rows, preset)
        row = row_of(rows, key, num_tokens)
        if row is None:
            continue
        console.print(f"Measured: {case}\nin {run_dir.name} on {env.get('device', '?')}", highlight=False)
        if row["status"] != "ok":
            console.print(f"  {STATUS_CELL.get(row['status'], row['status'])}: {row['note']}", highlight=False)
            return
        table = Table.grid(padding=(0, 2))
        host_bound = f" {HOST_BOUND_MARK}: {report.HOST_BOUND_MEANING}" if row.get("host_bound") else ""
        table.add_row("  time", f"{fmt(row['ms'])} ms{host_bound}")
        table.add_row("  rate", f"{fmt(row['tflops'])} TF/s")
        table.add_row("  roofline", f"{fmt(row['pct_roofline'])}%")
        if row.get("dense_gemm_ms"):  # cuBLAS's dense GEMMs on the same FLOPs, timed beside the levels
            table.add_row("  cuBLAS, same FLOPs", f"{dense_gemm_pct(row)}%")
        before = report.compared_level(key, {str(r["level"]) for r in rows if r["tokens"] == num_tokens})
        if before is not None:
            table.add_row(f"  × {'level ' if before.isdigit() else ''}{before}",
                          speedup(row_of(rows, before, num_tokens), row))
        if "peer" not in (key, before):
            table.add_row("  × peer", speedup(row_of(rows, "peer", num_tokens), row))
        if getattr(levels[key], "fp8", False) and key != "peer-fp8":
            table.add_row("  × FP8 peer", speedup(row_of(rows, "peer-fp8", num_tokens), row))
        if key == "9":  # the yardstick issue 12 set level 9 against
            table.add_row("  × matmul_ogs peer", speedup(row_of(rows, "peer-ogs", num_tokens), row))
        if "world_size" in row:
            table.add_row("  world size", str(row["world_size"]))
        if note := report.row_note(row):  # why a time is host-bound, among others
            table.add_row("  note", note)
        console.print(table, highlight=False)
        return
    console.print(f"No GPU run under {results / TARGET} has level {key} at {case}.", highlight=False)
    ran = {}  # where it did run, in the shown case: ep's runs, for one, are at other presets
    for _, _, rows in gpu_runs(results):
        for row in rows:
            if str(row["level"]) == key and all(row.get(field, value) == value for field, value in SHOWN_CASE.items()):
                ran.setdefault(row["preset"], set()).add(row["tokens"])
    if ran:
        cases = "; ".join(f"{name} T={','.join(map(str, sorted(counts)))}" for name, counts in sorted(ran.items()))
        console.print(f"It ran at: {cases} (--preset, --tokens).", highlight=False)


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------
def published_first(runs: list[tuple[Path, dict, list[dict]]], results: Path) -> list[tuple[Path, dict, list[dict]]]:
    """The runs `aisp bench publish` last chose (LATEST.md names them), then the others, each part newest first:
    the published sweep, not a newer run of three decode levels that would leave the others blank."""
    from cli import report

    latest = results / TARGET / "LATEST.md"
    published = report.published_runs(latest.read_text()) if latest.is_file() else set()
    return sorted(runs, key=lambda run: run[0].name not in published)  # a stable sort keeps newest first


def print_overview(levels: dict[str, type], preset: str, num_tokens: int | None, results: Path) -> None:
    """One line per level with its speedup over the level it builds on, from the published GPU run of this preset
    (else the newest), at `num_tokens`, or by default the largest T at which that run ran every level (so every
    level it ran has a number)."""
    from cli import report

    rows = []
    for run_dir, env, run_rows in published_first(gpu_runs(results), results):
        rows = [row for row in shown_rows(run_rows, preset) if str(row["level"]) != "ep"]  # ep runs on its own
        if rows:
            break
    ms = {(str(row["level"]), row["tokens"]): row["ms"] for row in rows if row["status"] == "ok"}
    keys = {str(row["level"]) for row in rows}
    ran_at = sorted({row["tokens"] for row in rows})
    if num_tokens and rows and num_tokens not in ran_at:
        console.print(f"The GPU run {run_dir.name} did not run {preset} at T={num_tokens}; it ran at "
                      f"{', '.join(map(str, ran_at))} (--tokens).", highlight=False)
        return
    chosen = "" if num_tokens else "\n(the largest T every level of this run has)"
    num_tokens = num_tokens or max((t for t in ran_at if all((k, t) in ms for k in keys)), default=None)
    if num_tokens is None:
        console.print(f"No GPU run under {results / TARGET} ran every level at {preset}: no speedups.",
                      highlight=False)
    else:
        console.print(f"× previous: over the level each builds on, at {preset}, T={num_tokens}{chosen}\n"
                      f"in {run_dir.name} on {env.get('device', '?')}", highlight=False)
    table = Table(box=None)
    for column, justify in (("level", "right"), ("name", "left"), ("× previous", "right"), ("idea", "left")):
        table.add_column(column, justify=justify)
    for key, cls in levels.items():
        before = report.compared_level(key, keys)
        if key not in keys:
            ratio = "-"
        elif before is None:
            ratio = "first"
        else:
            ratio = (f"{ms[before, num_tokens] / ms[key, num_tokens]:.2f}x"
                     if (before, num_tokens) in ms and (key, num_tokens) in ms else "-")
            if before != report.builds_on(key) or not key.isdigit():
                ratio += f" (vs {before})"
        table.add_row(key, cls.name, ratio, Text(cls.summary))  # wrapped where the screen is narrow, never cut
    console.print(table)
    console.print("-: not in this run (ep runs on its own); first: the run's first level.\n"
                  "`aisp lab show LEVEL` prints a level's whole lesson.", highlight=False)


@lab.command("show")
def show_command(
    level: str = typer.Argument(None, help="a level: 0-10, peer, peer-fp8, peer-ogs or ep (default: list them all)"),
    preset: str = typer.Option("journey", help="the preset of the claims and the measured row"),
    tokens: int = typer.Option(None, help="the token count T of the claims and the measured row (default: 8192; "
                                          "with no level, the largest T at which the run has every level)"),
    results: Path = typer.Option(None, help="where the runs are (default: the repository's results/)"),
) -> None:
    """A level's lesson, the diff of its code from the level before, its claimed counts and its measured GPU row;
    with no level, every level and its speedup over the one before."""
    from cli.aisp import REPO_ROOT, fail

    from moe_model import ConfigError, get_preset

    results = results or REPO_ROOT / "results"
    if not (results / TARGET).is_dir():
        fail(f"--results {str(results)!r} holds no {TARGET} folder of runs")
    if tokens is not None and not 0 < tokens <= MAX_COUNT:
        fail(f"--tokens must be positive and at most {MAX_COUNT}, got {tokens}")
    try:
        config = get_preset(preset)
    except ConfigError as error:
        fail(str(error))
    levels = level_classes()
    if level is None:
        print_overview(levels, preset, tokens, results)
        return
    tokens = tokens or 8192
    if level not in levels:
        fail(f"unknown level {level!r}; available: {', '.join(levels)}")
    cls = levels[level]
    console.rule(f"level {level}: {cls.name}")
    console.print(Text("\n".join(reflowed(sys.modules[cls.__module__].__doc__, console.width))))
    console.rule("code")
    print_diff(levels, level)
    console.rule("counts and time")
    print_claims(cls, config, tokens)
    print_measured(levels, level, preset, tokens, results)
