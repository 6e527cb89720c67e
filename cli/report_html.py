"""report.html: a run folder's report as one page a room can read.

The same rows, tables and captions as summary.md (report.py builds each once: report.frame, report.pivot,
report.status_or, report.load_table, report.ep_caption, ...), rendered with DataFrame.to_html; the PNGs
write_report has just drawn, inlined as base64; the CSS inline and no script, so the page opens from a file,
offline, in any browser. The contents list every section and subsection. Each level's name links to its lesson
file, with the lesson's first line as the link's title.
"""

from __future__ import annotations

import ast
import base64
import html
import os
import re
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from cli import report
from result_row import TARGET, shape_label

REPO = Path(__file__).resolve().parent.parent
LESSONS = REPO / "labs" / "moe_optimization_journey"

CSS = """
body { margin: 0; color: #1d1d1f; background: #fff;
       font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "DejaVu Sans", sans-serif; }
.page { display: grid; grid-template-columns: 15rem minmax(0, 1fr); gap: 2.5rem; max-width: 120rem;
        margin: 0 auto; padding: 0 1.5rem; }
nav { position: sticky; top: 0; align-self: start; max-height: 100vh; overflow-y: auto; padding: 1.5rem 0;
      font-size: 0.9rem; }
nav ol { padding-left: 1.6rem; margin: 0.3rem 0; }  /* room for "10." */
nav ol ol { font-size: 0.85rem; margin: 0.1rem 0 0.4rem; }
nav a { color: #1d1d1f; text-decoration: none; }
nav a:hover { text-decoration: underline; }
main { min-width: 0; padding: 1rem 0 5rem; }
h1 { font-size: 1.7rem; margin: 0.5rem 0 1rem; }
h2 { font-size: 1.4rem; margin: 3rem 0 0.5rem; padding-top: 1rem; border-top: 2px solid #ddd; }
h3 { font-size: 1.05rem; margin: 1.8rem 0 0.3rem; }
p.caption { margin: 0.2rem 0 0.5rem; color: #555; font-size: 0.9rem; max-width: 60rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85rem; font-variant-numeric: tabular-nums; margin: 0.3rem 0 1rem; }
th, td { padding: 0.25rem 0.7rem; text-align: right; white-space: nowrap; border-bottom: 1px solid #e6e6e6; }
thead th { border-bottom: 2px solid #888; }
tbody th { text-align: left; font-weight: 500; }
tbody tr:hover { background: #f5f7fa; }
th a { color: #0b5cad; text-decoration: none; }
th a:hover { text-decoration: underline; }
.status { color: #999; }
p.intro { max-width: 60rem; border-left: 4px solid #0b5cad; padding-left: 0.6rem; }
.win { color: #0a7a2f; font-weight: 600; }
tr:has(.mismatch) { background: #fdeaea; }
.mismatch { color: #b00020; font-weight: 700; }
.unfinished { color: #b00020; border-left: 4px solid #b00020; padding-left: 0.6rem; }
figure { margin: 0.8rem 0 1.5rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.85rem; }
ul.env { padding-left: 1.2rem; }
code { font-size: 0.85em; background: #f3f3f3; padding: 0.05rem 0.3rem; border-radius: 3px; }
"""


def write_html(run_dir: Path, rows: list[dict], env: dict) -> Path:
    """report.html beside summary.md, from the same rows and environment; the figures are those write_report
    drew."""
    run_dir = Path(run_dir)
    contents, body = [("environment", "Environment", [])], [environment(env, rows)]
    if intro := report.cpu_intro(env, rows):
        body.insert(0, f'<p class="intro">{inline_html(intro)}</p>')
    if not rows:
        body.append("<p>No rows were recorded.</p>")
    else:
        ep_rows, df = report.split_ep(report.frame(rows))
        links = level_links(df, run_dir)
        for case in dict.fromkeys(df["case"]):
            anchor = report.slug(case)
            part = df[df["case"] == case].reset_index(drop=True)
            section_html, subsections = case_section(part, run_dir, anchor, links, env)
            contents.append((anchor, report.case_title(case), subsections))
            body.append(section_html)
        if report.has_fp8(df):
            section_html, subsections = fp8_html(df, links)
            contents.append(("fp8", "FP8 (e4m3)", subsections))
            body.append(section_html)
        for preset in dict.fromkeys(df["preset"]):
            name = f"imbalance_{report.slug(preset)}.png"
            if (run_dir / name).exists():
                anchor = f"imbalance-{report.slug(preset)}"
                contents.append((anchor, f"{preset}: time against imbalance", []))
                body.append(f'<h2 id="{anchor}">{esc(preset)}: time against load imbalance</h2>'
                            + figure(run_dir, name, "each level's time as the traffic shape skews the load"))
        if (run_dir / "across_presets.png").exists() and df["preset"].nunique() > 1:
            contents.append(("across-presets", "Across presets", []))
            body.append('<h2 id="across-presets">Across presets</h2>'
                        + figure(run_dir, "across_presets.png", "the best level against the peer, per preset"))
        if len(ep_rows):
            section_html, subsections = ep_html(ep_rows.reset_index(drop=True), run_dir, env)
            contents.append(("expert-parallel", "Expert parallelism", subsections))
            body.append(section_html)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{TARGET} run {esc(run_dir.name)}</title><style>{CSS}</style></head>\n<body>"
            f'<div class="page"><nav><strong>Contents</strong>{contents_html(contents)}</nav>\n'
            f'<main><h1>{TARGET} run <code>{esc(run_dir.name)}</code></h1>\n'
            + "\n".join(body) + "</main></div></body></html>\n")
    path = run_dir / "report.html"
    partial = path.with_suffix(".html.partial")
    partial.write_text(page)
    partial.replace(path)  # a reader never finds half a page
    return path


def contents_html(contents: list[tuple]) -> str:
    """The contents from (anchor, title, subsections) entries, each subsection's an entry of the same kind: a link
    each, a section's subsections in a list under it."""
    return "<ol>" + "".join(f'<li><a href="#{anchor}">{esc(title)}</a>'
                            + (contents_html(subsections) if subsections else "") + "</li>"
                            for anchor, title, subsections in contents) + "</ol>"


def esc(text) -> str:
    return html.escape(str(text))


def inline_html(text: str) -> str:
    """report.py's prose as HTML: the markdown it uses (`code`, **strong**, *emphasis*) marked up, the rest escaped."""
    pieces = re.split(r"`([^`]*)`", text)  # code at the odd places: no emphasis inside it
    return "".join(f"<code>{esc(piece)}</code>" if i % 2 else
                   re.sub(r"\*(.+?)\*", r"<em>\1</em>", re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", esc(piece)))
                   for i, piece in enumerate(pieces))


def environment(env: dict, rows: list[dict]) -> str:
    if not env:
        return '<h2 id="environment">Environment</h2><p>No environment.json in this folder.</p>'
    banner = report.unfinished_banner(env)
    unfinished = (f'<p class="unfinished"><strong>{esc(banner[0])}</strong> {esc(banner[1])}</p>' if banner
                  else "")
    return ('<h2 id="environment">Environment</h2>' + unfinished + '<ul class="env">'
            + "".join(f"<li>{inline_html(item)}</li>" for item in report.environment_items(env, rows)) + "</ul>")


def level_links(df: pd.DataFrame, run_dir: Path) -> dict:
    """label -> the label linked to its lesson file (relative to the run folder), the lesson's first line as
    its title; a label with no lesson file stays plain text."""
    links = {}
    for label, level, name in zip(df["label"], df["level"], df["level_name"]):
        path = next((LESSONS / f for f in (f"level{level}_{name}.py", f"level_{level}_{name}.py",
                                           f"{level}_{name}.py", f"peer_{name}.py") if (LESSONS / f).exists()), None)
        if path is None:
            links[label] = esc(label)
            continue
        lesson = ast.get_docstring(ast.parse(path.read_text())) or ""
        href = quote(Path(os.path.relpath(path, run_dir.resolve())).as_posix())
        links[label] = f'<a href="{href}" title="{esc(lesson.splitlines()[0] if lesson else path.name)}">' \
                       f"{esc(label)}</a>"
    return links


def cell(text: str) -> str:
    """A table cell's HTML: a status (OOM, skipped, ...) greyed, anything else escaped."""
    return f'<span class="status">{esc(text)}</span>' if text in report.STATUS_CELL.values() else esc(text)


def table_html(table: pd.DataFrame, links: dict) -> str:
    """A pivot (levels down, token counts across) as HTML: level names linked, token counts short. Its cells are
    the renderers' HTML (numbers, statuses, a span), never text from outside."""
    shown = table.map(lambda v: cell(v) if v in report.STATUS_CELL.values() else v)
    shown.index = [links.get(label, esc(label)) for label in table.index]
    shown.columns = [report.token_label(int(t)) for t in table.columns]
    return scroll_table(shown, "level \\ tokens")


def text_table_html(table: pd.DataFrame, corner: str, row_name=esc) -> str:
    """One of report.py's tables of text as HTML: its cells escaped (a status greyed), its rows named by
    `row_name` (a function of the row's index value that returns HTML)."""
    shown = table.map(cell)
    shown.index = [row_name(name) for name in table.index]
    shown.columns = [esc(column) for column in table.columns]
    return scroll_table(shown, corner)


def scroll_table(shown: pd.DataFrame, corner: str | None) -> str:
    """A table of HTML cells and headers in a box that scrolls sideways when the page is narrower; `corner` heads
    the rows' names."""
    return '<div class="scroll">' + shown.rename_axis(columns=corner).to_html(escape=False, border=0) + "</div>"


def figure(run_dir: Path, name: str, caption: str) -> str:
    path = run_dir / name
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{esc(caption)}">'
            f"<figcaption>{esc(caption)} ({esc(name)})</figcaption></figure>")


def sentence(text: str) -> str:
    """A caption's clause as a sentence: its first letter upper case, a full stop at the end."""
    return f"{text[:1].upper()}{text[1:]}."


def caption_html(text: str) -> str:
    """A caption paragraph from HTML."""
    return f'<p class="caption">{text}</p>'


class Subsections:
    """The subsections of one of the page's sections, as they are added: their HTML in order, and the contents'
    entry for each (see contents_html)."""

    def __init__(self, anchor: str):
        self.anchor, self.parts, self.entries = anchor, [], []

    def add(self, name: str, caption: str, *blocks: str, heading: str | None = None) -> None:
        """A subsection named `name` (text) in the contents and in its heading, unless `heading` (HTML) says more;
        `caption` (HTML) over its blocks, or none where it is empty."""
        anchor = f"{self.anchor}-{report.slug(name).lower()}"
        self.entries.append((anchor, name, []))
        self.parts.append(f'<section id="{anchor}"><h3>{heading or esc(name)}</h3>'
                          + (caption_html(caption) if caption else "") + "".join(blocks) + "</section>")


def speedup_cell(ratio: float) -> str:
    """A speedup as the page writes it: 'faster than the reference' in green."""
    return f'<span class="win">{ratio:.2f}×</span>' if ratio > 1.005 else f"{ratio:.2f}×"


def speedups(df: pd.DataFrame, reference_of):
    """report.speedup_vs written as the page writes a speedup."""
    return report.speedup_vs(df, reference_of, speedup_cell)


def case_section(df: pd.DataFrame, run_dir: Path, anchor: str, links: dict, env: dict) -> tuple[str, list]:
    """A case's section of the page, and its subsections' contents entries."""
    first = df.iloc[0]
    all_rows, df = df, report.timed_levels(df)  # a level checked in the interpreter is in the time table only
    if not (df["status"] == "ok").any():
        df = df.iloc[:0]  # no speed tables
    peer = report.label_of(df, report.PEER)  # the bf16 peer: the FP8 section compares with the FP8 one
    baselines = report.speedup_baselines(df)
    sections = Subsections(anchor)
    sections.add("Time per forward", "The median of the timed repeats." + "".join(
                     f" <em>{esc(mark)}</em>: {esc(meaning)}." for mark, meaning in report.time_marks(all_rows)),
                 table_html(report.pivot(all_rows, report.status_or(report.time_cell)), links),
                 figure(run_dir, f"time_{anchor}.png", "time per forward, per level"),
                 "" if len(df) else f"<p>{inline_html(report.NOTHING_TIMED)}</p>", heading="Time per forward, ms")
    if peer:
        sections.add("× peer", f"The peer's ms over the level's at each token count ({esc(peer)}): above "
                     "1× (green), the level is faster than the peer.",
                     table_html(report.pivot(df, speedups(df, lambda r: peer)), links))
    if any(baselines.values()):
        title, caption = report.speedup_title_and_caption(baselines)
        sections.add(title, esc(sentence(caption)),
                     table_html(report.pivot(df, speedups(df, lambda r: baselines[r["tokens"]])), links),
                     figure(run_dir, f"speedup_{anchor}.png", "speedup per level"))
    if len(df):
        sections.add("Speedup over the level each builds on", "What each level's one change bought at each size.",
                     table_html(report.pivot(df, speedups(df, lambda r: report.previous_level_label(df, r))), links),
                     heading=esc(report.previous_level_caption(df)))
    if counterparts := report.cpu_counterpart_notes(df):
        sections.add("Where the GPU idea does not carry over to the CPU", "",
                     "<ul>" + "".join(f"<li>{inline_html(note)}</li>" for note in counterparts) + "</ul>")
    if len(df):
        sections.add("TFLOP/s", f"Useful FLOPs ({esc(report.USEFUL_FLOPS)}) over the measured time.",
                     table_html(report.metric_table(df, "tflops"), links))
    # summary.md's rule: a CPU run measures no ceilings and no device memory, so no table of dashes for either
    if df["pct_roofline"].notna().any():
        sections.add("% of the roofline", inline_html(sentence(report.roofline_caption(df))),
                     table_html(report.metric_table(df, "pct_roofline"), links),
                     figure(run_dir, f"roofline_{anchor}.png", "% of the measured roofline, per level"))
    if df["dense_gemm_ms"].notna().any():
        sections.add("% of cuBLAS on the same FLOPs",
                     inline_html(f"{report.DENSE_GEMMS_TEXT}. {report.dense_gemm_rates(df)}."),
                     table_html(report.pivot(df, report.status_or(report.dense_gemm_pct)), links))
    if df["peak_mb"].notna().any():
        if df["peak_garbage_free"].any():
            sections.add("Peak GPU memory", inline_html(report.PEAK_CAPTION) + ".",
                         table_html(report.metric_table(df, "peak_mb"), links), heading="Peak GPU memory, MiB")
        else:
            sections.add("Peak GPU memory", "", f"<p>{inline_html(report.PEAK_NOT_SHOWN)}</p>")
    copy_gbps = (env.get("ceilings") or {}).get("copy_gbps")
    if (decode := report.decode_table(df, copy_gbps)) is not None:
        sections.add(report.DECODE_TITLE, inline_html(sentence(report.decode_caption(copy_gbps))),
                     table_html(decode, links))
    if (load := report.load_table(all_rows)) is not None:
        sections.add(report.LOAD_TITLE, inline_html(sentence(report.LOAD_CAPTION)),
                     text_table_html(load, "tokens", lambda t: esc(report.token_label(int(t)))),
                     figure(run_dir, f"load_{anchor}.png", "(token, slot) pairs per expert"))
    profiled_counts = report.profile_token_counts(df)
    for tokens in profiled_counts:
        sections.add(report.stage_title(tokens),
                     f"From <code>--profile</code>: {inline_html(report.stage_caption(df))}.",
                     text_table_html(report.stage_times(df, tokens), "level \\ stage",
                                     lambda label: links.get(label, esc(label))),
                     # one figure of both counts, under the last table
                     figure(run_dir, f"stages_{anchor}.png", "stages per level") if tokens == profiled_counts[-1]
                     else "")
    if counts := counts_html(df, links):
        sections.add("Claimed against measured", COUNTS_CAPTION, counts)
    notes = [f"<li>{links.get(r['label'], esc(r['label']))}, {report.tokens_text(r['tokens'])}: {esc(r['status'])}: "
             f"{esc(report.row_note(r))}</li>" for _, r in all_rows.iterrows() if report.row_note(r)]
    if notes:
        sections.add("Notes from the rows", "", "<ul>" + "".join(notes) + "</ul>")
    heading = (f'<h2 id="{anchor}">{esc(report.case_title(first["case"]))} '
               f'<small>({esc(shape_label(first))})</small></h2>')
    return "\n".join([heading, *sections.parts]), sections.entries


def fp8_html(df: pd.DataFrame, links: dict) -> tuple[str, list]:
    """summary.md's FP8 section: per case with FP8 rows, levels 7, 9, 10 and both peers in TFLOP/s, over level 9
    and over the FP8 peer, and each FP8 row's quant err; and its subsections' contents entries."""
    sections = Subsections("fp8")
    for case, part in report.fp8_cases(df):
        timed = report.timed_levels(part)
        tables = []
        if report.times_fp8(timed):
            tables += [caption_html("TFLOP/s:"), table_html(report.metric_table(timed, "tflops"), links)]
            for reference in filter(None, (report.label_of(timed, "9"), report.label_of(timed, report.FP8_PEER))):
                tables += [caption_html(f"{esc(report.fp8_speedup_caption(reference))}:"),
                           table_html(report.pivot(timed, speedups(timed, lambda r: reference)), links)]
        tables += [caption_html(f"{esc(report.QUANT_ERR_CAPTION)}:"),
                   table_html(report.pivot(part[part["quant_err"].notna()], report.quant_err_cell), links)]
        sections.add(report.case_title(case), "", *tables, heading=f"{esc(report.case_title(case))} "
                     f"<small>({esc(shape_label(part.iloc[0]))})</small>")
    return ('<h2 id="fp8">FP8 (e4m3)</h2>' + caption_html(inline_html(report.FP8_INTRO)) + "\n".join(sections.parts),
            sections.entries)


COUNTS_CAPTION = (
    "Per forward, what the lesson's docstring claims and what the harness measured: kernels the GPU ran, host syncs, "
    "and device memory beyond inputs, weights and output. Red: a claim the measurement contradicts (syncs within 1%, "
    "launches within 10% of the claimed range, memory within 30% or 8 MiB). <em>host µs / GPU µs</em>: the host's "
    "time to issue one forward against the GPU's median. <em>host-bound</em>: the host took longer to issue a forward "
    "than the GPU to run it (back to back, the host would set the pace), or the GPU was busy under half of the "
    "forward; either way the time depends on the host CPU. <em>SM MHz after</em>: the clock right after the timed "
    "calls, <em>capped</em> where the software power cap held it down.")


def counts_html(df: pd.DataFrame, links: dict) -> str:
    """The lesson's claimed launches, syncs and extra memory against the measured ones, a row per (level, T); a
    measurement that contradicts its claim is red (the row's `claims_contradicted`, written by the benchmark, which
    holds the rule). Empty when no row carries measured counts."""
    if "launches_measured" not in df or df["launches_measured"].isna().all():
        return ""
    rows = df[(df["status"] == "ok") & df["launches_measured"].notna()]

    def measured(row, value, claim: str) -> str:
        shown = report.fmt(value)
        return f'<span class="mismatch">{shown}</span>' if claim in (row["claims_contradicted"] or []) else shown

    table_rows = []
    for _, row in rows.iterrows():
        table_rows.append([links.get(row["label"], esc(row["label"])), report.token_label(int(row["tokens"])),
                           report.fmt_span(row["launches_claimed"]),
                           measured(row, row["launches_measured"], "launches"),
                           report.fmt_span(row["syncs_claimed"]), measured(row, row["syncs_measured"], "syncs"),
                           report.fmt_span(row["extra_mb_claimed"]), measured(row, row["extra_mb"], "extra memory"),
                           report.fmt(row["gpu_busy_pct"]), host_cell(row), "yes" if row["host_bound"] else "no",
                           clock_cell(row)])
    columns = ["level", "tokens", "launches claimed", "launches measured", "syncs claimed", "syncs measured",
               "extra MiB claimed", "extra MiB measured", "GPU busy %", "host µs / GPU µs", "host-bound",
               "SM MHz after"]
    return scroll_table(pd.DataFrame(table_rows, columns=columns).set_index(["level", "tokens"]), None)


def host_cell(row) -> str:
    """The host's issue time and the GPU's time per forward, µs; "-" where the issue time was not measured."""
    if "host_ms" not in row or pd.isna(row["host_ms"]):
        return "-"
    return f"{row['host_ms'] * 1e3:.1f} / {row['ms'] * 1e3:.1f}"


def clock_cell(row) -> str:
    """The SM clock after a row's timed calls, and whether the power cap held it; "-" where it was not read."""
    if "sm_clock_mhz" not in row or pd.isna(row["sm_clock_mhz"]):
        return "-"
    capped = pd.notna(row["power_capped"]) and bool(row["power_capped"])  # a numpy bool in a frame of bools
    return f"{int(row['sm_clock_mhz'])}" + (" capped" if capped else "")


def ep_html(df: pd.DataFrame, run_dir: Path, env: dict) -> tuple[str, list]:
    """summary.md's expert-parallel section, and its subsections' contents entries."""
    sections = Subsections("expert-parallel")
    if notes := report.ep_notes(df):
        sections.add("Notes from the rows", "",
                     "<ul>" + "".join(f"<li>{esc(note)}</li>" for note in notes) + "</ul>")
    return ('<h2 id="expert-parallel">Expert parallelism (level ep)</h2>'
            + caption_html(inline_html(report.ep_caption(df, env)))
            + text_table_html(report.ep_table(df), "case")
            + "".join(f"<p>{inline_html(note)}</p>" for note in report.cpu_counterpart_notes(df))
            + figure(run_dir, "expert_parallel.png", "each forward's phases, per case and world size")
            + figure(run_dir, "weak_scaling.png", "weak-scaling efficiency and the collectives' bus bandwidth, "
                     "against the world size")
            + "".join(sections.parts), sections.entries)
