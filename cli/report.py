"""Tables and plots, generated from a run folder's rows.jsonl and nothing else.

Raw rows first: `aisp bench run` appends one JSON row per measurement; everything here (summary.md, the PNG plots,
LATEST.md, the README's results block) is rebuilt from those rows, so `aisp bench report RUN_DIR` can redo it at
any time without running anything.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import statistics
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import matplotlib.transforms  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import PIL.Image  # noqa: E402

from cli.numbers import fmt  # noqa: E402
from result_row import OUTSIDE_STAGES, TARGET, ResultRow, shape_label  # noqa: E402

STATUS_CELL = {"oom": "OOM", "skipped": "skipped", "error": "error", "checked": "checked"}


def cpu_intro(env: dict, rows: list[dict]) -> str:
    """The sentences a CPU run's summary.md and report.html open with: what such a run can and cannot show (empty
    for a run with any GPU row)."""
    if not rows or any(row.get("device_type") != "cpu" for row in rows):
        return ""
    if all(str(row["level"]) == "ep" for row in rows):
        return ("This run was on a CPU: gloo processes on one machine stand in for GPUs and NCCL, so it shows the "
                "expert-parallel algorithm, its rows' bytes and its phases, not a link's or a GPU's speed.")
    threads = env.get("cpu_threads")
    on = f" on {threads} thread{'s' if threads != 1 else ''}" if threads else ""
    return ("This run was on a CPU: it times PyTorch's CPU kernels and Python's overhead" + on + ", so it ranks "
            "levels 0-6 and the peer on this machine. It cannot show GPU launch overhead, CUDA graphs, tensor cores "
            "or HBM bandwidth, and levels 7-10 (Triton GEMMs) are checked in Triton's interpreter but not timed, at "
            "the sizes where that takes seconds (larger ones are skipped).")


# Levels whose GPU idea does not carry over to the CPU, and what of them a CPU run times instead.
CPU_COUNTERPARTS = {
    "2": "its fused SiLU·up is a Triton kernel, which a CPU runs only in the interpreter: it is timed as two torch "
         "ops (silu, then multiply), as level 1 does it",
    "5": "no CUDA graph on the CPU: the sync-free code runs eagerly, so only its cost shows, E/K times the "
         "GEMM work on padded buffers",
    "6": "torch.compile makes C++ for the CPU, not the GPU's fused kernels; what it saves or adds here says "
         "little about a GPU",
    "ep": "gloo processes on one machine stand in for GPUs and NCCL: the rows show the algorithm and its bytes, "
          "not a link; the local experts run level 4, and the reduce and the final sum (Triton kernels on a GPU) "
          "run as torch ops; where there are more processes than cores, they take turns on them, and the "
          "efficiency shows that too",
}


def cpu_counterpart_notes(df: pd.DataFrame) -> list[str]:
    """On a CPU run, a line per level present whose GPU idea does not carry over (CPU_COUNTERPARTS)."""
    if (df["device_type"] == "cuda").any():
        return []
    present = dict.fromkeys(zip(df["level"].map(str), df["label"]))
    return [f"{label}: {CPU_COUNTERPARTS[level]}" for level, label in present if level in CPU_COUNTERPARTS]


def roofline_caption(df: pd.DataFrame) -> str:
    """What % of the roofline divides by; a run with FP8 rows (they carry a quant_err) has two matmul rates."""
    rate = "bf16's or, for the FP8 levels, FP8's" if df["quant_err"].notna().any() else "bf16's"
    return (f"the larger of FLOPs over the measured matmul rate, {rate}, and minimum bytes over the measured copy "
            "bandwidth, over the measured time")


NOTHING_TIMED = "Nothing was timed in this case; the notes below say why."  # no speed tables follow
PEAK_NOT_SHOWN = ("Peak GPU memory is not shown: the harness that measured these rows counted each level's memory "
                  "before collecting garbage, so one level's leftovers could be counted as another's (one peak read "
                  "-1.1 MiB). The claims table's extra memory, measured around the call, stands.")
PEAK_CAPTION = ("Peak GPU memory during one forward, MiB (weights and inputs included; a CUDA graph's private pool, "
                "reserved when it was captured, is not an allocation during the forward: the claims table's extra "
                "memory counts it)")


def timed_levels(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the levels a run could time: a level `checked` (on a CPU, its only form is Triton's
    interpreter) is left out of the speed tables and plots; the time table and the notes say why."""
    checked = set(df.loc[df["status"] == "checked", "label"])
    return df[~df["label"].isin(checked)].reset_index(drop=True)


class DamagedFile(ValueError):
    """A run folder's file that is not the JSON it should be; the message names the file and the line."""


def load_rows(run_dir: Path, skip_damaged_last: Callable[[str], None] | None = None) -> list[dict]:
    """The rows of rows.jsonl. A damaged line raises DamagedFile, except that with `skip_damaged_last` a damaged
    last line (what an interrupted write leaves) is skipped and reported through it."""
    path = Path(run_dir) / "rows.jsonl"
    try:
        text = path.read_text()
    except UnicodeDecodeError as error:
        raise DamagedFile(f"{path}: not text, byte {error.start} is not UTF-8 (a rows.jsonl is JSON lines)") from None
    numbered = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows = []
    for number, line in numbered:
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
            ResultRow.from_json(row)  # its fields are the schema's (ValueError names any other)
            if row["target"] != TARGET:
                raise ValueError(f"a row of {row['target']!r}, not of {TARGET}")
        except ValueError as error:
            message = f"{path}, line {number}: not a row this lab writes ({error})"
            if skip_damaged_last is None or number != numbered[-1][0]:
                raise DamagedFile(message) from None
            skip_damaged_last(f"{message}; skipped it (an interrupted write can cut the last line)")
            continue
        rows.append(row)
    return rows


def load_environment(run_dir: Path) -> dict:
    path = Path(run_dir) / "environment.json"
    if not path.exists():
        return {}
    try:
        env = json.loads(path.read_text())
    except ValueError as error:  # UnicodeDecodeError is one
        line = f", line {error.lineno}" if isinstance(error, json.JSONDecodeError) else ""
        raise DamagedFile(f"{path}{line}: not valid JSON ({error})") from None
    if not isinstance(env, dict):
        raise DamagedFile(f"{path}: not a JSON object")
    if env.get("target") != TARGET:
        raise DamagedFile(f"{path}: not a {TARGET} run's (its target is {env.get('target')!r})")
    return env


# Measured beside the levels: what PyTorch ships, in bf16 and in FP8, and OpenAI's triton_kernels where installed
PEER, FP8_PEER, OGS_PEER = "peer", "peer-fp8", "peer-ogs"
FP8_COMPARED = ("7", "9", "10", PEER, FP8_PEER)  # the FP8 section's levels: Triton bf16, FP8 and both peers


def natural_key(value) -> tuple:
    """A sort key that orders numbers, and text that is a number, by value (level 4 before level 10, E=4 before
    E=16), before other text (the peers after the levels)."""
    text = str(value)
    if re.fullmatch(r"-?\d+(\.\d+)?", text):
        return (0, float(text), "")
    return (1, 0.0, text)


def level_label(row: dict) -> str:
    level = str(row["level"])
    return f"{level}: {row['level_name']}" if level.startswith(PEER) else f"{level} {row['level_name']}"


def label_of(df: pd.DataFrame, level: str) -> str | None:
    """The label of level `level` in these rows, or None where it has none."""
    labels = df.loc[df["level"].map(str) == level, "label"]
    return labels.iloc[0] if len(labels) else None


def frame(rows: list[dict]) -> pd.DataFrame:
    """The rows as a table, a column per ResultRow field (a row from before a field existed has its default: no
    traffic shape is uniform), with a `case` per (preset, traffic) that the report gives a section each; the
    traffic is named only when some run was not uniform."""
    parsed = [ResultRow.from_json(row) for row in rows]
    df = pd.DataFrame([dataclasses.asdict(row) for row in parsed])
    df["host_bound"] = [row.is_host_bound() for row in parsed]  # the current rule, for rows of an older one too
    df["host_ms"] = [row.issue_ms() for row in parsed]
    df["label"] = [level_label(r) for r in rows]
    df["order"] = [natural_key(r["level"]) for r in rows]
    df["case"] = df["preset"]
    if (df["traffic"] != "uniform").any():
        df["case"] += ", " + df["traffic"]
    if (df["router"] != "softmax-topk").any():
        df["case"] += ", " + df["router"] + " router"
    return df.sort_values(["order", "tokens"]).reset_index(drop=True)


def split_ep(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the expert-parallel rows, every other row): the EP level has a section of its own."""
    is_ep = df["level"].map(str) == "ep"
    return df[is_ep].reset_index(drop=True), df[~is_ep].reset_index(drop=True)


def slug(case: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", case).strip("_")


def markdown_table(df: pd.DataFrame, corner: str) -> str:
    """A table of text cells as markdown: the index (headed `corner`) left-aligned, the other columns right."""
    table = df.rename_axis(index=corner, columns=None)
    table.columns = [str(c) for c in table.columns]
    return table.to_markdown(disable_numparse=True, colalign=["left", *["right"] * len(table.columns)])


def fmt_span(value) -> str:
    """A claimed count or amount: one number, or a (low, high) range."""
    low, high = value if isinstance(value, (list, tuple)) else (value, value)
    text = lambda n: str(n) if isinstance(n, int) else fmt(n)  # noqa: E731  (counts are whole numbers)
    return text(low) if text(low) == text(high) else f"{text(low)}–{text(high)}"


def pivot(df: pd.DataFrame, render) -> pd.DataFrame:
    """Levels down (in the rows' order), token counts across; each cell rendered from its row."""
    cells = df.assign(cell=[render(row) for _, row in df.iterrows()])
    table = cells.drop_duplicates(["label", "tokens"], keep="last").pivot(index="label", columns="tokens",
                                                                          values="cell")
    return table.reindex(index=list(dict.fromkeys(df["label"])), columns=sorted(df["tokens"].unique())).fillna("-")


def metric_table(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """Levels down, token counts across: each timed row's `column` (TFLOP/s, % of the roofline, peak MiB)."""
    return pivot(df, status_or(lambda r: fmt(r[column])))


def ms_of(df: pd.DataFrame, label: str, tokens: int) -> float | None:
    match = df[(df["label"] == label) & (df["tokens"] == tokens) & (df["status"] == "ok")]
    return float(match["ms"].iloc[0]) if len(match) else None


# The level each level's lesson builds on, whose code it is a diff of and whose time it is compared with: the
# numbered level before it, but for the two side roads off level 4 (5, its padded buffers in one CUDA graph; 6, its
# permutation compiled) and level 7, which takes level 4's permute → grouped GEMM → combine into Triton; the peers
# and ep against the level they rebuild.
BUILDS_ON = {"5": "4", "6": "4", "7": "4", "peer": "4", "peer-fp8": "peer", "peer-ogs": "9", "ep": "9"}


def builds_on(level) -> str | None:
    """The level `level` builds on (BUILDS_ON); None for level 0."""
    key = str(level)
    if key in BUILDS_ON:
        return BUILDS_ON[key]
    return str(int(key) - 1) if key.isdigit() and int(key) > 0 else None


def compared_level(level, present) -> str | None:
    """The level `level` is compared with in a run that has the levels `present`: the one it builds on, or where
    the run lacks that one, the one that builds on, and so back (a run of levels 4, 7 and 9 compares 9 with 7);
    None where the run has none of them."""
    present = set(map(str, present))
    before = builds_on(level)
    while before is not None and before not in present:
        before = builds_on(before)
    return before


def previous_level_label(df: pd.DataFrame, row) -> str | None:
    """The label of the level a row's level is compared with in these rows (compared_level): a peer's is the level
    it rebuilds, as `aisp lab show` gives it."""
    before = compared_level(row["level"], df["level"])
    return label_of(df, before) if before else None


def previous_level_caption(df: pd.DataFrame) -> str:
    """The speedup-over-the-level-built-on table's title, naming each level compared with another than the one
    numbered before it (a peer with the level it rebuilds)."""
    levels = sorted({str(lvl) for lvl in df["level"]}, key=natural_key)
    others = [f"{level} over {before}" for level in levels
              if (before := compared_level(level, df["level"])) is not None
              and not (level.isdigit() and int(before) == int(level) - 1)]
    return "Speedup over the level each builds on" + (f" ({', '.join(others)})" if others else "")


DECODE_MAX_TOKENS = 512  # at or below this many tokens the layer is bound by reading the experts' weights
DECODE_TITLE = f"Decode regime (T ≤ {DECODE_MAX_TOKENS})"


def decode_caption(copy_gbps: float) -> str:
    return ("GB/s of minimum bytes (the touched experts' weights, tokens in and out) and, in brackets, % of the "
            f"measured copy bandwidth ({copy_gbps:.0f} GB/s)")


def decode_table(df: pd.DataFrame, copy_gbps: float | None) -> pd.DataFrame | None:
    """At the token counts of the decode regime, each level's GB/s of minimum bytes and its share of the measured copy
    bandwidth; None where the rows have no such count or no copy bandwidth was measured (a CPU run)."""
    decode = df[df["tokens"] <= DECODE_MAX_TOKENS]
    if not len(decode) or not copy_gbps:
        return None
    return pivot(decode, status_or(lambda r: f"{r['gbps']:.0f} ({100 * r['gbps'] / copy_gbps:.1f}%)"))


LOAD_TITLE = "Load over the experts in the timed forward"
LOAD_CAPTION = "the same routing for every level at a given T"


def load_table(df: pd.DataFrame) -> pd.DataFrame | None:
    """The routing's balance over the experts at each token count, from any row that measured it (timed or not: the
    routing is the same for every level); None where no row did."""
    if "load_cv" not in df or df["load_cv"].isna().all():
        return None
    measured = df[df["load_cv"].notna()].drop_duplicates("tokens").set_index("tokens").sort_index()
    return pd.DataFrame({
        "CV": measured["load_cv"].map(lambda v: f"{v:.3f}"),
        "Gini": measured["load_gini"].map(lambda v: f"{v:.3f}"),
        "max / mean": measured["load_max_over_mean"].map(lambda v: f"{v:.2f}"),
        "dead experts": measured["dead_experts"].map(lambda v: str(int(v))),
        "dropped tokens": measured["dropped_tokens"].map(lambda v: "-" if pd.isna(v) else str(int(v))),
    })


HOST_BOUND_MARK = "(h)"  # a host-bound row's time, in the time tables, compare's and lab show's
HOST_BOUND_MEANING = "host-bound, the time depends on the host CPU (the row's note says why)"


def time_marks(rows: pd.DataFrame) -> list[tuple[str, str]]:
    """(mark, meaning) of each mark that these rows' time table shows, for its legend."""
    statuses = set(rows["status"])
    host_bound = rows["host_bound"] if "host_bound" in rows else pd.Series(dtype=object)
    memory = "GPU" if (rows["device_type"] == "cuda").any() else "host"
    marks = [(HOST_BOUND_MARK, HOST_BOUND_MEANING,
              host_bound.map(lambda value: pd.notna(value) and bool(value)).any()),
             ("OOM", f"ran out of {memory} memory", "oom" in statuses),
             ("skipped", "not run at this size or on this device", "skipped" in statuses),
             ("checked", "checked in Triton's interpreter, not timed", "checked" in statuses),
             ("error", "failed (the row's note says how)", "error" in statuses)]
    return [(mark, meaning) for mark, meaning, shown in marks if shown]


def time_legend(rows: pd.DataFrame) -> str:
    """The marks of these rows' time table, as a clause: "; `(h)` = host-bound, …" (nothing where there are none)."""
    return "".join(f"; `{mark}` = {meaning}" for mark, meaning in time_marks(rows))


def time_cell(row) -> str:
    """A time table's cell: the row's ms, marked when the row is host-bound (None: not judged, a CPU row)."""
    host_bound = row["host_bound"]
    return f"{fmt(row['ms'])} {HOST_BOUND_MARK}" if pd.notna(host_bound) and bool(host_bound) else fmt(row["ms"])


USEFUL_FLOPS = "2·T·(K + S)·3·H·I"  # what TFLOP/s counts: per (token, expert) pair, 3 GEMMs of H·I multiply-adds

DENSE_GEMMS_TEXT = ("cuBLAS's time for the layer's FLOPs as two dense GEMMs of all T·(K + S) rows (none of MoE's "
                    "routing, gather, padding or sum; in the layer's dtype, so an FP8 level can pass 100%), timed in "
                    "turn with the levels, over each level's time, at the sizes under the matmul roof")


def dense_gemm_pct(row) -> str:
    """cuBLAS's dense GEMMs' time on the row's FLOPs over the row's time, % (`-` where they were not timed)."""
    return fmt(100 * row["dense_gemm_ms"] / row["ms"]) if pd.notna(row["dense_gemm_ms"]) else "-"


def dense_gemm_rates(df: pd.DataFrame) -> str:
    """cuBLAS's dense rate at each token count where it was timed: "cuBLAS's rate: 657 TFLOP/s at 8192 tokens,
    660-667 at 16384" (a range where the levels were timed in batches, each beside its own timing of cuBLAS)."""
    timed = df[df["dense_gemm_ms"].notna() & (df["status"] == "ok")]
    rates = []
    for tokens, rows in timed.groupby("tokens"):
        tflops = rows["tflops"] * rows["ms"] / rows["dense_gemm_ms"]
        low, high = fmt(tflops.min()), fmt(tflops.max())
        rates.append(f"{low if low == high else f'{low}-{high}'}{' TFLOP/s' if not rates else ''} at {tokens}"
                     f"{' tokens' if not rates else ''}")
    return "cuBLAS's rate: " + ", ".join(rates)


def status_or(render):
    """A table cell renderer: `render(row)` for a timed row, `OOM`/`skipped`/`error` for the others."""
    return lambda row: render(row) if row["status"] == "ok" else STATUS_CELL.get(row["status"], row["status"])


def profiled(df: pd.DataFrame) -> pd.DataFrame:
    return df[(df["status"] == "ok") & df["stage_ms"].map(lambda v: isinstance(v, dict))]


def stage_names(df: pd.DataFrame) -> list[str]:
    """Every stage some row timed, in the order the rows list them, the unmarked remainder last."""
    names = list(dict.fromkeys(name for stages in df["stage_ms"] for name in stages if name != OUTSIDE_STAGES))
    return names + [OUTSIDE_STAGES]


def profile_token_counts(df: pd.DataFrame) -> list[int]:
    """The smallest and the largest profiled token count: where launches dominate, and where GEMMs should."""
    tokens = sorted(profiled(df)["tokens"].unique())
    return list(dict.fromkeys([tokens[0], tokens[-1]])) if tokens else []


def stage_title(tokens: int) -> str:
    return f"Where the time goes at {tokens_text(tokens)}"


def stage_caption(df: pd.DataFrame) -> str:
    """What the stage tables' cells are (the number of calls is the most any profiled row made)."""
    calls = int(profiled(df)["profile_calls"].max())
    return (f"ms per call in each stage, the mean of up to {calls} calls timed on the device's clock, and its share of "
            "routing plus forward. *routing* is the router (the same for every level, run before the forward); "
            f"*{OUTSIDE_STAGES}* is forward time no stage covers (Python between stages, allocation; for the "
            "CUDA-graph levels the whole replay, which has no stage boundaries). *forward* is the profiled "
            "forward without routing; the markers cost time of their own, so it can exceed *timed*, the "
            "median of the unprofiled timing")


def stage_times(df: pd.DataFrame, tokens: int) -> pd.DataFrame:
    """The profiled levels at `tokens`, a line each: each stage's ms and its share of routing plus forward, the
    forward without routing, and the unprofiled median."""
    at = profiled(df)
    at = at[at["tokens"] == tokens]
    names = stage_names(at)
    table = pd.DataFrame(index=list(at["label"]), columns=[*names, "forward", "timed"], dtype=object)
    for _, row in at.iterrows():
        total = sum(row["stage_ms"].values())
        for name in names:
            ms = row["stage_ms"].get(name)
            table.loc[row["label"], name] = "-" if ms is None else f"{fmt(ms)} ({100 * ms / total:.0f}%)"
        table.loc[row["label"], "forward"] = fmt(total - row["stage_ms"].get("routing", 0.0))
        table.loc[row["label"], "timed"] = fmt(row["ms"])
    return table


def stage_table(df: pd.DataFrame, tokens: int) -> str:
    """stage_times as markdown: summary.md's, and a level script's --profile."""
    return markdown_table(stage_times(df, tokens), "level \\ stage")


def speedup_vs(df: pd.DataFrame, reference_label_of, cell=lambda ratio: f"{ratio:.2f}x"):
    """A table cell renderer: the reference level's ms over the row's at the row's token count (the reference's
    label a function of the row), written by `cell` (report.html's marks a win), `-` where the reference was not
    timed."""
    def render(row):
        reference = reference_label_of(row)
        reference_ms = ms_of(df, reference, row["tokens"]) if reference else None
        return cell(reference_ms / row["ms"]) if reference_ms else "-"
    return status_or(render)


def preset_section(df: pd.DataFrame, env: dict) -> str:
    first = df.iloc[0]
    shape = shape_label(first)
    all_rows, df = df, timed_levels(df)

    parts = [
        f"## {first['case']} ({shape})",
        f"Time per forward, ms (median{time_legend(all_rows)}):",
        markdown_table(pivot(all_rows, status_or(time_cell)), "level \\ tokens"),
    ]
    if not (df["status"] == "ok").any():  # every level checked, skipped or failed: no speeds to tabulate
        parts.append(NOTHING_TIMED)
        df = df.iloc[:0]
    baselines = speedup_baselines(df)
    if any(baselines.values()):
        title, caption = speedup_title_and_caption(baselines)
        parts += [f"{title} ({caption}):",
                  markdown_table(pivot(df, speedup_vs(df, lambda r: baselines[r["tokens"]])), "level \\ tokens")]
    if len(df):
        parts += [
            f"{previous_level_caption(df)}:",
            markdown_table(pivot(df, speedup_vs(df, lambda r: previous_level_label(df, r))), "level \\ tokens"),
        ]
    if counterparts := cpu_counterpart_notes(df):
        parts.append("Where the GPU idea does not carry over to the CPU:\n\n"
                     + "\n".join(f"- {note}" for note in counterparts))
    if len(df):
        parts += [
            f"TFLOP/s (useful FLOPs: {USEFUL_FLOPS}):",
            markdown_table(metric_table(df, "tflops"), "level \\ tokens"),
        ]
    # A CPU run measures no ceilings and no device memory: no table of dashes for either.
    if df["pct_roofline"].notna().any():
        parts += [f"% of the roofline ({roofline_caption(df)}):",
                  markdown_table(metric_table(df, "pct_roofline"), "level \\ tokens")]
    if df["dense_gemm_ms"].notna().any():
        parts += [f"% of cuBLAS on the same FLOPs: {DENSE_GEMMS_TEXT}. {dense_gemm_rates(df)}:",
                  markdown_table(pivot(df, status_or(dense_gemm_pct)), "level \\ tokens")]
    if df["peak_mb"].notna().any():
        parts += [f"{PEAK_CAPTION}:", markdown_table(metric_table(df, "peak_mb"), "level \\ tokens")] \
            if df["peak_garbage_free"].any() else [PEAK_NOT_SHOWN]
    copy_gbps = (env.get("ceilings") or {}).get("copy_gbps")
    if (decode := decode_table(df, copy_gbps)) is not None:
        parts += [f"{DECODE_TITLE}: {decode_caption(copy_gbps)}:", markdown_table(decode, "level \\ tokens")]
    if (load := load_table(all_rows)) is not None:
        parts += [f"{LOAD_TITLE} ({LOAD_CAPTION}):", markdown_table(load, "tokens")]
    for tokens in profile_token_counts(df):
        parts += [f"{stage_title(tokens)} (`--profile`): {stage_caption(df)}:", stage_table(df, tokens)]
    notes = [f"- {r['label']}, {tokens_text(r['tokens'])}: {r['status']}: {row_note(r)}"
             for _, r in all_rows.iterrows() if row_note(r)]
    if notes:
        parts += ["Notes from the rows:", "\n".join(notes)]
    return "\n\n".join(parts)


def row_note(row) -> str:
    """A row's note, led by *host-bound* where the host took longer to issue a forward than the GPU to run it, or
    the GPU was busy under half of the timed forward."""
    note = row["note"] or ""
    host_bound = row.get("host_bound")
    if pd.notna(host_bound) and bool(host_bound):
        host_ms = row.get("host_ms")
        if pd.notna(host_ms) and host_ms > row["ms"]:
            lead = (f"host-bound (the host took {host_ms * 1e3:.1f} µs to issue each forward, and a forward took "
                    f"{row['ms'] * 1e3:.1f} µs on the GPU's clock: back to back, the host would set the pace)")
        else:
            busy = row.get("gpu_busy_pct")  # not recorded by runs before the busy share was measured
            busy = f"the GPU was busy {busy:.0f}% of the forward: " if pd.notna(busy) else ""
            lead = f"host-bound ({busy}the time depends on the host CPU and the gaps between launches)"
        note = f"{lead}; {note}" if note else lead
    return note


def has_fp8(df: pd.DataFrame) -> bool:
    """Whether some row multiplied FP8 operands: those rows, and only those, carry a quant_err."""
    return "quant_err" in df and df["quant_err"].notna().any()


def times_fp8(df: pd.DataFrame) -> bool:
    """Whether some FP8 row was timed: a CPU run checks level 10 in the interpreter and times no FP8 row, so its FP8
    section holds the quantization's error alone."""
    return has_fp8(df[df["status"] == "ok"])


def fp8_cases(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(case, its rows of levels 7, 9, 10 and both peers) for each case with FP8 rows."""
    parts = [(case, df[(df["case"] == case) & df["level"].map(str).isin(FP8_COMPARED)].reset_index(drop=True))
             for case in dict.fromkeys(df["case"])]
    return [(case, part) for case, part in parts if has_fp8(part)]


def quant_err_cell(row) -> str:
    return "-" if pd.isna(row["quant_err"]) else f"{row['quant_err']:.3f}"


FP8_INTRO = ("Level 10 and the FP8 peer multiply e4m3 operands (one byte, twice the bf16 tensor-core rate). Their "
             "check, rel err in the rows, is against the fp32 reference on their own quantized values, so it "
             "measures the kernels; quant err is ‖out − ref‖ / ‖ref‖ against the unquantized layer's fp32 "
             "reference, the quantization's own cost. Their % of the roofline, in the tables above too, is against "
             "the measured FP8 matmul rate, where the other levels' is against the bf16 one.")


QUANT_ERR_CAPTION = "quant err (against the unquantized layer's fp32 reference)"


def fp8_speedup_caption(reference: str) -> str:
    return f"Speedup over {reference} (its ms over the level's)"


def fp8_section(df: pd.DataFrame) -> str:
    """Per case with FP8 rows: levels 7, 9, 10 and both peers side by side, in TFLOP/s, over level 9 and over the
    FP8 peer, and each FP8 row's quant err."""
    parts = ["## FP8 (e4m3)", FP8_INTRO]
    for case, part in fp8_cases(df):
        timed = timed_levels(part)
        parts.append(f"### {case} ({shape_label(part.iloc[0])})")
        if times_fp8(timed):
            parts += ["TFLOP/s:",
                      markdown_table(metric_table(timed, "tflops"), "level \\ tokens")]
            for reference in filter(None, (label_of(timed, "9"), label_of(timed, FP8_PEER))):
                parts += [f"{fp8_speedup_caption(reference)}:",
                          markdown_table(pivot(timed, speedup_vs(timed, lambda r: reference)), "level \\ tokens")]
        parts += [f"{QUANT_ERR_CAPTION}:",
                  markdown_table(pivot(part[part["quant_err"].notna()], quant_err_cell), "level \\ tokens")]
    return "\n\n".join(parts)


def unfinished_banner(env: dict) -> tuple[str, str] | None:
    """(label, text) a run folder's page opens with when its run did not finish: stopped (Ctrl-C), or killed
    before it could record its finish (a time limit, a signal)."""
    if env.get("interrupted"):
        return "Interrupted:", "this run was stopped before it finished; the tables hold the rows it finished."
    if env and "finished_utc" not in env:
        return ("Did not finish:", "this run's process ended before it recorded its finish (a time limit or a "
                                   "signal); the tables hold the rows it finished.")
    return None


def ceilings_text(ceilings: dict) -> str:
    """The measured ceilings in words; the FP8 matmul's where the run measured one."""
    fp8 = ceilings.get("fp8_matmul_tflops")
    return (f"bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s, "
            + (f"FP8 matmul {fp8:.0f} TFLOP/s, " if fp8 is not None else "")
            + f"device copy {ceilings['copy_gbps']:.0f} GB/s (read + write)")


def device_name(env: dict) -> str:
    """The device a run's environment.json names, with the CPU's model on a CPU run."""
    name = env.get("device", "?")
    return f"{name} ({env['cpu_model']})" if env.get("device_type") == "cpu" and env.get("cpu_model") else name


def environment_items(env: dict, rows: list[dict]) -> list[str]:
    """What the run ran on and how, a markdown line each: summary.md's list and report.html's."""
    ceilings = env.get("ceilings") or {}
    items = [
        f"device: **{device_name(env)}**, driver {env.get('driver') or '-'}, CUDA {env.get('cuda') or '-'}",
        f"torch {env.get('torch')}, triton {env.get('triton') or '-'}, python {env.get('python')}",
        *([f"OpenAI's triton_kernels (the matmul_ogs peer's) from {env['triton_kernels']}"]
          if env.get("triton_kernels") else []),
        f"started {env.get('started_utc')} (UTC), host {env.get('host')}",
        f"command: `{env.get('command')}`",
    ]
    if env.get("code"):
        items.append(f"code: commit {env['code']}")
    if env.get("timed_calls"):
        low, high = env["timed_calls"]
        asked = (env.get("args") or {}).get("repeats", "?")
        counted = low if low == high else f"{low}–{high}"
        items.append(f"timed calls per row: {counted} (asked for {asked}: at least 5 on the CPU; on a GPU do_bench "
                     "sizes its timed loop by its own estimate of a call and its L2 clear, and counts its calls "
                     "itself)")
    if rounds := (env.get("args") or {}).get("timing_rounds"):  # runs from 9bd73d8 on; before, one level at a time
        items.append(f"each case's levels checked first, then timed in turn: {rounds} rounds, alternately in level "
                     "order and in reverse (a GPU under its power cap slows as it heats)")
    if ceilings:
        items.append(f"measured ceilings: {ceilings_text(ceilings)}")
    else:
        items.append("no ceilings measured (CPU run): `pct_roofline` is empty")
    return items + [text for text in (clock_text(rows), host_text(rows)) if text]


def environment_section(env: dict, rows: list[dict]) -> str:
    if not env:
        return ""
    lines = [f"**{banner[0]}** {banner[1]}\n"] if (banner := unfinished_banner(env)) else []
    return "\n".join(lines + [f"- {item}" for item in environment_items(env, rows)])


PUBLISHED_MARK = ("<!-- copied from ", "/summary.md by aisp; do not edit -->")  # around a run folder's name


def published_mark(run_name: str) -> str:
    """The line LATEST.md opens each published run's summary with (`aisp bench publish`)."""
    return f"{PUBLISHED_MARK[0]}{run_name}{PUBLISHED_MARK[1]}"


def published_runs(latest_md: str) -> set[str]:
    """The run folders LATEST.md's text was published from."""
    return set(re.findall(re.escape(PUBLISHED_MARK[0]) + r"(\S+?)" + re.escape(PUBLISHED_MARK[1]), latest_md))


def host_text(rows: list[dict]) -> str:
    """The host's time to issue a forward, over the rows of levels that never wait for the GPU, and how many rows
    are host-bound; "" for rows from before the harness measured it, or from a CPU."""
    parsed = [ResultRow.from_json(row) for row in rows]
    issue_us = sorted(row.issue_ms() * 1e3 for row in parsed if row.issue_ms() is not None)
    if not issue_us:
        return ""
    judged = [row.is_host_bound() for row in parsed if row.is_host_bound() is not None]
    return (f"host's time to issue one forward, for the levels that never wait for the GPU: {issue_us[0]:.0f}–"
            f"{issue_us[-1]:.0f} µs (median {statistics.median(issue_us):.0f}); host-bound: {sum(judged)} of "
            f"{len(judged)} rows (the row's note says why)")


def clock_text(rows: list[dict]) -> str:
    """The SM clock the rows' timed calls ended at, and how many ended under the power cap; "" for rows from before
    the harness read it, or from a CPU."""
    clocked = [row for row in rows if row.get("sm_clock_mhz") is not None]
    if not clocked:
        return ""
    clocks = [row["sm_clock_mhz"] for row in clocked]
    capped = sum(bool(row.get("power_capped")) for row in clocked)
    return (f"SM clock right after each row's timed calls: {min(clocks)}–{max(clocks)} MHz; the software power cap "
            f"held it down after {capped} of {len(clocked)} rows, whose times are the card's sustained rate at its "
            "power limit, not its peak clock's")


# The plots. Every figure gives a level the same colour, names what it shows in words, keeps its legend off the
# data, and marks what was not timed (out of memory, skipped, checked) where a reader would look for it.
# Level n's colour is LEVEL_COLORS[n]: tab10's nine colours but its grey (the peers') for levels 0-8, then navy and
# wine for 9 and 10, dark hues tab10 lacks, so no two levels are closer (CIEDE2000) than tab10's own red and brown
# (a second palette's teal and orange there read as 8's cyan and 1's orange).
LEVEL_COLORS = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7] + ["#000080", "#8e0152"]
PEER_COLOR = "0.45"  # tab10's grey, kept out of LEVEL_COLORS for the peers alone
PEER_COLORS = {PEER: PEER_COLOR, FP8_PEER: "0.15", OGS_PEER: "0.7"}  # greys, every peer hatched and dashed
STATUS_MARKER = {"oom": "x", "skipped": "o", "error": "D", "checked": "s"}
STATUS_SYMBOL = {"oom": "× out of memory", "skipped": "○ skipped", "error": "◇ error",
                 "checked": "□ checked, not timed"}  # the markers, in words


def level_colors(df: pd.DataFrame) -> dict:
    """label -> colour: level n takes the n-th colour in every figure of every run; the peers are greys."""
    return {label: LEVEL_COLORS[int(level) % len(LEVEL_COLORS)] if str(level).isdigit()
            else PEER_COLORS.get(str(level), PEER_COLOR) for label, level in zip(df["label"], df["level"])}


def line_style(label: str) -> str:
    return "--" if label.startswith("peer") else "-"


def tokens_text(tokens: int) -> str:
    """"1 token", "64 tokens": a count in a sentence."""
    return f"{tokens} token{'s' if tokens != 1 else ''}"


def token_label(tokens: int) -> str:
    """1, 64, 2K, 8K, 32K, 1M: short tick labels, in K (1024) or M (1024²) where the count is a whole number of them
    (else as it is: 2,000,000,000, not 1953125K)."""
    for unit, size in (("M", 1024 ** 2), ("K", 1024)):
        if tokens >= size and tokens % size == 0 and tokens // size < 1024:
            return f"{tokens // size}{unit}"
    return f"{tokens:,}"


def case_title(case: str) -> str:
    """The case as a title: "journey, hot(50% of tokens)" reads "journey, hot (50% of tokens)"."""
    return re.sub(r"(?<=\w)\(", " (", case)


def token_axis(ax, tokens: list[int]) -> None:
    """A log token axis with a labelled tick at each measured count and no others; the labels turn when two
    neighbours are too close to sit side by side."""
    ax.set_xscale("log")
    ax.set_xticks(tokens, [token_label(t) for t in tokens])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlim(tokens[0] / 1.6, tokens[-1] * 1.6)
    span = math.log(tokens[-1] * 1.6 ** 2 / tokens[0])
    if any(math.log(b / a) < span / 20 for a, b in zip(tokens, tokens[1:])):
        ax.tick_params(axis="x", labelrotation=45)


def log_value_axis(axis, suffix: str = "") -> None:
    """Plain labels on a log value axis ("0.29", "1.1×", not matplotlib's 2.9×10⁻¹), call once its data are drawn:
    at the decades where it spans three or more, at 1-2-5 steps where it spans one to three, and at a few even steps
    where it spans less (no decade, maybe no 1-2-5 value, inside it)."""
    low, high = axis.get_view_interval()
    if high / low < 10:
        axis.set_major_locator(matplotlib.ticker.MaxNLocator(5, steps=[1, 2, 2.5, 5, 10]))
        axis.set_minor_locator(matplotlib.ticker.NullLocator())
    elif high / low < 1000:
        axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}{suffix}"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def not_timed_strip(ax, df: pd.DataFrame, colors: dict) -> None:
    """A strip above a token plot: a row per level with cells not timed, named with why, a marker at each."""
    missing = df[df["status"].isin(STATUS_MARKER)]
    labels = list(dict.fromkeys(missing["label"]))
    for y, label in enumerate(labels):
        for _, row in missing[missing["label"] == label].iterrows():
            ax.plot(row["tokens"], y, marker=STATUS_MARKER[row["status"]], color=colors[label], markersize=7,
                    fillstyle="none", linestyle="none")
    whys = [", ".join(STATUS_CELL[s] for s in dict.fromkeys(missing[missing["label"] == label]["status"]))
            for label in labels]
    ax.set_yticks(range(len(labels)), [f"{label}: {why}" for label, why in zip(labels, whys)], fontsize=7)
    for tick, label in zip(ax.get_yticklabels(), labels):
        tick.set_color(colors[label])
    ax.set_ylim(len(labels) - 0.4, -0.6)
    ax.tick_params(axis="x", labelbottom=False)
    ax.set_title(f"not timed at these token counts "
                 f"({', '.join(STATUS_SYMBOL[s] for s in STATUS_SYMBOL if (missing['status'] == s).any())})",
                 fontsize=8, loc="left")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def legend_right(ax) -> None:
    """The legend beside the axes, clear of the data and of the figure's title; none where nothing was drawn (no
    cell timed: the strip above says why)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8, frameon=False)


def plot_by_tokens(df: pd.DataFrame, column: str, ylabel: str, yscale: str, title: str, path: Path) -> str:
    """One line per level of `column` against the token count, with the not-timed strip above when some cell
    was not timed; the legend to the right."""
    colors = level_colors(df)
    tokens = sorted(df["tokens"].unique())
    strip_rows = df[df["status"].isin(STATUS_MARKER)]["label"].nunique()
    if strip_rows:
        fig, (strip, ax) = plt.subplots(2, 1, sharex=True, figsize=(9, 5 + 0.22 * strip_rows), layout="constrained",
                                        height_ratios=[0.5 + 0.3 * strip_rows, 5])
    else:
        fig, ax = plt.subplots(figsize=(9, 5), layout="constrained")
    ok = df[(df["status"] == "ok") & df[column].notna()]
    host_bound = ok[ok["host_bound"].fillna(False).astype(bool)]  # the tables' (h), as hollow points
    for label in dict.fromkeys(df["label"]):
        part = ok[ok["label"] == label]
        if len(part):
            ax.plot(part["tokens"], part[column], marker="o", markersize=4, label=label, color=colors[label],
                    linestyle=line_style(label))
            hollow = host_bound[host_bound["label"] == label]
            ax.plot(hollow["tokens"], hollow[column], marker="o", markersize=6, linestyle="none",
                    markerfacecolor="white", color=colors[label])
    if len(host_bound):
        ax.plot([], [], marker="o", markersize=6, linestyle="none", markerfacecolor="white", color="black",
                label=f"hollow: host-bound {HOST_BOUND_MARK}")  # the tables' legend says what that means
    ax.set(yscale=yscale, xlabel="tokens (T)", ylabel=ylabel)
    if yscale == "linear":
        ax.set_ylim(bottom=0)
    else:
        log_value_axis(ax.yaxis)
    token_axis(ax, tokens)
    ax.grid(True, alpha=0.3)
    if strip_rows:
        not_timed_strip(strip, df, colors)
    legend_right(ax)
    fig.suptitle(title)
    return save(fig, path)


def speedup_baseline(df: pd.DataFrame, tokens: int) -> str | None:
    """The level the speedups at `tokens` are over: level 0 where it was timed, else the slowest level timed."""
    timed = df[(df["tokens"] == tokens) & (df["status"] == "ok") & df["level"].map(lambda v: str(v).isdigit())]
    if not len(timed):
        return None
    zero = timed[timed["level"].map(str) == "0"]
    return (zero if len(zero) else timed.sort_values("ms")).iloc[-1]["label"]


def speedup_baselines(df: pd.DataFrame) -> dict:
    """Each token count's speedup_baseline."""
    return {t: speedup_baseline(df, t) for t in sorted(df["tokens"].unique())}


def speedup_title_and_caption(baselines: dict) -> tuple[str, str]:
    """The speedup table's title and what its cells are: over level 0 (naming, where level 0 was not timed, the
    slowest level timed at that count), over the one level that was the slowest at every count, or over each
    count's slowest level."""
    named = set(filter(None, baselines.values()))
    others = {t: b for t, b in baselines.items() if b and not b.startswith("0 ")}
    if any(b.startswith("0 ") for b in named):
        where = (" (where level 0 was not timed, over the slowest level timed: "
                 + ", ".join(f"at {token_label(int(t))} tokens {b}" for t, b in others.items()) + ")" if others
                 else "")
        return "Speedup over level 0", f"the ms of level 0{where} over the level's ms"
    if len(named) == 1:
        only = next(iter(named))
        return f"Speedup over {only}", f"the ms of {only}, the slowest level timed, over the level's ms"
    return ("Speedup over the slowest level",
            "the ms of the slowest level timed at each token count (the peers are not levels) over the level's ms")


def plot_speedup(df: pd.DataFrame, title: str, path: Path) -> str | None:
    """Grouped bars: at each token count, every level's speedup over level 0 there (or, where level 0 was not
    timed, over the slowest level that was, named under the count); a cell not timed says why in its slot."""
    colors = level_colors(df)
    labels = list(dict.fromkeys(df["label"]))
    tokens = sorted(df["tokens"].unique())
    baselines = speedup_baselines(df)
    main = max(dict.fromkeys(b for b in baselines.values() if b), key=list(baselines.values()).count, default=None)
    if main is None:
        return None  # no numbered level was timed at any count
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(10, 5), layout="constrained")
    at_bottom = matplotlib.transforms.blended_transform_factory(ax.transData, ax.transAxes)
    for i, label in enumerate(labels):
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(tokens))]
        speedups = []
        for x, t in zip(xs, tokens):
            base_ms, ms = (ms_of(df, baselines[t], t) if baselines[t] else None), ms_of(df, label, t)
            speedups.append(base_ms / ms if base_ms and ms else float("nan"))
            status = df[(df["label"] == label) & (df["tokens"] == t)]["status"]
            if len(status) and status.iloc[0] in STATUS_MARKER:
                ax.text(x, 0.02, STATUS_CELL[status.iloc[0]], transform=at_bottom, rotation=90, ha="center",
                        va="bottom", fontsize=6, color=colors[label])
        # Each bar from 1× to its speedup, up for faster and down for slower: from the axis' bottom, a 0.93× bar
        # would stand a sliver high beside a 0.97× one three quarters up.
        ax.bar(xs, [s - 1 for s in speedups], width, bottom=1, label=label, color=colors[label],
               hatch="//" if label.startswith("peer") else None, edgecolor="white", linewidth=0.3)
    names = [token_label(t) if baselines[t] in (main, None)
             else f"{token_label(t)}\nover level {baselines[t].split()[0]}" for t in tokens]
    ax.set_xticks(range(len(tokens)), names, fontsize=8)
    ax.set(yscale="log", xlabel="tokens (T)",
           ylabel=f"speedup over {main}" + ("\n(where it was not timed: over the slowest level timed)"
                                            if any(b not in (main, None) for b in baselines.values()) else ""))
    ax.axhline(1.0, color="black", linewidth=0.8)
    log_value_axis(ax.yaxis, "×")
    ax.grid(True, axis="y", alpha=0.3)
    legend_right(ax)
    fig.suptitle(title)
    return save(fig, path)


def plot_preset(df: pd.DataFrame, out_dir: Path, preset: str) -> list[str]:
    """The PNGs of one case (a preset, or a preset under one traffic shape); returns their file names."""
    case, device = case_title(df["case"].iloc[0]), df["device"].iloc[0]
    names = []
    if (df["status"] == "ok").any():  # else the time table and the notes say why nothing was timed
        names.append(plot_by_tokens(df, "ms", "ms per forward (median, log)", "log",
                                    f"{case}: time per forward ({device})", out_dir / f"time_{preset}.png"))
    if timed_levels(df)["label"].nunique() > 1:
        names += filter(None, [plot_speedup(timed_levels(df), f"{case}: speedup per level ({device})",
                                            out_dir / f"speedup_{preset}.png")])
    if df["pct_roofline"].notna().any():
        names.append(plot_by_tokens(df, "pct_roofline", "% of the measured roofline", "linear",
                                    f"{case}: % of the measured roofline ({device})",
                                    out_dir / f"roofline_{preset}.png"))
    if len(profiled(df)):
        names.append(plot_stages(df, out_dir, preset))
    if "tokens_per_expert" in df and df["tokens_per_expert"].notna().any():
        largest = df[df["tokens_per_expert"].notna()].sort_values("tokens").iloc[-1]
        counts = largest["tokens_per_expert"]
        fig, ax = plt.subplots(figsize=(9, 4), layout="constrained")
        ax.bar(range(len(counts)), counts, width=1.0 if len(counts) > 32 else 0.8, color="#8da0cb")  # no level's
        ax.axhline(sum(counts) / len(counts), color="black", linewidth=0.8, label="mean over the experts")
        ax.set(xlabel="expert", ylabel="(token, slot) pairs")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # experts are whole numbers
        legend_right(ax)
        fig.suptitle(f"{case}: load per expert at {token_label(largest['tokens'])} tokens")
        names.append(save(fig, out_dir / f"load_{preset}.png"))
    return names


def plot_stages(df: pd.DataFrame, out_dir: Path, preset: str) -> str:
    """One stacked bar per level: the share of its profiled forward each stage took, total ms at the bar's end;
    a panel each for the smallest and the largest profiled token count. Colours here are the stages'; the level
    names take their levels' colours."""
    counts = profile_token_counts(df)
    fig, axes = plt.subplots(1, len(counts), figsize=(7 * len(counts), 5), squeeze=False, layout="constrained")
    names = stage_names(profiled(df))
    colors = dict(zip(names, plt.get_cmap("Set2").colors))
    label_color = level_colors(df)
    for ax, tokens in zip(axes[0], counts):
        at = profiled(df)
        at = at[at["tokens"] == tokens]
        labels = list(at["label"])
        left = [0.0] * len(at)
        for name in names:
            shares = [100 * row["stage_ms"].get(name, 0.0) / sum(row["stage_ms"].values())
                      for _, row in at.iterrows()]
            ax.barh(labels, shares, left=left, color=colors[name], label=name if ax is axes[0][0] else None,
                    hatch="//" if name == OUTSIDE_STAGES else None)
            left = [a + b for a, b in zip(left, shares)]
        for y, (_, row) in enumerate(at.iterrows()):
            ax.annotate(f"{fmt(sum(row['stage_ms'].values()))} ms", (100, y), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=7)
        for tick in ax.get_yticklabels():
            tick.set_color(label_color[tick.get_text()])
        ax.invert_yaxis()
        ax.set(xlim=(0, 118), xlabel="% of routing + forward (profiled)", title=f"at {token_label(tokens)} tokens")
        ax.tick_params(axis="y", labelsize=8)
    fig.legend(loc="outside lower center", ncol=min(len(names), 6), fontsize=8, frameon=False)
    fig.suptitle(f"{case_title(df['case'].iloc[0])}: where the time goes, stage by stage ({df['device'].iloc[0]})")
    return save(fig, out_dir / f"stages_{preset}.png")


def with_efficiency(df: pd.DataFrame) -> pd.DataFrame:
    """The EP rows with their weak-scaling `efficiency`: the same case's time at world size 1 and the same tokens
    per rank over the row's time (NaN where either was not timed)."""
    keys = ["case", "tokens_per_rank"]
    timed = df[df["status"] == "ok"]
    alone = timed[timed["world_size"] == 1].drop_duplicates(keys, keep="last")[[*keys, "ms"]]
    ms_alone = df[keys].merge(alone, on=keys, how="left")["ms"].to_numpy()
    return df.assign(efficiency=(ms_alone / df["ms"]).where(df["status"] == "ok"))


def efficiency_text(efficiency: float) -> str:
    return "-" if pd.isna(efficiency) else f"{efficiency:.2f}"


def ep_table(df: pd.DataFrame) -> pd.DataFrame:
    """The expert-parallel rows: one per (case, tokens per rank, world size), the unpipelined time split into its
    phases, the chosen chunk count and the communication left exposed before and after pipelining, the bytes the
    all-to-alls moved, the bandwidths, and the weak-scaling efficiency against world size 1."""
    table_rows = []
    for _, row in with_efficiency(df).sort_values(["case", "tokens_per_rank", "world_size"]).iterrows():
        ok = row["status"] == "ok"
        cells = [fmt(row[c]) if ok else "-" for c in ("ms", "dispatch_ms", "compute_ms", "combine_ms")]
        if not ok:
            cells[0] = STATUS_CELL.get(row["status"], row["status"])
        chunks = str(int(row["chunks"])) if ok and not pd.isna(row["chunks"]) else "-"
        exposed = [fmt(row[c]) if ok else "-" for c in ("exposed_comm_ms_c1", "exposed_comm_ms")]
        mb = fmt(row["a2a_bytes"] / 2**20) if ok else "-"
        table_rows.append([row["case"], str(int(row["tokens_per_rank"])), str(int(row["world_size"])),
                           str(row["experts"]), *cells, chunks, *exposed, mb,
                           # at W = 1 nothing crosses to another rank: no rate
                           *(fmt(row[c]) if ok and (row["world_size"] > 1 or c == "rank_load_max_over_mean") else "-"
                             for c in ("dispatch_gbps", "a2a_busbw_gbps", "allreduce_busbw_gbps",
                                       "rank_load_max_over_mean")),
                           efficiency_text(row["efficiency"])])
    header = ["case", "tokens / rank", "W", "experts", "ms", "dispatch", "expert compute", "combine", "chunks",
              "exposed comm, 1 chunk", "exposed comm, chunked", "MiB across ranks", "dispatch GB/s",
              "all-to-all busbw GB/s", "all-reduce busbw GB/s", "busiest rank / mean", "weak-scaling eff."]
    return pd.DataFrame(table_rows, columns=header).set_index("case")


PHASES_RANK_WHY = {"busiest": "the one whose expert compute took longest",
                   "slowest": "under skewed traffic a light one, whose combine waits for the others"}


def phases_rank_text(df: pd.DataFrame, why: bool = True) -> str:
    """Which rank the rows' phases and exposed times were read on (rows from before 2026-11-26: the slowest)."""
    ranks = sorted(set(df["phases_rank"].fillna("slowest")) if "phases_rank" in df else {"slowest"})
    return " or ".join(f"the {rank} rank" + (f" ({PHASES_RANK_WHY[rank]})" if why else "") for rank in ranks)


def ep_machine(df: pd.DataFrame, env: dict) -> str:
    """"On 2× NVIDIA H200, NVLink NV18 between the two. ": the cards a GPU run's EP rows ran on (empty on the CPU)."""
    return f"On {machine_text(env)}. " if (df["device_type"] == "cuda").all() else ""


def ep_caption(df: pd.DataFrame, env: dict) -> str:
    """What ep_table's columns mean, on which cards."""
    local = ", ".join(sorted(set(df["local_level"].dropna())))
    return (
        f"{ep_machine(df, env)}Weak scaling: at world size W each rank holds the preset's E experts (W·E in all) "
        "and its own T tokens; "
        f"the local experts run on {local or 'the best single-GPU level'}. ms is the slowest rank's median "
        "forward in the chunk count (*chunks*) that brief timings of the candidates found fastest; the phases "
        f"(ms) are those of the unpipelined forward (one chunk), one after another, on {phases_rank_text(df)}. "
        "*Exposed comm* is that rank's forward's "
        "time minus its expert compute (shared experts included): the communication, and the waits for other "
        "ranks, that no compute hid, unpipelined and in the chosen chunks (at W = 1 what every W pays beside the "
        "experts: the plan, its host sync, the sort and the local copies). *MiB across ranks* is what the dispatch "
        "and the combine sent to other ranks per forward, all ranks together; *dispatch GB/s* is the busiest "
        "rank's dispatched bytes over its unpipelined dispatch time (sort and counts exchange included, and with "
        "shared experts the first half of them, which runs under the dispatch: a floor on the link's rate); the bus "
        "bandwidths are NCCL-tests' measure of a "
        "plain all-to-all and all-reduce of the dispatch's size on the same processes; weak-scaling efficiency "
        "is the world-size-1 time over this row's.")


def ep_notes(df: pd.DataFrame) -> list[str]:
    """The EP rows' notes, a line each, named by world size, case and tokens per rank."""
    return [f"W={int(r['world_size'])}, {r['case']}, {int(r['tokens_per_rank'])} tokens per rank: {r['status']}: "
            f"{r['note']}" for _, r in df.iterrows() if r["note"]]


def ep_section(df: pd.DataFrame, out_dir: Path, env: dict) -> str:
    """The expert-parallel section: ep_table with what its columns mean, the rows' notes, and the phases' figure."""
    parts = ["## Expert parallelism (level ep)", ep_caption(df, env), markdown_table(ep_table(df), "case"),
             *cpu_counterpart_notes(df)]
    if notes := ep_notes(df):
        parts += ["Notes from the rows:", "\n".join(f"- {note}" for note in notes)]
    ok = df[df["status"] == "ok"]
    if len(ok):
        fig, ax = plt.subplots(figsize=(9, 1.5 + 0.45 * len(ok)), layout="constrained")
        ok = ok.sort_values(["case", "tokens_per_rank", "world_size"])
        labels = [f"{case_title(c)}, {token_label(int(t))} tokens/rank, W={int(w)}" for c, t, w in
                  zip(ok["case"], ok["tokens_per_rank"], ok["world_size"])]
        left = [0.0] * len(ok)
        for (column, name), color in zip((("dispatch_ms", "dispatch"), ("compute_ms", "expert compute"),
                                          ("combine_ms", "combine")), plt.get_cmap("Set2").colors):
            ax.barh(labels, ok[column], left=left, label=name, color=color)
            left = [a + b for a, b in zip(left, ok[column])]
        ax.invert_yaxis()
        ax.set(xlabel=f"ms per unpipelined forward, on {phases_rank_text(df, why=False)}")
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(True, axis="x", alpha=0.3)
        legend_right(ax)
        fig.suptitle(f"Expert parallelism: each forward's phases ({df['device'].iloc[0]})")
        name = save(fig, out_dir / "expert_parallel.png")
        parts.append(f"![{name}]({name})")
    if weak_scaling := plot_weak_scaling(df, out_dir):
        parts.append(f"![{weak_scaling}]({weak_scaling})")
    return "\n\n".join(parts)


def world_size_axis(ax, sizes: list[int], ranks: str) -> None:
    """A log2 world-size axis with a labelled tick at each measured W and no others; `ranks` names what a rank is."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(w) for w in sizes])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlim(sizes[0] / 1.3, sizes[-1] * 1.3)
    ax.set_xlabel(f"world size W ({ranks})")


def plot_weak_scaling(df: pd.DataFrame, out_dir: Path) -> str | None:
    """Where the EP rows timed more than one world size: the weak-scaling efficiency against W, a line per (case,
    tokens per rank), and beside it the all-to-all's and the all-reduce's bus bandwidth on the same processes, at
    the largest tokens per rank (the collectives run at the dispatch's size, so the smaller count adds lines that
    say little more). A case keeps its colour in both panels."""
    timed = with_efficiency(df)
    timed = timed[timed["status"] == "ok"].sort_values(["case", "tokens_per_rank", "world_size"])
    sizes = sorted(int(w) for w in timed["world_size"].unique())
    if len(sizes) < 2:
        return None
    palette = plt.get_cmap("tab10").colors
    colors = {case: palette[i % len(palette)] for i, case in enumerate(dict.fromkeys(timed["case"]))}
    token_counts = sorted(timed["tokens_per_rank"].unique(), reverse=True)  # the largest drawn solid
    fig, (scaling, bandwidth) = plt.subplots(1, 2, figsize=(13, 5), layout="constrained")
    for (case, tokens), part in timed.groupby(["case", "tokens_per_rank"], sort=False):
        style = ["-", "--", ":", "-."][token_counts.index(tokens) % 4]
        scaling.plot(part["world_size"], part["efficiency"], marker="o", markersize=4, linestyle=style,
                     color=colors[case], label=f"{case_title(case)}, {token_label(int(tokens))} tokens/rank")
    # A CPU run's ranks are gloo processes on one machine's cores, not GPUs.
    rank, ranks = ("GPU", "GPUs, one process each") if (df["device_type"] == "cuda").all() else ("process",
                                                                                               "gloo processes")
    scaling.axhline(1.0, color="black", linewidth=0.8, linestyle=":", label=f"ideal: as fast as one {rank} alone")
    world_size_axis(scaling, sizes, ranks)
    scaling.set(ylim=(0, max(1.1, timed["efficiency"].max() * 1.05)), title="weak-scaling efficiency",
                ylabel=f"time at W=1 / time at W\n(each {rank}: the preset's experts, its own tokens)")
    scaling.grid(True, alpha=0.3)
    legend_right(scaling)
    largest = timed[(timed["tokens_per_rank"] == token_counts[0]) & (timed["world_size"] >= 2)]
    for case, part in largest.groupby("case", sort=False):
        for column, collective, style, marker in (("a2a_busbw_gbps", "all-to-all", "-", "o"),
                                                  ("allreduce_busbw_gbps", "all-reduce", "-.", "s")):
            bandwidth.plot(part["world_size"], part[column], marker=marker, markersize=4, linestyle=style,
                           color=colors[case], label=f"{case_title(case)}: {collective}")
    world_size_axis(bandwidth, [w for w in sizes if w >= 2], ranks)
    peak = largest[["a2a_busbw_gbps", "allreduce_busbw_gbps"]].max().max()
    bandwidth.set_ylim(0, 1.1 * peak if peak > 0 else 1)  # room above the top marker; no NaN limit when none
    bandwidth.set(ylabel="bus bandwidth, GB/s\n(a plain collective of the dispatch's size)",
                  title=f"the collectives' bus bandwidth at {token_label(int(token_counts[0]))} tokens/rank")
    bandwidth.grid(True, alpha=0.3)
    legend_right(bandwidth)
    fig.suptitle(f"Expert parallelism: weak scaling ({df['device'].iloc[0]})")
    return save(fig, out_dir / "weak_scaling.png")


def plot_imbalance(df: pd.DataFrame, out_dir: Path, preset: str) -> str | None:
    """For a preset run under several traffic shapes: each level's time against the load's max/mean, at the
    largest token count."""
    ok = df[(df["status"] == "ok") & df["load_max_over_mean"].notna()]
    if ok["traffic"].nunique() < 2:
        return None
    tokens = ok["tokens"].max()
    at = ok[ok["tokens"] == tokens]
    colors = level_colors(at)
    fig, ax = plt.subplots(figsize=(9, 5), layout="constrained")
    for label in dict.fromkeys(at["label"]):
        part = at[at["label"] == label].sort_values("load_max_over_mean")
        ax.plot(part["load_max_over_mean"], part["ms"], marker="o", markersize=4, label=label, color=colors[label],
                linestyle=line_style(label))
    shapes = at.drop_duplicates("traffic").sort_values("load_max_over_mean")
    ax.set_xticks(list(shapes["load_max_over_mean"]),
                  [f"{case_title(t)}\n{v:.2f}" for t, v in zip(shapes["traffic"], shapes["load_max_over_mean"])],
                  fontsize=8, rotation=30, ha="right")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set(yscale="log", xlabel="busiest expert's load / mean load (traffic shape)", ylabel="ms per forward (log)")
    log_value_axis(ax.yaxis)
    ax.grid(True, alpha=0.3)
    legend_right(ax)
    fig.suptitle(f"{preset}: time against load imbalance at {token_label(tokens)} tokens ({df['device'].iloc[0]})")
    return save(fig, out_dir / f"imbalance_{slug(preset)}.png")


def plot_across_presets(df: pd.DataFrame, out_dir: Path) -> str | None:
    """Per preset, at 16384 tokens (or its largest measured count): the best level's % of the roofline next to
    the peer's."""
    ok = df[(df["status"] == "ok") & df["pct_roofline"].notna()]
    if not len(ok):
        return None
    colors = level_colors(ok)
    presets, best, best_labels, peer = [], [], [], []
    for preset in dict.fromkeys(df["preset"]):
        part = ok[ok["preset"] == preset]
        if not len(part):
            continue
        tokens = 16384 if (part["tokens"] == 16384).any() else part["tokens"].max()
        at = part[part["tokens"] == tokens]
        levels = at[at["level"].astype(str).str.isdigit()]
        peers = at[at["level"].astype(str) == PEER]
        top = levels.loc[levels["pct_roofline"].idxmax()] if len(levels) else None
        presets.append(f"{preset}\nat {token_label(tokens)} tokens")
        best.append(top["pct_roofline"] if top is not None else float("nan"))
        best_labels.append(top["label"] if top is not None else "")
        peer.append(peers["pct_roofline"].iloc[0] if len(peers) else float("nan"))
    fig, ax = plt.subplots(figsize=(9, 5), layout="constrained")
    x = range(len(presets))
    bars = ax.bar([i - 0.2 for i in x], best, 0.4, color=[colors.get(lbl, PEER_COLOR) for lbl in best_labels])
    ax.bar([i + 0.2 for i in x], peer, 0.4, color=PEER_COLOR, hatch="//", edgecolor="white",
           label="peer: torch_grouped_mm")
    for bar, label in zip(bars, best_labels):
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=7)
    for label in dict.fromkeys(best_labels):
        if label:
            ax.bar([0], [float("nan")], color=colors[label], label=f"best: {label}")  # a legend entry, no bar
    ax.set_xticks(list(x), presets, fontsize=8)
    ax.set(ylabel="% of the measured roofline")
    ax.grid(True, axis="y", alpha=0.3)
    legend_right(ax)
    fig.suptitle(f"Every preset: the best level's % of the roofline against the peer's ({df['device'].iloc[0]})")
    return save(fig, out_dir / "across_presets.png")


def save(fig, path: Path) -> str:
    """The figure as a PNG of 256 colours: a plot's few flat colours and their anti-aliased edges fit a palette,
    and the file is a third of the RGBA one, which counts across the hundreds of plots committed under results/."""
    rgba = io.BytesIO()
    fig.savefig(rgba, dpi=110)  # the figures lay themselves out (layout="constrained"), legends included
    plt.close(fig)
    PIL.Image.open(rgba).convert("RGB").quantize(256).save(path, optimize=True)
    return path.name


def write_report(run_dir: Path, warn: Callable[[str], None] | None = None) -> Path:
    """summary.md and the plots of one run folder, from its rows; with `warn`, a damaged last row is skipped and
    reported through it. Returns the summary's path."""
    run_dir = Path(run_dir)
    rows = load_rows(run_dir, skip_damaged_last=warn)
    env = load_environment(run_dir)
    for plot in run_dir.glob("*.png"):  # an earlier report's: this one draws its own, and none of those may linger
        plot.unlink()
    sections = [f"# {TARGET} run `{run_dir.name}`", cpu_intro(env, rows),
                environment_section(env, rows)]
    if not rows:
        sections.append("No rows were recorded.")
    else:
        df = frame(rows)
        ep_rows, df = split_ep(df)
        for case in dict.fromkeys(df["case"]):
            part = df[df["case"] == case].reset_index(drop=True)
            sections.append(preset_section(part, env))
            sections.append("\n".join(f"![{name}]({name})" for name in plot_preset(part, run_dir, slug(case))))
        if has_fp8(df):
            sections.append(fp8_section(df))
        for preset in dict.fromkeys(df["preset"]):
            figure = plot_imbalance(df[df["preset"] == preset], run_dir, preset)
            if figure:
                sections.append(f"## {preset}: time against imbalance\n\n![{figure}]({figure})")
        if df["preset"].nunique() > 1:
            figure = plot_across_presets(df[df["traffic"] == df["traffic"].iloc[0]], run_dir)
            if figure:
                sections.append(f"## Across presets\n\n![{figure}]({figure})")
        if len(ep_rows):
            sections.append(ep_section(ep_rows.reset_index(drop=True), run_dir, env))
    summary = run_dir / "summary.md"
    summary.write_text("\n\n".join(s for s in sections if s) + "\n")
    from cli import report_html  # it builds on this module, so it is imported here, not at the top
    report_html.write_html(run_dir, rows, env)
    return summary


def readme_summary(run_dir: Path, link_prefix: str) -> str:
    """The short form for a README: the environment, then per preset the time and % of roofline tables and the
    plots; every other table stays in the run's summary.md."""
    rows, env = load_rows(run_dir), load_environment(run_dir)
    df = split_ep(frame(rows))[1]
    sections = [environment_section(env, rows)]
    for case in dict.fromkeys(df["case"]):
        part = df[df["case"] == case].reset_index(drop=True)
        images = [f"{kind}_{slug(case)}.png" for kind in ("time", "speedup", "roofline")]
        sections += [
            f"#### {case} ({shape_label(part.iloc[0])})",
            f"ms per forward (median{time_legend(part)}):",
            markdown_table(pivot(part, status_or(time_cell)), "level \\ tokens"),
            "% of the roofline:",
            markdown_table(metric_table(part, "pct_roofline"), "level \\ tokens"),
            " ".join(f"![{name}]({link_prefix}/{name})" for name in images if (Path(run_dir) / name).exists()),
        ]
    if (Path(run_dir) / "across_presets.png").exists():
        sections.append(f"![across_presets.png]({link_prefix}/across_presets.png)")
    for case, part in fp8_cases(df):
        if not len(timed_levels(part)):
            continue
        table = metric_table(timed_levels(part), "tflops")
        worst = part.groupby("label")["quant_err"].max()
        table["quant err"] = [f"{worst[label]:.3f}" if pd.notna(worst.get(label)) else "-" for label in table.index]
        sections += [f"#### {case}, FP8 (e4m3): TFLOP/s, and the largest quant err of each FP8 level",
                     markdown_table(table, "level \\ tokens")]
    return "\n\n".join(sections)


class OverlappingRuns(ValueError):
    """EP run folders published together that hold the same case at the same world size and tokens per rank: the
    README's one table would hold it twice."""


def machine_text(env: dict) -> str:
    """The GPUs and what joins them, read off environment.json's `nvidia-smi topo -m` matrix (NV# = a bonded set
    of # NVLinks; PIX, PXB, PHB, NODE, SYS: PCIe paths): "4× NVIDIA H200, NVLink NV18 between every pair"."""
    device = env.get("device", "?")
    lines = [line.split() for line in (env.get("topology") or "").splitlines()]
    gpu_rows = [cells for cells in lines if re.fullmatch(r"GPU\d+", cells[0] if cells else "") and "X" in cells]
    if not gpu_rows:
        return f"{device} (no GPU topology recorded)"
    # A GPU's row (X: itself) starts with the GPUs' columns in the rows' order: row a's cell 1 + b joins a and b.
    links = [gpu_rows[a][1 + b] for a in range(len(gpu_rows)) for b in range(a + 1, len(gpu_rows))]
    kinds = pd.Series(links).map(lambda link: f"NVLink {link}" if link.startswith("NV") else f"PCIe ({link})")
    counts = kinds.value_counts()
    gpus = f"{len(gpu_rows)}× {device}"
    if len(counts) == 0:
        return gpus
    if len(counts) == 1:
        return f"{gpus}, {counts.index[0]} between {'the two' if len(gpu_rows) == 2 else 'every pair'}"
    return f"{gpus}: " + ", ".join(f"{kind} between {count} pair{'s' if count > 1 else ''}"
                                   for kind, count in counts.items())


def weak_scaling_table(df: pd.DataFrame) -> pd.DataFrame:
    """The EP rows, one line per (case, tokens per rank): ms at each world size W and the weak-scaling efficiency
    at each W above 1; then, at the largest W, the exposed communication (in the chosen chunks), the busiest rank's
    load over the mean and both collectives' bus bandwidths."""
    keys = ["case", "tokens_per_rank"]
    df = with_efficiency(df).drop_duplicates([*keys, "world_size"], keep="last")
    sizes = sorted(int(w) for w in df["world_size"].unique())
    cells = df.assign(ms_cell=[status_or(lambda r: fmt(r["ms"]))(row) for _, row in df.iterrows()],
                      efficiency_cell=df["efficiency"].map(efficiency_text))
    by_size = cells.pivot(index=keys, columns="world_size", values=["ms_cell", "efficiency_cell"])
    table = pd.DataFrame({**{f"W={w} ms": by_size["ms_cell"][w] for w in sizes},
                          **{f"eff. W={w}": by_size["efficiency_cell"][w] for w in sizes[1:]}})
    largest = cells[cells["world_size"] == sizes[-1]].set_index(keys)
    for column, name, unit in (("exposed_comm_ms", "exposed comm", ", ms"),
                               ("rank_load_max_over_mean", "busiest rank / mean", ""),
                               ("a2a_busbw_gbps", "all-to-all busbw", ", GB/s"),
                               ("allreduce_busbw_gbps", "all-reduce busbw", ", GB/s")):
        table[f"{name} at W={sizes[-1]}{unit}"] = largest[column].where(largest["status"] == "ok").map(fmt)
    table = table.fillna("-").reset_index(level="tokens_per_rank")
    return table.rename(columns={"tokens_per_rank": "tokens / rank"}).astype({"tokens / rank": int}).astype(str)


def ep_rows_of(run_dirs: list[Path]) -> pd.DataFrame:
    """The EP rows of several run folders as one frame. Raises OverlappingRuns where two folders hold the same
    (case, tokens per rank, world size): the README's one table would show it twice."""
    df = split_ep(frame([row for run_dir in run_dirs for row in load_rows(run_dir)]))[0]
    twice = df[df.duplicated(["case", "tokens_per_rank", "world_size"])]
    if len(twice):
        first = twice.iloc[0]
        raise OverlappingRuns(f"more than one of the folders holds {first['case']} at W={int(first['world_size'])}, "
                              f"{int(first['tokens_per_rank'])} tokens per rank; publish one of them")
    return df


def ep_readme_summary(run_dirs: list[Path], link_prefixes: list[str]) -> str:
    """The README's expert-parallel block from EP run folders (one per preset, say, checked by ep_rows_of): the
    machine, one weak-scaling table from all their rows, and each folder's weak_scaling.png."""
    machines = {run_dir.name: machine_text(load_environment(run_dir)) for run_dir in run_dirs}
    machine = (next(iter(machines.values())) if len(set(machines.values())) == 1
               else "; ".join(f"{name}: {text}" for name, text in machines.items()))
    rows_of = {run_dir: load_rows(run_dir) for run_dir in run_dirs}
    df = ep_rows_of(run_dirs)
    images = [f"![weak scaling, {', '.join(dict.fromkeys(row['preset'] for row in rows_of[run_dir]))}]"
              f"({prefix}/weak_scaling.png)"
              for run_dir, prefix in zip(run_dirs, link_prefixes) if (Path(run_dir) / "weak_scaling.png").exists()]
    return "\n\n".join(filter(None, [
        f"On {machine}. At world size W each GPU holds the preset's experts and its own tokens; ms is the slowest "
        "rank's median forward; *eff.* is the weak-scaling efficiency, the time at W=1 over the time at W; *exposed "
        f"comm* is the time outside expert compute on {phases_rank_text(df, why=False)}; the bus bandwidths are "
        "NCCL-tests' measure of a plain all-to-all and all-reduce of the dispatch's size on the same processes:",
        markdown_table(weak_scaling_table(df), "case"),
        " ".join(images),
    ]))


# Every field that makes a case, as rows name it and as a comparison's header shows it. Rows from before a field
# existed get its value then (no traffic shape: uniform; no shared experts: 0; one process: no world size).
CASE_FIELDS = {"preset": "preset", "hidden": "H", "intermediate": "I", "experts": "E", "top_k": "K",
               "shared_experts": "S", "traffic": "traffic", "router": "router", "capacity_factor": "capacity",
               "dtype": "dtype", "world_size": "W", "level": "level", "tokens": "T"}


def key_text(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def compare_runs(rows_a: list[dict], rows_b: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Run B against run A, case by case: (one line per (case, level, T) present in either run, the case named
    by the fields that vary between cases, with both times, a host-bound row's marked HOST_BOUND_MARK, and A/B; per
    level, the geometric mean of A/B over the cases both timed and neither host-bound; the fields every case
    shares)."""
    a, b = frame(rows_a), frame(rows_b)
    keys = [field for field in CASE_FIELDS if field in a or field in b]
    for df in (a, b):
        df["shared_experts"] = df["shared_experts"].fillna(0) if "shared_experts" in df else 0
        for field in keys:
            df[field] = df[field].map(key_text) if field in df else ""
    for df in (a, b):  # CPU rows: not judged (None), not host-bound here
        df["host_bound"] = df["host_bound"].fillna(False).astype(bool)
    columns = [*keys, "label", "status", "ms", "host_bound"]
    both = a[columns].merge(b[columns], on=keys, how="outer", suffixes=(" A", " B"))
    for run in ("A", "B"):  # a case only one run has: not host-bound in the other
        both[f"host_bound {run}"] = both[f"host_bound {run}"].fillna(False).astype(bool)
    both["label"] = both["label A"].fillna(both["label B"])
    both["order"] = [natural_key(level) for level in both["level"]]
    both["token_count"] = both["tokens"].astype(int)
    case_keys = [field for field in keys if field not in ("level", "tokens")]
    both = both.sort_values([*case_keys, "order", "token_count"], key=lambda column: column.map(natural_key)
                            if column.name in case_keys else column).reset_index(drop=True)  # fields are text now
    timed = (both["status A"] == "ok") & (both["status B"] == "ok")
    both["ratio"] = (both["ms A"] / both["ms B"]).where(timed)

    def ms_cell(status, ms, host_bound):
        if pd.isna(status):
            return "-"
        if status != "ok":
            return STATUS_CELL.get(status, status)
        return time_cell({"ms": ms, "host_bound": bool(host_bound)})

    # A field is shown where it tells cases apart; a preset's shape only where one preset name has several.
    within = ("hidden", "intermediate", "experts", "top_k", "shared_experts", "dtype")
    shown = [field for field in case_keys
             if (both.groupby("preset")[field].nunique().max() if field in within else both[field].nunique()) > 1]
    table = pd.DataFrame({"case": [", ".join(f"{CASE_FIELDS[field]}={row[field]}" for field in shown if row[field])
                                   for _, row in both.iterrows()],
                          "level": both["label"],
                          "T": both["tokens"],
                          **{f"{run} ms": [ms_cell(*cell) for cell in zip(both[f"status {run}"], both[f"ms {run}"],
                                                                            both[f"host_bound {run}"])]
                             for run in ("A", "B")},
                          "A/B": both["ratio"].map(lambda r: "-" if pd.isna(r) else f"{r:.2f}x")})
    # The mean is the GPU's speedup: a host-bound time (in either run) measures the host CPU, so it stays out.
    host_bound = both["host_bound A"] | both["host_bound B"]
    device_bound = both[timed & ~host_bound].groupby("label", sort=False)["ratio"]
    geomean = pd.DataFrame({"timed": both[timed].groupby("label", sort=False).size(),  # in both runs
                            "host-bound": both[timed & host_bound].groupby("label", sort=False).size(),
                            "geometric mean of A/B": device_bound.apply(lambda r: f"{np.exp(np.log(r).mean()):.2f}x")})
    geomean = geomean.fillna({"host-bound": 0, "geometric mean of A/B": "-"}).astype({"host-bound": int})
    geomean = geomean.loc[sorted(geomean.index, key=lambda label: both.loc[both["label"] == label, "order"].iloc[0])]
    shared = {CASE_FIELDS[field]: both[field].iloc[0] for field in case_keys
              if both[field].nunique() == 1 and both[field].iloc[0]}
    return table, geomean, shared


def relink(markdown: str, prefix: str) -> str:
    """Point a summary's relative image links at its run folder, for copies that live elsewhere."""
    return re.sub(r"\]\((?!https?:|/)([^)]+)\)", lambda m: f"]({prefix}/{m.group(1)})", markdown)
