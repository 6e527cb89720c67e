"""report.html from synthetic rows: its sections follow the rows, it carries every table and environment line of
summary.md, its contents reach every section, and it renders in headless Chromium."""

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from cli import report, report_html

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RESULTS = Path(__file__).resolve().parent.parent / "results" / "moe_journey"
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def row(level, name, tokens, device_type="cuda", status="ok", **fields):
    ok = status == "ok"
    ms = (10.0 if level == 0 else 1.0 if level == "peer" else 2.0) * (1 + tokens / 64)
    return {"target": "moe_journey", "level": level, "level_name": name, "preset": "tiny", "hidden": 64,
            "intermediate": 128, "experts": 4, "top_k": 2, "shared_experts": 0, "tokens": tokens,
            "traffic": "uniform", "router": "softmax-topk", "device": "Test GPU" if device_type == "cuda" else "cpu",
            "device_type": device_type, "dtype": "bf16", "ms": ms if ok else None, "tflops": 1.0 if ok else None,
            "gbps": 50.0 if ok else None, "pct_roofline": (5.0 if device_type == "cuda" else None) if ok else None,
            "peak_mb": 12.0 if ok and device_type == "cuda" else None, "peak_garbage_free": ok,
            "extra_mb": 3.0 if ok else None, "status": status,
            "note": "" if ok else f"{status} at {tokens} tokens", "tokens_per_expert": [tokens // 2] * 4,
            "load_cv": 0.0, "load_gini": 0.0, "load_max_over_mean": 1.0, "dead_experts": 0, "dropped_tokens": 0,
            "stage_ms": None, "profile_calls": None, **fields}


def journey_rows(device_type="cuda", **fields):
    """Levels 0 and 4 and the peer at 8 and 64 tokens; level 0 ran out of memory at 64."""
    return [row(0, "naive", 8, device_type, **fields), row(0, "naive", 64, device_type, status="oom"),
            *(row(lvl, name, t, device_type, **fields) for lvl, name in ((4, "grouped"), ("peer", "torch_grouped_mm"))
              for t in (8, 64))]


def write_run(path, rows, device_type="cuda", **env):
    """summary.md and report.html of these rows; `env` adds to, or replaces, environment.json's fields."""
    (path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ceilings = {"matmul_tflops": 700.0, "copy_gbps": 3000.0} if device_type == "cuda" else None
    (path / "environment.json").write_text(json.dumps({"target": "moe_journey", "device": "Test GPU",
                                                       "device_type": device_type, "ceilings": ceilings,
                                                       "command": "aisp bench run", **env}))
    report.write_report(path)
    return (path / "report.html").read_text()


COUNTS = dict(launches_claimed=[4, 6], launches_measured=4, syncs_claimed=1, syncs_measured=1,
              extra_mb_claimed=[3.0, 3.0], extra_mb=3.0, gpu_busy_pct=80.0, host_bound=False, claims_contradicted=[])


def test_counts_section_flags_the_contradicted_claims(tmp_path):
    rows = journey_rows(**COUNTS)
    rows[2].update(syncs_measured=2, claims_contradicted=["syncs"])  # level 4 at 8 tokens: one sync claimed
    rows[3].update(extra_mb=40.0, claims_contradicted=["extra memory"])  # level 4 at 64 tokens: 3 MiB claimed
    page = write_run(tmp_path, rows)
    assert "Claimed against measured" in page
    assert re.findall(r'class="mismatch">([^<]*)<', page) == ["2", "40.0"]
    assert "tr:has(.mismatch)" in page  # the whole row turns red, not just the cell


def test_rows_say_the_clock_their_calls_ended_at(tmp_path):
    rows = journey_rows(**COUNTS, sm_clock_mhz=1980, power_capped=False)
    rows[3].update(sm_clock_mhz=1425, power_capped=True)  # level 4 at 64 tokens, under the power cap
    page = write_run(tmp_path, rows)
    summary = (tmp_path / "summary.md").read_text()
    assert "1425–1980 MHz; the software power cap held it down after 1 of 5 rows" in summary
    assert "<td>1425 capped</td>" in page and "<td>1980</td>" in page


def test_the_dense_gemms_yardstick_is_a_table_where_it_was_timed(tmp_path):
    rows = journey_rows()
    # cuBLAS's dense GEMMs timed at 64 tokens only (the size under the matmul roof); the peer was timed in a batch of
    # its own, beside a timing of cuBLAS of its own
    for r in rows:
        if r["tokens"] == 64 and r["status"] == "ok":
            r["dense_gemm_ms"] = r["ms"] / (2.5 if r["level"] == "peer" else 2)
    page = write_run(tmp_path, rows)
    summary = (tmp_path / "summary.md").read_text()
    title = "% of cuBLAS on the same FLOPs"
    assert summary.count(title) == 1 and page.count(f"<h3>{title}</h3>") == 1
    table = summary.split(title)[1].split("\n\n", 2)[1]
    assert re.search(r"\| 4 grouped +\| +- \| +50\.0 \|", table)  # level 4: ms 2·(1 + 64/64) = 4.0, cuBLAS 2.0
    # the row's TFLOP/s times its ms over cuBLAS's ms: 1.0 · 4.0 / 2.0 beside level 4, 1.0 · 2.0 / 0.8 beside the peer
    assert "cuBLAS's rate: 2-2.5 TFLOP/s at 64 tokens" in summary
    assert title not in write_run(tmp_path, journey_rows())  # not timed anywhere: no table


def test_host_bound_rows_say_so_in_the_summary_and_the_page(tmp_path):
    rows = journey_rows(**COUNTS)
    rows[2].update(gpu_busy_pct=35.4, host_bound=True)  # level 4 at 8 tokens
    page = write_run(tmp_path, rows)
    summary = (tmp_path / "summary.md").read_text()
    said = "host-bound (the GPU was busy 35% of the forward: the time depends on the host CPU"
    assert summary.count(said) == 1 and page.count(said) == 1


def test_rows_whose_host_issues_slower_than_the_gpu_runs_are_host_bound(tmp_path):
    """A level that never waits for the GPU and took the host longer to issue than the GPU to run is host-bound; one
    that waits has the wait in its host time, so there only the busy share tells (whatever the row's stored flag
    says: rows of the older rule read as this one)."""
    rows = journey_rows(**COUNTS)
    rows[0].update(ms=0.0298, host_ms=0.0394, syncs_measured=0, host_bound=False)  # no sync: issued slower
    rows[1].update(ms=1.0, host_ms=1.2, syncs_measured=1, host_bound=True)  # its sync's wait is in its host time
    page = write_run(tmp_path, rows)
    summary = (tmp_path / "summary.md").read_text()
    said = "host-bound (the host took 39.4 µs to issue each forward, and a forward took 29.8 µs on the GPU's clock"
    assert summary.count(said) == 1 and page.count(report_html.esc(said)) == 1
    assert "<td>39.4 / 29.8</td>" in page and summary.count("host-bound (") == 1
    assert ("host's time to issue one forward, for the levels that never wait for the GPU: 39–39 µs (median 39); "
            "host-bound: 1 of 5 rows") in summary
    # The time table marks that cell, and only it.
    assert summary.count("0.0298 (h)") == 1 and summary.count(" (h) |") == 1 and "`(h)` = host-bound" in summary


def test_no_counts_section_without_counts(tmp_path):
    assert "Claimed against measured" not in write_run(tmp_path, journey_rows())


def test_lessons_are_linked_from_the_run_folder():
    links = report_html.level_links(report.frame(journey_rows()), report_html.REPO / "results/moe_journey/a-run")
    assert links["4 grouped"].startswith('<a href="../../../labs/moe_optimization_journey/level4_grouped.py" '
                                         'title="Level 4: grouped.')
    assert "peer_torch_grouped_mm.py" in links["peer: torch_grouped_mm"]


def rendered(path):
    """The page's DOM after headless Chromium loaded it from the file."""
    result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                             path.as_uri()], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install chromium)")
@pytest.mark.parametrize("device_type, tables, images", [
    # time, × peer, speedup, previous level, TF/s, % roofline, GPU memory, decode, load, counts | time, speedup,
    # roofline, load
    ("cuda", 10, 4),
    # the CPU has no roofline, no GPU memory and no copy bandwidth: none of their tables, nor the roofline figure
    ("cpu", 7, 3),
])
def test_page_renders_in_chromium_with_every_table_and_image(tmp_path, device_type, tables, images):
    write_run(tmp_path, journey_rows(device_type, **COUNTS), device_type)
    dom = rendered(tmp_path / "report.html")
    assert dom.count("<table") == tables
    sources = re.findall(r'<img src="data:image/png;base64,([^"]+)"', dom)
    assert len(sources) == images == dom.count("<img")
    for data in sources:
        png = base64.b64decode(data)
        assert png[:8] == PNG_MAGIC
        Image.open(io.BytesIO(png)).verify()
    assert 'href="#tiny"' in dom and 'id="tiny"' in dom  # the contents reach the case
    assert "<script" not in dom and not re.search(r'(src|href)="(https?:)?//', dom)  # nothing from the network


def fp8_rows():
    """Levels 9 and 10 and both peers at 8 and 64 tokens; the FP8 rows carry their quant_err."""
    return [*(row(level, name, t) for level, name in ((9, "persistent_tma"), ("peer", "torch_grouped_mm"))
              for t in (8, 64)),
            *(row(level, name, t, quant_err=0.064) for level, name in ((10, "fp8"), ("peer-fp8",
                                                                                     "torch_scaled_grouped_mm"))
              for t in (8, 64))]


def test_fp8_rows_get_their_section_and_ceiling(tmp_path):
    rows = fp8_rows()
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ceilings = {"matmul_tflops": 731.0, "copy_gbps": 3000.0, "fp8_matmul_tflops": 1325.0}
    (tmp_path / "environment.json").write_text(json.dumps({"target": "moe_journey", "device": "Test GPU",
                                                           "device_type": "cuda", "ceilings": ceilings,
                                                           "command": "aisp bench run"}))
    summary = report.write_report(tmp_path).read_text()
    page = (tmp_path / "report.html").read_text()
    ceiling_line = "bf16 matmul 731 TFLOP/s, FP8 matmul 1325 TFLOP/s, device copy 3000 GB/s"
    assert ceiling_line in summary and ceiling_line in page
    fp8 = summary[summary.index("## FP8 (e4m3)"):]
    assert "Speedup over 9 persistent_tma" in fp8 and "Speedup over peer-fp8: torch_scaled_grouped_mm" in fp8
    assert re.search(r"\| 10 fp8 +\| +0\.064 \| +0\.064 \|", fp8)  # quant err, FP8 rows only
    assert "| 9 persistent_tma" not in fp8[fp8.index("quant err (against"):]
    assert '<h2 id="fp8">' in page and "Speedup over peer-fp8: torch_scaled_grouped_mm (its ms over the level" in page
    assert "peer_torch_scaled_grouped_mm.py" in page  # the FP8 peer links to its lesson
    # "× peer" stays against the bf16 peer
    assert "The peer's ms over the level's at each token count (peer: torch_grouped_mm)" in page
    readme = report.readme_summary(tmp_path, "run")
    assert "FP8 (e4m3): TFLOP/s, and the largest quant err" in readme and re.search(r"quant err \|", readme)


def test_no_fp8_section_without_fp8_rows(tmp_path):
    page = write_run(tmp_path, journey_rows())
    summary = (tmp_path / "summary.md").read_text()
    assert "FP8" not in page and "FP8" not in summary and "FP8" not in report.readme_summary(tmp_path, "run")


@pytest.mark.parametrize("garbage_free", [True, False])
def test_peak_memory_is_shown_only_where_it_was_counted_without_garbage(tmp_path, garbage_free):
    """Rows from before the harness collected garbage first say why their peak memory is left out."""
    page = write_run(tmp_path, journey_rows(peak_garbage_free=garbage_free))
    summary = (tmp_path / "summary.md").read_text()
    assert ("Peak GPU memory during one forward" in summary) == garbage_free
    assert (report.PEAK_NOT_SHOWN in summary) != garbage_free
    assert (report_html.esc(report.PEAK_NOT_SHOWN) in page) != garbage_free


class PageText(HTMLParser):
    """What a reader of a page sees: its table cells, and all its text with the white space squeezed."""

    def __init__(self, page: str):
        super().__init__()
        self.cells, self.pieces, self.cell = set(), [], None
        self.feed(page)
        self.text = " ".join("".join(self.pieces).split())

    def handle_starttag(self, tag, attrs):
        if tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.cells.add("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data):
        self.pieces.append(data)
        if self.cell is not None:
            self.cell.append(data)


def summary_cells(summary: str) -> list[str]:
    """The cells of every table's body in summary.md but its rows' names (the page links them, or shortens a token
    count), a speedup's x written as the page writes it, ×."""
    blocks = [block.splitlines() for block in summary.split("\n\n") if block.startswith("|")]
    cells = [cell.strip() for lines in blocks for line in lines[2:] for cell in line.strip("|").split("|")[1:]]
    return [re.sub(r"(?<=\d)x$", "×", cell) for cell in cells]


def assert_page_carries_the_summary(run_dir):
    """Every cell of summary.md's tables is in report.html's, and every line of its environment is in its text."""
    summary = (run_dir / "summary.md").read_text()
    page = PageText((run_dir / "report.html").read_text())
    assert [cell for cell in summary_cells(summary) if cell not in page.cells] == []
    env, rows = report.load_environment(run_dir), report.load_rows(run_dir)
    assert all(f"- {item}" in summary for item in report.environment_items(env, rows))
    assert [item for item in report.environment_items(env, rows)
            if " ".join(re.sub(r"[`*]", "", item).split()) not in page.text] == []


STAGE_MS = {"routing": 0.1, "permute": 0.3, "expert GEMMs": 1.0, report.OUTSIDE_STAGES: 0.2}
TIMING = dict(timed_calls=[37, 58], args={"repeats": 50, "timing_rounds": 2})  # environment.json's, of a GPU run


@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
def test_page_carries_every_table_and_environment_line_of_the_summary(tmp_path, device_type):
    rows = journey_rows(device_type, **COUNTS, stage_ms=STAGE_MS, profile_calls=20)
    for r in rows:
        if r["tokens"] == 64 and r["status"] == "ok":
            r["dense_gemm_ms"] = r["ms"] / 2
    write_run(tmp_path, rows, device_type, **TIMING)
    assert_page_carries_the_summary(tmp_path)


def test_environment_says_how_many_calls_each_timing_used(tmp_path):
    rows = journey_rows(**{**COUNTS, "syncs_measured": 0}, host_ms=0.05, sm_clock_mhz=1980, power_capped=False)
    page = write_run(tmp_path, rows, **TIMING)
    assert "timed calls per row: 37–58 (asked for 50: " in page
    assert "checked first, then timed in turn: 2 rounds" in page
    assert "host&#x27;s time to issue one forward" in page and "SM clock right after each row&#x27;s timed" in page
    bare = write_run(tmp_path, journey_rows())  # a run from before the harness recorded any of them
    assert "timed calls per row" not in bare and "rounds" not in bare and "issue one forward" not in bare


def test_decode_table_is_shown_at_decode_token_counts_on_a_gpu(tmp_path):
    title = f"<h3>{report_html.esc(report.DECODE_TITLE)}</h3>"
    page = write_run(tmp_path, journey_rows())  # 8 and 64 tokens
    assert page.count(title) == 1 and "% of the measured copy bandwidth (3000 GB/s)." in page
    assert "<td>50 (1.7%)</td>" in page  # 50 GB/s of the 3000 measured
    large = [row(level, name, tokens) for level, name in ((0, "naive"), (4, "grouped")) for tokens in (1024, 2048)]
    assert title not in write_run(tmp_path, large)
    assert title not in write_run(tmp_path, journey_rows("cpu"), "cpu")  # no copy bandwidth measured


def test_load_table_is_shown_where_the_rows_measured_the_load(tmp_path):
    page = write_run(tmp_path, journey_rows(load_cv=0.25, load_gini=0.125, load_max_over_mean=1.5, dead_experts=1))
    load = page[page.index(f"<h3>{report.LOAD_TITLE}</h3>"):]
    assert "The same routing for every level at a given T." in load
    assert re.search(r"<th>8</th>\s*<td>0.250</td>\s*<td>0.125</td>\s*<td>1.50</td>\s*<td>1</td>\s*<td>0</td>", load)
    rows = journey_rows()
    for r in rows:  # rows from before the harness measured the load
        r.update(tokens_per_expert=None, load_cv=None, load_gini=None, load_max_over_mean=None, dead_experts=None,
                 dropped_tokens=None)
    page = write_run(tmp_path, rows)
    assert report.LOAD_TITLE not in page and report.LOAD_TITLE not in (tmp_path / "summary.md").read_text()


def test_stage_tables_are_shown_where_the_rows_were_profiled(tmp_path):
    page = write_run(tmp_path, journey_rows(stage_ms=STAGE_MS, profile_calls=20))
    for tokens in (8, 64):
        stages = page[page.index(f"<h3>{report.stage_title(tokens)}</h3>"):]
        assert "From <code>--profile</code>: ms per call in each stage, the mean of up to 20 calls" in stages
        assert "<em>routing</em> is the router" in stages  # summary.md's *routing*, emphasised
        assert re.search(r"4 grouped</a></th>\s*<td>0.1 \(6%\)</td>\s*<td>0.3 \(19%\)</td>", stages)
    assert page.count('stages per level (stages_tiny.png)') == 1  # one figure of both counts, under the last
    assert "Where the time goes" not in write_run(tmp_path, journey_rows())


def test_every_section_is_in_the_contents(tmp_path):
    fp8 = fp8_rows()[4:]  # level 10 and the FP8 peer
    page = write_run(tmp_path, [*journey_rows(**COUNTS, stage_ms=STAGE_MS, profile_calls=20), *fp8])
    nav = page[page.index("<nav>"):page.index("</nav>")]
    ids = re.findall(r'<(?:section|h2) id="([^"]+)"', page)  # the sections, and the subsections in them
    assert re.findall(r'href="#([^"]+)"', nav) == ids and len(set(ids)) == len(ids)
    for subsection in ("Time per forward", "Decode regime (T ≤ 512)", "Load over the experts in the timed forward",
                       "Where the time goes at 8 tokens", "Claimed against measured", "Notes from the rows"):
        assert f">{report_html.esc(subsection)}</a>" in nav
    assert re.search(r'<li><a href="#tiny">tiny</a><ol><li><a href="#tiny-time_per_forward">', nav)  # nested


def test_ep_section_carries_the_summarys_caption_and_notes(tmp_path):
    rows = [json.loads(line) for line in (RESULTS / "20261127T052239Z-nvidia-h200" / "rows.jsonl").read_text()
            .splitlines()]
    rows[-1]["note"] = "chunks: 1 of 1, 2, 4 timed fastest"
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copy(RESULTS / "20261127T052239Z-nvidia-h200" / "environment.json", tmp_path)
    report.write_report(tmp_path)
    page = (tmp_path / "report.html").read_text()
    ep_rows = report.split_ep(report.frame(rows))[0]
    caption = report_html.inline_html(report.ep_caption(ep_rows, report.load_environment(tmp_path)))
    assert caption in page and "<em>Exposed comm</em> is that rank" in caption
    assert "W=2, deepseek-v3, zipf(s=1.2), 32768 tokens per rank: ok: chunks: 1 of 1, 2, 4 timed fastest" in page
    assert 'href="#expert-parallel-notes_from_the_rows"' in page
    assert_page_carries_the_summary(tmp_path)


def test_inline_html_marks_up_the_summarys_markdown_and_escapes_the_rest():
    assert (report_html.inline_html("`a *b* <c>` **d** *e* <f>")
            == "<code>a *b* &lt;c&gt;</code> <strong>d</strong> <em>e</em> &lt;f&gt;")


def test_each_level_has_its_own_colour_in_every_plot():
    levels = [(level, f"{level} level{level}") for level in range(11)]
    colors = report.level_colors(pd.DataFrame(levels, columns=["level", "label"]))
    assert len(set(colors.values())) == 11 and not set(colors.values()) & set(report.PEER_COLORS.values())
    alone = report.level_colors(pd.DataFrame(levels[8:10], columns=["level", "label"]))
    assert alone == {label: colors[label] for label in alone}  # a level's colour whatever else a run has
