"""Tables and plots, generated from a run folder's rows.jsonl and nothing else.

Raw rows first: `aisp bench run` appends one JSON row per measurement; everything here (summary.md, the PNG plots,
LATEST.md, the README's results block) is rebuilt from those rows, so `aisp bench report RUN_DIR` can redo it at
any time without running anything.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import pandas as pd  # noqa: E402

STATUS_CELL = {"oom": "OOM", "skipped": "skipped", "error": "error"}


def load_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "rows.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_environment(run_dir: Path) -> dict:
    path = Path(run_dir) / "environment.json"
    return json.loads(path.read_text()) if path.exists() else {}


def level_sort_key(level) -> tuple:
    return (0, int(level), "") if str(level).isdigit() else (1, 0, str(level))


def level_label(row: dict) -> str:
    return f"{row['level']} {row['level_name']}" if str(row["level"]).isdigit() else f"peer: {row['level_name']}"


def frame(rows: list[dict]) -> pd.DataFrame:
    """The rows as a table, with a `case` per (preset, traffic) that the report gives a section each; the traffic
    is named only when some run was not uniform. Rows from before traffic shapes existed count as uniform."""
    df = pd.DataFrame(rows)
    df["label"] = [level_label(r) for r in rows]
    df["order"] = [level_sort_key(r["level"]) for r in rows]
    for column in ("tokens_per_expert", "load_cv", "load_gini", "load_max_over_mean", "dead_experts",
                   "dropped_tokens", "stage_ms", "world_size", "tokens_per_rank", "dispatch_ms", "compute_ms",
                   "combine_ms", "a2a_bytes", "dispatch_gbps", "a2a_busbw_gbps", "allreduce_busbw_gbps",
                   "rank_load_max_over_mean", "local_level", "chunks", "exposed_comm_ms_c1", "exposed_comm_ms"):
        if column not in df:
            df[column] = None
    df["traffic"] = df["traffic"].fillna("uniform") if "traffic" in df else "uniform"
    df["router"] = df["router"].fillna("softmax-topk") if "router" in df else "softmax-topk"
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


def shared_of(row) -> str:
    """ S=n for rows of a layer with shared experts; nothing for those without (or from before they existed)."""
    shared = row.get("shared_experts")
    return f" S={int(shared)}" if shared and not pd.isna(shared) else ""


def slug(case: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", case).strip("_")


def markdown_table(df: pd.DataFrame, corner: str) -> str:
    header = [corner, *(str(c) for c in df.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(df.columns)) + "|"]
    for index, values in df.iterrows():
        lines.append("| " + " | ".join([str(index), *(str(v) for v in values)]) + " |")
    return "\n".join(lines)


def fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"


def pivot(df: pd.DataFrame, render) -> pd.DataFrame:
    """Levels down, token counts across; each cell rendered from its row."""
    labels = list(dict.fromkeys(df["label"]))
    tokens = sorted(df["tokens"].unique())
    table = pd.DataFrame(index=labels, columns=tokens, dtype=object)
    for _, row in df.iterrows():
        table.loc[row["label"], row["tokens"]] = render(row)
    return table.fillna("-")


def ms_of(df: pd.DataFrame, label: str, tokens: int) -> float | None:
    match = df[(df["label"] == label) & (df["tokens"] == tokens) & (df["status"] == "ok")]
    return float(match["ms"].iloc[0]) if len(match) else None


def previous_level_label(df: pd.DataFrame, row) -> str | None:
    if not str(row["level"]).isdigit():
        return None
    earlier = [lbl for lbl, lvl in zip(df["label"], df["level"])
               if str(lvl).isdigit() and int(lvl) == int(row["level"]) - 1]
    return earlier[0] if earlier else None


DECODE_MAX_TOKENS = 512  # at or below this many tokens the layer is bound by reading the experts' weights


def status_or(render):
    """A table cell renderer: `render(row)` for a timed row, `OOM`/`skipped`/`error` for the others."""
    return lambda row: render(row) if row["status"] == "ok" else STATUS_CELL.get(row["status"], row["status"])


def shape_of(row) -> str:
    return (f"H={row['hidden']} I={row['intermediate']} E={row['experts']} K={row['top_k']}{shared_of(row)} "
            f"{row['dtype']}")


OUTSIDE_STAGES = "outside stages"  # as moe_benchmark names the forward time no stage marker covers


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


def stage_table(df: pd.DataFrame, tokens: int) -> str:
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
    return markdown_table(table, "level \\ stage")


def preset_section(df: pd.DataFrame, env: dict) -> str:
    first = df.iloc[0]
    shape = shape_of(first)
    baseline = next((lbl for lbl in df["label"] if lbl.startswith("0 ")), None)

    def speedup_vs(reference_label_of):
        def render(row):
            reference = reference_label_of(row)
            reference_ms = ms_of(df, reference, row["tokens"]) if reference else None
            return f"{reference_ms / row['ms']:.2f}x" if reference_ms else "-"
        return status_or(render)

    parts = [
        f"## {first['case']} ({shape})",
        "Time per forward, ms (median; `OOM` = ran out of GPU memory):",
        markdown_table(pivot(df, status_or(lambda r: fmt(r["ms"]))), "level \\ tokens"),
    ]
    if baseline:
        parts += ["Speedup over level 0:",
                  markdown_table(pivot(df, speedup_vs(lambda r: baseline)), "level \\ tokens")]
    parts += [
        "Speedup over the previous level:",
        markdown_table(pivot(df, speedup_vs(lambda r: previous_level_label(df, r))), "level \\ tokens"),
        "TFLOP/s (useful FLOPs: 2·T·K·3·H·I):",
        markdown_table(pivot(df, status_or(lambda r: fmt(r["tflops"]))), "level \\ tokens"),
        "% of the roofline (the larger of FLOPs / measured matmul rate and minimum bytes / measured copy "
        "bandwidth, over the measured time):",
        markdown_table(pivot(df, status_or(lambda r: fmt(r["pct_roofline"]))), "level \\ tokens"),
        "Peak GPU memory during one forward, MiB (weights and inputs included):",
        markdown_table(pivot(df, status_or(lambda r: fmt(r["peak_mb"]))), "level \\ tokens"),
    ]
    copy_gbps = (env.get("ceilings") or {}).get("copy_gbps")
    decode = df[df["tokens"] <= DECODE_MAX_TOKENS]
    if len(decode) and copy_gbps:
        parts += [
            f"Decode regime (T ≤ {DECODE_MAX_TOKENS}): GB/s of minimum bytes (the touched experts' weights, tokens "
            f"in and out) and, in brackets, % of the measured copy bandwidth ({copy_gbps:.0f} GB/s):",
            markdown_table(pivot(decode, status_or(lambda r: f"{r['gbps']:.0f} ({100 * r['gbps'] / copy_gbps:.1f}%)")),
                           "level \\ tokens"),
        ]
    if "load_cv" in df and df["load_cv"].notna().any():
        timed = df[df["load_cv"].notna()].drop_duplicates("tokens").set_index("tokens").sort_index()
        metrics = pd.DataFrame({
            "CV": timed["load_cv"].map(lambda v: f"{v:.3f}"),
            "Gini": timed["load_gini"].map(lambda v: f"{v:.3f}"),
            "max / mean": timed["load_max_over_mean"].map(lambda v: f"{v:.2f}"),
            "dead experts": timed["dead_experts"].map(lambda v: str(int(v))),
            "dropped tokens": timed["dropped_tokens"].map(lambda v: "-" if pd.isna(v) else str(int(v))),
        })
        parts += ["Load over the experts in the timed forward (the same routing for every level at a given T):",
                  markdown_table(metrics, "tokens")]
    for tokens in profile_token_counts(df):
        calls = int(profiled(df)["profile_calls"].max())
        parts += [f"Where the time goes at {tokens} tokens (`--profile`): ms per call in each stage, the mean of "
                  f"up to {calls} calls timed on the device's clock, and its share of routing plus forward. "
                  "*routing* is the router (the same for every level, run before the forward); "
                  f"*{OUTSIDE_STAGES}* is forward time no stage covers (Python between stages, allocation; for the "
                  "CUDA-graph levels the whole replay, which has no stage boundaries). *forward* is the profiled "
                  "forward without routing; the markers cost time of their own, so it can exceed *timed*, the "
                  "median of the unprofiled timing:",
                  stage_table(df, tokens)]
    notes = [f"- level {r['level']} ({r['level_name']}), {r['tokens']} tokens: {r['status']}: {r['note']}"
             for _, r in df.iterrows() if r["note"]]
    if notes:
        parts += ["Notes from the rows:", "\n".join(notes)]
    return "\n\n".join(parts)


def environment_section(env: dict) -> str:
    if not env:
        return ""
    ceilings = env.get("ceilings") or {}
    lines = [
        f"- device: **{env.get('device', '?')}**, driver {env.get('driver') or '-'}, CUDA {env.get('cuda') or '-'}",
        f"- torch {env.get('torch')}, triton {env.get('triton') or '-'}, python {env.get('python')}",
        f"- started {env.get('started_utc')} (UTC), host {env.get('host')}",
        f"- command: `{env.get('command')}`",
    ]
    if ceilings:
        lines.append(f"- measured ceilings: bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s, "
                     f"device copy {ceilings['copy_gbps']:.0f} GB/s (read + write)")
    else:
        lines.append("- no ceilings measured (CPU run): `pct_roofline` is empty")
    return "\n".join(lines)


def plot_preset(df: pd.DataFrame, out_dir: Path, preset: str) -> list[str]:
    """The PNGs of one case (a preset, or a preset under one traffic shape); returns their file names."""
    ok = df[df["status"] == "ok"]
    labels = list(dict.fromkeys(df["label"]))
    tokens = sorted(df["tokens"].unique())
    device = df["device"].iloc[0]
    names = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for label in labels:
        part = ok[ok["label"] == label]
        if len(part):
            ax.plot(part["tokens"], part["ms"], marker="o", label=label,
                    linestyle="--" if label.startswith("peer") else "-")
    ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="ms per forward (median)",
           title=f"{preset}: time per level ({device})")
    ax.set_xticks(tokens, [str(t) for t in tokens])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # only the measured token counts
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    names.append(save(fig, out_dir / f"time_{preset}.png"))

    baseline = next((lbl for lbl in labels if lbl.startswith("0 ")), None)
    width = 0.8 / max(len(labels), 1)
    if baseline:
        fig, ax = plt.subplots(figsize=(9, 5))
        for i, label in enumerate(labels):
            speedups = []
            for t in tokens:
                base_ms, ms = ms_of(df, baseline, t), ms_of(df, label, t)
                speedups.append(base_ms / ms if base_ms and ms else float("nan"))
            ax.bar([x + i * width for x in range(len(tokens))], speedups, width, label=label,
                   hatch="//" if label.startswith("peer") else None)
        ax.set_xticks([x + width * (len(labels) - 1) / 2 for x in range(len(tokens))], [str(t) for t in tokens])
        ax.set(yscale="log", xlabel="tokens", ylabel="speedup over level 0 (missing bar: OOM/skipped)",
               title=f"{preset}: speedup over level 0 ({device})")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.legend(fontsize=8)
        names.append(save(fig, out_dir / f"speedup_{preset}.png"))

    if ok["pct_roofline"].notna().any():
        fig, ax = plt.subplots(figsize=(9, 5))
        for j, t in enumerate(tokens):
            values = [ok[(ok["label"] == lbl) & (ok["tokens"] == t)]["pct_roofline"].sum() for lbl in labels]
            ax.bar([x + j * 0.8 / len(tokens) for x in range(len(labels))], values, 0.8 / len(tokens),
                   label=f"{t} tokens")
        ax.set_xticks([x + 0.4 - 0.4 / len(tokens) for x in range(len(labels))], labels, rotation=30,
                      ha="right", fontsize=8)
        ax.set(ylabel="% of roofline", title=f"{preset}: % of the measured roofline ({device})")
        ax.legend(fontsize=8)
        names.append(save(fig, out_dir / f"roofline_{preset}.png"))

    if len(profiled(df)):
        names.append(plot_stages(df, out_dir, preset))

    if "tokens_per_expert" in df and df["tokens_per_expert"].notna().any():
        largest = df[df["tokens_per_expert"].notna()].sort_values("tokens").iloc[-1]
        counts = largest["tokens_per_expert"]
        fig, ax = plt.subplots(figsize=(9, 4))
        ax.bar(range(len(counts)), counts, width=1.0 if len(counts) > 32 else 0.8)
        ax.axhline(sum(counts) / len(counts), color="black", linewidth=0.8, label="mean")
        ax.set(xlabel="expert", ylabel="(token, slot) pairs",
               title=f"{df['case'].iloc[0]}: load per expert at {largest['tokens']} tokens")
        ax.legend(fontsize=8)
        names.append(save(fig, out_dir / f"load_{preset}.png"))
    return names


def plot_stages(df: pd.DataFrame, out_dir: Path, preset: str) -> str:
    """One stacked bar per level: the share of its profiled forward each stage took, total ms at the bar's end;
    a panel each for the smallest and the largest profiled token count."""
    counts = profile_token_counts(df)
    fig, axes = plt.subplots(1, len(counts), figsize=(7 * len(counts), 5), squeeze=False)
    names = stage_names(profiled(df))
    colors = dict(zip(names, plt.get_cmap("tab10").colors))
    for ax, tokens in zip(axes[0], counts):
        at = profiled(df)
        at = at[at["tokens"] == tokens]
        labels = list(at["label"])
        left = [0.0] * len(at)
        for name in names:
            shares = [100 * row["stage_ms"].get(name, 0.0) / sum(row["stage_ms"].values())
                      for _, row in at.iterrows()]
            ax.barh(labels, shares, left=left, color=colors[name], label=name,
                    hatch="//" if name == OUTSIDE_STAGES else None)
            left = [a + b for a, b in zip(left, shares)]
        for y, (_, row) in enumerate(at.iterrows()):
            ax.annotate(f"{fmt(sum(row['stage_ms'].values()))} ms", (100, y), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=7)
        ax.invert_yaxis()
        ax.set(xlim=(0, 118), xlabel="% of routing + forward (profiled)", title=f"{tokens} tokens")
        ax.tick_params(axis="y", labelsize=8)
    handles, legend_labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, legend_labels, loc="lower center", ncol=len(names), fontsize=8)
    fig.suptitle(f"{df['case'].iloc[0]}: where the time goes ({df['device'].iloc[0]})")
    return save(fig, out_dir / f"stages_{preset}.png", rect=(0, 0.07, 1, 1))  # the legend below


def ep_section(df: pd.DataFrame, out_dir: Path) -> str:
    """The expert-parallel rows: one per (case, tokens per rank, world size), the unpipelined time split into its
    phases, the chosen chunk count and the communication left exposed before and after pipelining, the bytes the
    all-to-alls moved, the bandwidths, and the weak-scaling efficiency against world size 1."""
    table_rows = []
    for _, row in df.sort_values(["case", "tokens_per_rank", "world_size"]).iterrows():
        base = df[(df["case"] == row["case"]) & (df["tokens_per_rank"] == row["tokens_per_rank"])
                  & (df["world_size"] == 1) & (df["status"] == "ok")]
        ok = row["status"] == "ok"
        efficiency = f"{100 * base['ms'].iloc[0] / row['ms']:.0f}%" if ok and len(base) else "-"
        cells = [fmt(row[c]) if ok else "-" for c in ("ms", "dispatch_ms", "compute_ms", "combine_ms")]
        if not ok:
            cells[0] = STATUS_CELL.get(row["status"], row["status"])
        chunks = str(int(row["chunks"])) if ok and not pd.isna(row["chunks"]) else "-"
        exposed = [fmt(row[c]) if ok else "-" for c in ("exposed_comm_ms_c1", "exposed_comm_ms")]
        mb = fmt(row["a2a_bytes"] / 2**20) if ok else "-"
        table_rows.append([row["case"], str(int(row["tokens_per_rank"])), str(int(row["world_size"])),
                           str(row["experts"]), *cells, chunks, *exposed, mb,
                           *(fmt(row[c]) if ok else "-" for c in ("dispatch_gbps", "a2a_busbw_gbps",
                                                                   "allreduce_busbw_gbps", "rank_load_max_over_mean")),
                           efficiency])
    header = ["case", "tokens / rank", "W", "experts", "ms", "dispatch", "expert compute", "combine", "chunks",
              "exposed comm, 1 chunk", "exposed comm, chunked", "MiB across ranks", "dispatch GB/s",
              "all-to-all busbw GB/s", "all-reduce busbw GB/s", "busiest rank / mean", "weak-scaling eff."]
    table = pd.DataFrame(table_rows, columns=header).set_index("case")
    local = ", ".join(sorted(set(df["local_level"].dropna())))
    parts = [
        "## Expert parallelism (level ep)",
        f"Weak scaling: at world size W each rank holds the preset's E experts (W·E in all) and its own T tokens; "
        f"the local experts run on {local or 'the best single-GPU level'}. ms is the slowest rank's median "
        "forward in the chunk count (*chunks*) that brief timings of the candidates found fastest; the phases "
        "(ms) are those of the unpipelined forward (one chunk), one after another. *Exposed comm* is a forward's "
        "time minus its expert compute (shared experts included): the communication, and the waits for other "
        "ranks, that no compute hid, unpipelined and in the chosen chunks. *MiB across ranks* is what the dispatch "
        "and the combine sent to other ranks per forward, all ranks together; *dispatch GB/s* is the busiest "
        "rank's dispatched bytes over its unpipelined dispatch time (sort and counts exchange included); the bus "
        "bandwidths are NCCL-tests' measure of a "
        "plain all-to-all and all-reduce of the dispatch's size on the same processes; weak-scaling efficiency "
        "is the world-size-1 time over this row's.",
        markdown_table(table, "case"),
    ]
    notes = [f"- W={int(r['world_size'])}, {r['case']}, {int(r['tokens_per_rank'])} tokens per rank: {r['status']}: "
             f"{r['note']}" for _, r in df.iterrows() if r["note"]]
    if notes:
        parts += ["Notes from the rows:", "\n".join(notes)]
    ok = df[df["status"] == "ok"]
    if len(ok):
        fig, ax = plt.subplots(figsize=(9, 5))
        ok = ok.sort_values(["case", "tokens_per_rank", "world_size"])
        labels = [f"{c}\nT/rank={int(t)} W={int(w)}" for c, t, w in
                  zip(ok["case"], ok["tokens_per_rank"], ok["world_size"])]
        left = [0.0] * len(ok)
        for column, name in (("dispatch_ms", "dispatch"), ("compute_ms", "expert compute"),
                             ("combine_ms", "combine")):
            ax.barh(labels, ok[column], left=left, label=name)
            left = [a + b for a, b in zip(left, ok[column])]
        ax.invert_yaxis()
        ax.set(xlabel="ms per unpipelined forward (slowest rank)", title=f"Expert parallelism ({df['device'].iloc[0]})")
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(fontsize=8)
        name = save(fig, out_dir / "expert_parallel.png")
        parts.append(f"![{name}]({name})")
    return "\n\n".join(parts)


def plot_imbalance(df: pd.DataFrame, out_dir: Path, preset: str) -> str | None:
    """For a preset run under several traffic shapes: each level's time against the load's max/mean, at the
    largest token count."""
    ok = df[(df["status"] == "ok") & df["load_max_over_mean"].notna()]
    if ok["traffic"].nunique() < 2:
        return None
    tokens = ok["tokens"].max()
    at = ok[ok["tokens"] == tokens]
    fig, ax = plt.subplots(figsize=(8, 5))
    for label in dict.fromkeys(at["label"]):
        part = at[at["label"] == label].sort_values("load_max_over_mean")
        ax.plot(part["load_max_over_mean"], part["ms"], marker="o", label=label,
                linestyle="--" if label.startswith("peer") else "-")
    shapes = at.drop_duplicates("traffic")
    ax.set_xticks(list(shapes["load_max_over_mean"]),
                  [f"{t}\n{v:.2f}" for t, v in zip(shapes["traffic"], shapes["load_max_over_mean"])], fontsize=8)
    ax.set(yscale="log", xlabel="busiest expert's load / mean load", ylabel="ms per forward",
           title=f"{preset}: time against imbalance at {tokens} tokens ({df['device'].iloc[0]})")
    ax.legend(fontsize=8)
    return save(fig, out_dir / f"imbalance_{slug(preset)}.png")


def plot_across_presets(df: pd.DataFrame, out_dir: Path) -> str | None:
    """Per preset, at 16384 tokens (or its largest measured count): the best level's % of the roofline next to
    the peer's."""
    ok = df[(df["status"] == "ok") & df["pct_roofline"].notna()]
    if not len(ok):
        return None
    presets, best, best_labels, peer = [], [], [], []
    for preset in dict.fromkeys(df["preset"]):
        part = ok[ok["preset"] == preset]
        if not len(part):
            continue
        tokens = 16384 if (part["tokens"] == 16384).any() else part["tokens"].max()
        at = part[part["tokens"] == tokens]
        levels = at[at["level"].astype(str).str.isdigit()]
        peers = at[~at["level"].astype(str).str.isdigit()]
        top = levels.loc[levels["pct_roofline"].idxmax()] if len(levels) else None
        presets.append(f"{preset}\nT={tokens}")
        best.append(top["pct_roofline"] if top is not None else float("nan"))
        best_labels.append(top["label"] if top is not None else "")
        peer.append(peers["pct_roofline"].iloc[0] if len(peers) else float("nan"))
    fig, ax = plt.subplots(figsize=(9, 5))
    x = range(len(presets))
    bars = ax.bar([i - 0.2 for i in x], best, 0.4, label="best level")
    ax.bar([i + 0.2 for i in x], peer, 0.4, label="peer: torch_grouped_mm", hatch="//")
    for bar, label in zip(bars, best_labels):
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=7)
    ax.set_xticks(list(x), presets, fontsize=8)
    ax.set(ylabel="% of roofline", title=f"Best level vs the peer, per preset ({df['device'].iloc[0]})")
    ax.legend(fontsize=8)
    return save(fig, out_dir / "across_presets.png")


def save(fig, path: Path, rect: tuple = (0, 0, 1, 1)) -> str:
    fig.tight_layout(rect=rect)  # rect: the part of the figure the axes may fill
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def write_report(run_dir: Path) -> Path:
    """summary.md and the plots of one run folder, from its rows. Returns the summary's path."""
    run_dir = Path(run_dir)
    rows = load_rows(run_dir)
    env = load_environment(run_dir)
    sections = [f"# moe_journey run `{run_dir.name}`", environment_section(env)]
    if not rows:
        sections.append("No rows were recorded.")
    else:
        df = frame(rows)
        ep_rows, df = split_ep(df)
        for case in dict.fromkeys(df["case"]):
            part = df[df["case"] == case].reset_index(drop=True)
            sections.append(preset_section(part, env))
            sections.append("\n".join(f"![{name}]({name})" for name in plot_preset(part, run_dir, slug(case))))
        for preset in dict.fromkeys(df["preset"]):
            figure = plot_imbalance(df[df["preset"] == preset], run_dir, preset)
            if figure:
                sections.append(f"## {preset}: time against imbalance\n\n![{figure}]({figure})")
        if df["preset"].nunique() > 1:
            figure = plot_across_presets(df[df["traffic"] == df["traffic"].iloc[0]], run_dir)
            if figure:
                sections.append(f"## Across presets\n\n![{figure}]({figure})")
        if len(ep_rows):
            sections.append(ep_section(ep_rows.reset_index(drop=True), run_dir))
    summary = run_dir / "summary.md"
    summary.write_text("\n\n".join(s for s in sections if s) + "\n")
    return summary


def readme_summary(run_dir: Path, link_prefix: str) -> str:
    """The short form for a README: the environment, then per preset the time and % of roofline tables and the
    plots; every other table stays in the run's summary.md."""
    rows, env = load_rows(run_dir), load_environment(run_dir)
    df = split_ep(frame(rows))[1]
    sections = [environment_section(env)]
    for case in dict.fromkeys(df["case"]):
        part = df[df["case"] == case].reset_index(drop=True)
        images = [f"{kind}_{slug(case)}.png" for kind in ("time", "speedup", "roofline")]
        sections += [
            f"#### {case} ({shape_of(part.iloc[0])}): ms per forward, then % of the roofline",
            markdown_table(pivot(part, status_or(lambda r: fmt(r["ms"]))), "level \\ tokens"),
            markdown_table(pivot(part, status_or(lambda r: fmt(r["pct_roofline"]))), "level \\ tokens"),
            " ".join(f"![{name}]({link_prefix}/{name})" for name in images if (Path(run_dir) / name).exists()),
        ]
    if (Path(run_dir) / "across_presets.png").exists():
        sections.append(f"![across_presets.png]({link_prefix}/across_presets.png)")
    return "\n\n".join(sections)


def relink(markdown: str, prefix: str) -> str:
    """Point a summary's relative image links at its run folder, for copies that live elsewhere."""
    return re.sub(r"\]\((?!https?:|/)([^)]+)\)", lambda m: f"]({prefix}/{m.group(1)})", markdown)
