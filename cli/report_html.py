"""report.html: a run folder's report as one page a room can read.

The same rows and tables as summary.md (report.frame, report.pivot, report.status_or, report.fmt), rendered with
DataFrame.to_html; the PNGs write_report has just drawn, inlined as base64; the CSS inline and no script, so the
page opens from a file, offline, in any browser. Each level's name links to its lesson file, with the lesson's
first line as the link's title.
"""

from __future__ import annotations

import ast
import base64
import html
import os
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
nav ol { padding-left: 1.2rem; margin: 0.3rem 0; }
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
    clock = report.clock_text(rows)
    contents, body = [], [environment(env) + (f"<p>{esc(clock)}.</p>" if clock else "")]
    if intro := report.cpu_intro(env, rows):
        body.insert(0, f'<p class="intro">{esc(intro)}</p>')
    if not rows:
        body.append("<p>No rows were recorded.</p>")
    else:
        ep_rows, df = report.split_ep(report.frame(rows))
        links = level_links(df, run_dir)
        on_gpu = (df["device_type"] != "cpu").any() if "device_type" in df else True
        for case in dict.fromkeys(df["case"]):
            anchor = report.slug(case)
            contents.append((anchor, report.case_title(case)))
            part = df[df["case"] == case].reset_index(drop=True)
            body.append(case_section(part, run_dir, anchor, links, on_gpu))
        if report.has_fp8(df):
            contents.append(("fp8", "FP8 (e4m3)"))
            body.append(fp8_html(df, links))
        for preset in dict.fromkeys(df["preset"]):
            name = f"imbalance_{report.slug(preset)}.png"
            if (run_dir / name).exists():
                anchor = f"imbalance-{report.slug(preset)}"
                contents.append((anchor, f"{preset}: time against imbalance"))
                body.append(f'<h2 id="{anchor}">{esc(preset)}: time against load imbalance</h2>'
                            + figure(run_dir, name, "each level's time as the traffic shape skews the load"))
        if (run_dir / "across_presets.png").exists() and df["preset"].nunique() > 1:
            contents.append(("across-presets", "Across presets"))
            body.append('<h2 id="across-presets">Across presets</h2>'
                        + figure(run_dir, "across_presets.png", "the best level against the peer, per preset"))
        if len(ep_rows):
            contents.append(("expert-parallel", "Expert parallelism"))
            body.append(ep_html(ep_rows.reset_index(drop=True), run_dir, env))
    nav = "".join(f'<li><a href="#{a}">{esc(t)}</a></li>' for a, t in contents)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{TARGET} run {esc(run_dir.name)}</title><style>{CSS}</style></head>\n<body>"
            f'<div class="page"><nav><strong>Contents</strong><ol><li><a href="#environment">Environment</a></li>'
            f'{nav}</ol></nav>\n<main><h1>{TARGET} run <code>{esc(run_dir.name)}</code></h1>\n'
            + "\n".join(body) + "</main></div></body></html>\n")
    path = run_dir / "report.html"
    partial = path.with_suffix(".html.partial")
    partial.write_text(page)
    partial.replace(path)  # a reader never finds half a page
    return path


def esc(text) -> str:
    return html.escape(str(text))


def environment(env: dict) -> str:
    if not env:
        return '<h2 id="environment">Environment</h2><p>No environment.json in this folder.</p>'
    ceilings = env.get("ceilings") or {}
    items = [
        f"device: <strong>{esc(report.device_name(env))}</strong>, driver {esc(env.get('driver') or '-')}, "
        f"CUDA {esc(env.get('cuda') or '-')}",
        f"torch {esc(env.get('torch'))}, triton {esc(env.get('triton') or '-')}, python {esc(env.get('python'))}",
        *([f"OpenAI's triton_kernels (the matmul_ogs peer's) from {esc(env['triton_kernels'])}"]
          if env.get("triton_kernels") else []),
        f"started {esc(env.get('started_utc'))} (UTC), host {esc(env.get('host'))}",
        f"command: <code>{esc(env.get('command'))}</code>",
        *([f"code: commit {esc(env['code'])}"] if env.get("code") else []),
        f"measured ceilings: {esc(report.ceilings_text(ceilings))}" if ceilings else
        "no ceilings measured (CPU run): no % of roofline, and no GPU memory",
    ]
    banner = report.unfinished_banner(env)
    unfinished = (f'<p class="unfinished"><strong>{esc(banner[0])}</strong> {esc(banner[1])}</p>' if banner
                  else "")
    return ('<h2 id="environment">Environment</h2>' + unfinished
            + '<ul class="env">' + "".join(f"<li>{i}</li>" for i in items) + "</ul>")


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


def table_html(table: pd.DataFrame, links: dict, corner: str = "level \\ tokens") -> str:
    """A pivot (levels down, token counts across) as HTML: level names linked, token counts short. Its cells are
    the renderers' HTML (numbers, statuses, a span), never text from outside."""
    shown = table.map(lambda v: cell(v) if v in report.STATUS_CELL.values() else v)
    shown.index = [links.get(label, esc(label)) for label in table.index]
    shown.columns = [report.token_label(int(t)) for t in table.columns]
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


def section(title: str, caption: str, *blocks: str) -> str:
    return f"<h3>{esc(title)}</h3><p class=\"caption\">{caption}</p>" + "".join(blocks)


def speedups(df: pd.DataFrame, reference_of):
    """A renderer: the reference level's ms over the row's (the reference's label a function of the row),
    'faster than the reference' in green."""
    ms = {(r["label"], r["tokens"]): r["ms"] for _, r in df[df["status"] == "ok"].iterrows()}

    def render(row):
        reference = ms.get((reference_of(row), row["tokens"]))
        if not reference:
            return "-"
        ratio = reference / row["ms"]
        return f'<span class="win">{ratio:.2f}×</span>' if ratio > 1.005 else f"{ratio:.2f}×"
    return report.status_or(render)


def case_section(df: pd.DataFrame, run_dir: Path, anchor: str, links: dict, on_gpu: bool) -> str:
    first = df.iloc[0]
    all_rows, df = df, report.timed_levels(df)  # a level checked in the interpreter is in the time table only
    if not (df["status"] == "ok").any():
        df = df.iloc[:0]  # no speed tables
    peer = report.label_of(df, report.PEER)  # the bf16 peer: the FP8 section compares with the FP8 one
    tokens = sorted(df["tokens"].unique())
    baselines = {t: report.speedup_baseline(df, t) for t in tokens}

    others = {t: b for t, b in baselines.items() if b and not b.startswith("0 ")}
    over_zero = any(b and b.startswith("0 ") for b in baselines.values())
    over = "level 0" + (" (where level 0 was not timed, over the slowest level timed: "
                        + ", ".join(f"at {report.token_label(int(t))} tokens {esc(b)}" for t, b in others.items())
                        + ")" if others else "")
    parts = [
        f'<h2 id="{anchor}">{esc(report.case_title(first["case"]))} '
        f'<small>({esc(shape_label(first))})</small></h2>',
        section("Time per forward, ms", "The median of the timed repeats."
                + "".join(f" <em>{esc(mark)}</em>: {esc(meaning)}." for mark, meaning in report.time_marks(all_rows)),
                table_html(report.pivot(all_rows, report.status_or(report.time_cell)), links),
                figure(run_dir, f"time_{anchor}.png", "time per forward, per level")),
    ]
    if not len(df):
        parts.append(f"<p>{esc(report.NOTHING_TIMED)}</p>")
    if peer:
        parts.append(section(
            "× peer", f"The peer's ms over the level's at each token count ({esc(peer)}): above 1× "
            "(green), the level is faster than the peer.",
            table_html(report.pivot(df, speedups(df, lambda r: peer)), links)))
    if any(baselines.values()):
        # Where level 0 was not timed, the slowest numbered level at each count (the peers are not levels), named
        # where it is one level at every count
        slowest = set(filter(None, baselines.values()))
        if over_zero:
            title, caption = "Speedup over level 0", f"ms of {over} over the level's ms."
        elif len(slowest) == 1:
            title = f"Speedup over {next(iter(slowest))}"
            caption = f"The ms of {esc(next(iter(slowest)))}, the slowest level timed, over the level's ms."
        else:
            title = "Speedup over the slowest level"
            caption = ("The ms of the slowest level timed at each token count (the peers are not levels) over the "
                       "level's ms.")
        parts.append(section(
            title, caption,
            table_html(report.pivot(df, speedups(df, lambda r: baselines[r["tokens"]])), links),
            figure(run_dir, f"speedup_{anchor}.png", "speedup per level")))
    if len(df):
        parts.append(section(report.previous_level_caption(df), "What each level's one change bought at each size.",
                             table_html(report.pivot(df, speedups(df, lambda r: report.previous_level_label(df, r))),
                                        links)))
    if counterparts := report.cpu_counterpart_notes(df):
        parts.append("<h3>Where the GPU idea does not carry over to the CPU</h3><ul>"
                     + "".join(f"<li>{esc(note)}</li>" for note in counterparts) + "</ul>")
    if len(df):
        parts.append(section("TFLOP/s", "Useful FLOPs (2·T·(K + S)·3·H·I) over the measured time.",
                             table_html(report.pivot(df, report.status_or(lambda r: report.fmt(r["tflops"]))),
                                        links)))
    if on_gpu and len(df):
        parts += [
            section("% of the roofline", esc(sentence(report.roofline_caption(df))),
                    table_html(report.pivot(df, report.status_or(lambda r: report.fmt(r["pct_roofline"]))), links),
                    figure(run_dir, f"roofline_{anchor}.png", "% of the measured roofline, per level")),
        ]
        if df["dense_gemm_ms"].notna().any():
            parts.append(section("% of cuBLAS on the same FLOPs",
                                 esc(f"{report.DENSE_GEMMS_TEXT}. {report.dense_gemm_rates(df)}."),
                                 table_html(report.pivot(df, report.status_or(report.dense_gemm_pct)), links)))
        if df["peak_garbage_free"].any():
            parts.append(section("Peak GPU memory, MiB", esc(report.PEAK_CAPTION) + ".",
                                 table_html(report.pivot(df, report.status_or(lambda r: report.fmt(r["peak_mb"]))),
                                            links)))
        else:
            parts.append(f"<h3>Peak GPU memory</h3><p>{esc(report.PEAK_NOT_SHOWN)}</p>")
    counts = counts_html(df, links)
    if counts:
        parts.append(counts)
    if (run_dir / f"load_{anchor}.png").exists():
        parts.append(section("Load over the experts", "The same routing for every level at a given T.",
                             figure(run_dir, f"load_{anchor}.png", "(token, slot) pairs per expert")))
    if (run_dir / f"stages_{anchor}.png").exists():
        parts.append(section("Where the time goes", "From <code>--profile</code>: each stage's share of the "
                             "profiled forward, at the smallest and the largest profiled token count.",
                             figure(run_dir, f"stages_{anchor}.png", "stages per level")))
    notes = [f"<li>{links.get(r['label'], esc(r['label']))}, {report.tokens_text(r['tokens'])}: {esc(r['status'])}: "
             f"{esc(report.row_note(r))}</li>" for _, r in all_rows.iterrows() if report.row_note(r)]
    if notes:
        parts.append("<h3>Notes from the rows</h3><ul>" + "".join(notes) + "</ul>")
    return "\n".join(parts)


def fp8_html(df: pd.DataFrame, links: dict) -> str:
    """summary.md's FP8 section: per case with FP8 rows, levels 7, 9, 10 and both peers in TFLOP/s, over level 9
    and over the FP8 peer, and each FP8 row's quant err."""
    parts = ['<h2 id="fp8">FP8 (e4m3)</h2>', f'<p class="caption">{esc(report.FP8_INTRO)}</p>']
    for case, part in report.fp8_cases(df):
        timed = report.timed_levels(part)
        parts.append(f"<h3>{esc(report.case_title(case))} <small>({esc(shape_label(part.iloc[0]))})</small></h3>")
        if report.times_fp8(timed):
            parts.append(table_html(report.pivot(timed, report.status_or(lambda r: report.fmt(r["tflops"]))), links,
                                    "TFLOP/s: level \\ tokens"))
            for reference in filter(None, (report.label_of(timed, "9"), report.label_of(timed, report.FP8_PEER))):
                parts.append(table_html(report.pivot(timed, speedups(timed, lambda r: reference)), links,
                                        f"× {reference}: level \\ tokens"))
        parts.append(table_html(report.pivot(part[part["quant_err"].notna()], report.quant_err_cell), links,
                                "quant err: level \\ tokens"))
    return "\n".join(parts)


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
    table = pd.DataFrame(table_rows, columns=columns).set_index(["level", "tokens"])
    return section(
        "Claimed against measured", "Per forward, what the lesson's docstring claims and what the harness "
        "measured: kernels the GPU ran, host syncs, and device memory beyond inputs, weights and output. Red: a claim "
        "the measurement contradicts (syncs within 1%, launches within 10% of the claimed range, memory within 30% "
        "or 8 MiB). <em>host µs / GPU µs</em>: the host's time to issue one forward against the GPU's median. "
        "<em>host-bound</em>: the host took longer to issue a forward than the GPU to run it (back to back, the "
        "host would set the pace), or the GPU was busy under half of the forward; either way the time depends on the "
        "host CPU. <em>SM MHz after</em>: the clock right after the timed calls, <em>capped</em> where the "
        "software power cap held it down.",
        '<div class="scroll">' + table.to_html(escape=False, border=0) + "</div>")


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


def ep_html(df: pd.DataFrame, run_dir: Path, env: dict) -> str:
    table = report.ep_table(df).map(cell)
    notes = [f"<li>W={int(r['world_size'])}, {esc(r['case'])}, {int(r['tokens_per_rank'])} tokens per rank: "
             f"{esc(r['status'])}: {esc(r['note'])}</li>" for _, r in df.iterrows() if r["note"]]
    return ('<h2 id="expert-parallel">Expert parallelism (level ep)</h2>'
            f'<p class="caption">{esc(report.ep_machine(df, env))}Weak scaling: at world size W each rank holds the '
            "preset's E experts and its own T tokens. ms is the slowest rank's median forward; its phases (dispatch, "
            f"expert compute and combine) are read on {esc(report.phases_rank_text(df))}; "
            "weak-scaling efficiency is the world-size-1 time over the row's. "
            '<a href="summary.md">summary.md</a> spells out every column.</p>'
            '<div class="scroll">' + table.to_html(escape=False, border=0) + "</div>"
            + "".join(f"<p>{esc(note)}</p>" for note in report.cpu_counterpart_notes(df))
            + figure(run_dir, "expert_parallel.png", "each forward's phases, per case and world size")
            + figure(run_dir, "weak_scaling.png", "weak-scaling efficiency and the collectives' bus bandwidth, "
                     "against the world size")
            + ("<h3>Notes from the rows</h3><ul>" + "".join(notes) + "</ul>" if notes else ""))
