"""`aisp`: run the lab's benchmarks and read their results.

    aisp bench list
    aisp bench run -t moe_journey [--levels 0-6] [--tokens 2048,8192] [--preset journey] [--device auto]
    aisp bench report RUN_DIR
    aisp bench compare RUN_DIR RUN_DIR [--markdown FILE]
    aisp bench publish RUN_DIR...   (from GPU runs: LATEST.md and the README's results block; EP runs: its
                                     ep-results block)
    aisp lab show [N]               (a level's lesson, code diff, claims and GPU row; no N: every level)

Bad input is one line on stderr and exit code 2, never a traceback; an error no check foresaw is one line too,
exit code 1, and so is a run whose rows include a failed level (the run is written in full first). `aisp --debug
...` (or AISP_DEBUG=1) re-raises instead, with the full traceback (a level's own crash included).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import import_module
from pathlib import Path
from typing import Callable

# `python -m cli.aisp` from a Python that lacks the lab's packages: one line that says where they are, not a traceback
if sys.version_info < (3, 11):
    sys.exit(f"aisp needs Python 3.11 or newer; {sys.executable} is {platform.python_version()}")
try:
    import typer
    from rich import box
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.markup import escape
    from rich.table import Column, Table
except ModuleNotFoundError as missing:
    sys.exit(f"aisp: {sys.executable} has no {missing.name}; `make bench` or `make test` sets up .venv with the "
             "lab's packages (then .venv/bin/aisp ...), or `pip install -e .` installs them here")

try:  # typer ≥ 0.16 carries its own copy of click; older ones use click itself
    from typer._click.exceptions import ClickException
except ImportError:
    from click.exceptions import ClickException

from cli.lab import lab
from cli.options import (
    CAPACITY_FACTOR,
    DEBUG_ENV,
    DEFAULTS,
    HOT_SHARE,
    PRESET_HELP,
    ROUTER,
    ZIPF_S,
    UsageError,
    configs_for,
    debugging,
    error_line,
    parse_counts,
    parse_levels,
    parse_traffics,
    parse_world_sizes,
    timing,
    use_threads,
)
from result_row import TARGET

REPO_ROOT = Path(__file__).resolve().parents[1]
console = Console()
app = typer.Typer(help="aisp: an open benchmark lab for AI-systems performance.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
bench = typer.Typer(help="Run benchmarks and read their results.", no_args_is_help=True)
app.add_typer(bench, name="bench")
app.add_typer(lab, name="lab")

TARGETS = {TARGET: "one MoE feed-forward layer, from naive Python loops to a fast GPU implementation"}
# The README's generated blocks: the single-GPU journey's results, and the expert-parallel level's.
RESULTS_BLOCK = ("<!-- results:start -->", "<!-- results:end -->")
EP_RESULTS_BLOCK = ("<!-- ep-results:start -->", "<!-- ep-results:end -->")
stderr = Console(stderr=True, soft_wrap=True, highlight=False)


@app.callback()
def global_options(debug: bool = typer.Option(False, "--debug", envvar=DEBUG_ENV,
                                       help="re-raise errors with their full traceback, a level's crash included "
                                            "(instead of an error row); or set AISP_DEBUG=1")) -> None:
    if debug:
        os.environ[DEBUG_ENV] = "1"  # moe_benchmark reads it too


def fail(message: str) -> None:
    stderr.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(2)


def refuse(error: Exception) -> None:
    """Bad input: one line and exit 2; under --debug, the exception itself."""
    if debugging():
        raise error
    fail(str(error))


def journey():
    """The lab's modules, imported on first use so that `aisp --help` stays fast."""
    import labs.moe_optimization_journey as lab

    return lab


# ---------------------------------------------------------------------------------------------------------------
# Parsing the options (what the level scripts parse too is in cli/options.py)
# ---------------------------------------------------------------------------------------------------------------
def world_sizes_for(spec: str, device) -> list[int]:
    import torch

    sizes = parse_world_sizes(spec, "--world-size")
    if device.type == "cuda" and max(sizes) > torch.cuda.device_count():
        raise UsageError(f"world size {max(sizes)} needs {max(sizes)} GPUs (one process per GPU); this machine has "
                         f"{torch.cuda.device_count()}")
    # On the CPU each rank is a gloo process that imports torch: 8 ran in 33 s on 2 cores, 64 made no row in 2 minutes.
    most = max(8, 2 * (os.cpu_count() or 1))
    if device.type == "cpu" and max(sizes) > most:
        raise UsageError(f"world size {max(sizes)}: that many processes on {os.cpu_count()} CPU cores would take "
                         f"minutes to start; at most {most} here")
    return sizes


def prepare_out_dir(out: Path, target: str) -> Path:
    """The results root that a run's folder goes under (out/target/<run>), refused where it is a run folder, inside
    one, or a target's own folder: the run would land inside another, where no one looks for it."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file, not a folder")
    for folder in (out.resolve(), *out.resolve().parents):  # a run folder: <root>/<target>/<run>/environment.json
        if folder.parent.name == target and (folder / "environment.json").exists():
            raise UsageError(f"--out {str(out)!r} is {'' if folder == out.resolve() else 'inside '}the run folder "
                             f"{str(folder)!r}; --out is the results root that holds the targets' folders, e.g. "
                             "results")
    if out.resolve().name == target:
        raise UsageError(f"--out {str(out)!r} is the {target} folder itself; --out is the results root above it, "
                         f"e.g. {str(out.parent)!r}")
    try:  # where the run's folder will be made: out/target, which may exist and be read-only
        (out / target).mkdir(parents=True, exist_ok=True)
        probe = out / target / ".aisp-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"cannot write to {str(out / target)!r}: {error.strerror}") from None
    return out


# ---------------------------------------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------------------------------------
def device_slug(label: str) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in label.lower())
    return "-".join(part for part in slug.split("-") if part)[:40] or "device"


def new_run_dir(target_dir: Path, device_label: str) -> Path:
    """results/<target>/<UTC date-time>-<device>/, never an existing folder."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = f"{stamp}-{device_slug(device_label)}"
    for attempt in range(1, 1000):
        run_dir = target_dir / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue
    raise UsageError(f"could not make a new run folder under {target_dir}")


def nvidia_smi(*args: str) -> str | None:
    """nvidia-smi's output for these arguments, or None where it cannot run."""
    try:
        result = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else None


def nvidia_driver() -> str | None:
    output = nvidia_smi("--query-gpu=driver_version", "--format=csv,noheader")
    return output.splitlines()[0] if output else None


def code_version() -> str | None:
    """The commit the run measured, with " + uncommitted changes" where tracked files differed from it; None
    outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                              cwd=REPO_ROOT, timeout=20)
        changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, cwd=REPO_ROOT, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + (" + uncommitted changes" if changes.stdout.strip() else "")


def gpu_topology() -> str | None:
    """`nvidia-smi topo -m` less its terminal colours: how the GPUs connect (NV# = # bonded NVLinks; PIX, PHB,
    SYS: PCIe paths), what the expert-parallel level's collectives cross."""
    output = nvidia_smi("topo", "-m")
    return re.sub(r"\x1b\[[0-9;]*m", "", output) if output else None


def cpu_model() -> str | None:
    """The host CPU's model name (Linux's /proc/cpuinfo; else what Python's platform module knows), so that two
    machines' CPU runs can be told apart."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment(device, ceilings, configs, args: dict) -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    lab = journey()
    return {
        "target": TARGET,
        "device": lab.moe_benchmark.device_label(device),
        "device_type": device.type,
        "driver": nvidia_driver() if device.type == "cuda" else None,
        "topology": gpu_topology() if device.type == "cuda" else None,
        "code": code_version(),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "triton_kernels": import_module("peer_triton_kernels_matmul_ogs").installed_at(),  # OpenAI's, for its peer
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "ceilings": vars(ceilings) if ceilings else None,
        "presets": [config.to_dict() for config in configs],
        "args": args,
        "command": args.pop("command"),
        "argv": shlex.join(sys.argv),
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------
@bench.command("list")
def list_command() -> None:
    """The targets, their levels and the presets."""
    from moe_model import PRESETS

    for target, description in TARGETS.items():
        console.print(f"[bold]{target}[/bold]: {description}")
    table = Table(title=f"{TARGET} levels")
    table.add_column("level", justify="right")
    table.add_column("name")
    table.add_column("idea")
    for key, cls in journey().load_levels().items():
        table.add_row(key, cls.name, escape(cls.summary))  # summaries name tensors like [expert_ids]: not markup
    ep = journey().expert_parallel().ExpertParallelMoE
    table.add_row(ep.level, ep.name, escape(f"{ep.summary} (only when named: --levels ep --world-size N)"))
    console.print(table)
    presets = Table(title="presets (or an inline shape, or a TOML file: see --help of run)")
    for column in ("preset", "H", "I", "E", "K", "shared", "dtype"):
        presets.add_column(column)
    for name, config in PRESETS.items():
        presets.add_row(name, str(config.hidden), str(config.intermediate), str(config.num_experts),
                        str(config.top_k), str(config.num_shared_experts), config.dtype)
    console.print(presets)


@bench.command("run")
def run_command(
    target: str = typer.Option(..., "-t", "--target", help=f"what to run: {', '.join(TARGETS)}"),
    levels: str = typer.Option(None, help="e.g. 0-10, 0,4,9,peer,peer-ogs (default: every level and every peer)"),
    tokens: str = typer.Option(None, help=f"token counts, e.g. 2048,8192 (default: {DEFAULTS['cuda'].tokens} on a "
                                          f"GPU, {DEFAULTS['cpu'].tokens} on the CPU)"),
    preset: str = typer.Option(None, help=PRESET_HELP),
    device: str = typer.Option("auto", help="auto, cuda or cpu"),
    router: str = typer.Option(ROUTER, help="softmax-topk, sigmoid-bias, switch (top-1: presets then run with "
                                            "top_k=1) or expert-choice"),
    capacity_factor: float = typer.Option(CAPACITY_FACTOR, help="switch and expert-choice: each expert's capacity, "
                                                                "in mean loads"),
    traffic: str = typer.Option("uniform", help="traffic shape(s), comma-separated: uniform, zipf, hot"),
    zipf_s: float = typer.Option(ZIPF_S, help="zipf traffic: expert popularity ∝ rank^-s"),
    hot_share: float = typer.Option(HOT_SHARE, help="hot traffic: the share of tokens that pick expert 0"),
    warmup: int = typer.Option(None, help=f"untimed calls before each of a row's turns of timed calls (default: "
                                          f"{DEFAULTS['cuda'].warmup} on a GPU, {DEFAULTS['cpu'].warmup} on the "
                                          "CPU; on a GPU at least 0.25 s of them)"),
    repeats: int = typer.Option(None, help=f"timed calls to aim for, over a row's two turns: fewer when the calls "
                                           f"are slow, never under 5 "
                                           f"(on a GPU do_bench times for that many of the warm-up's calls, so its "
                                           f"count varies) (default: "
                                           f"{DEFAULTS['cuda'].repeats} on a GPU, {DEFAULTS['cpu'].repeats} on the "
                                           "CPU)"),
    profile: bool = typer.Option(False, "--profile", help="also time each level's stages (routing, permute, "
                                                         "expert GEMMs, activation, combine, shared experts)"),
    world_size: str = typer.Option("1", help="level ep: world sizes, comma-separated, each dividing the largest, "
                                             "all timed in turn in one torchrun of the largest (one process per "
                                             "GPU, NCCL; gloo processes on the CPU); tokens and experts are per rank"),
    ep_chunks: str = typer.Option("auto", help="level ep: chunk counts of the pipelined forward (all-to-all "
                                               "under expert compute) to time and choose from, comma-separated, or "
                                               "auto: 1, 2, 4 and 8; one chunk, the unpipelined baseline, is "
                                               "always timed too, and kept where it is faster"),
    out: str = typer.Option("results", help="results folder; each run makes a new sub-folder"),
) -> None:
    """Check and time levels across token scales; write rows, tables and plots to a new run folder."""
    import torch

    from moe_model import ConfigError

    # The whole request is checked before anything is made.
    try:
        if target not in TARGETS:
            raise UsageError(f"unknown target {target!r}; available: {', '.join(TARGETS)}")
        lab = journey()
        bench_mod = lab.moe_benchmark
        torch_device = bench_mod.resolve_device(device)
        defaults = DEFAULTS[torch_device.type]
        warmup, repeats = timing(warmup, repeats, defaults)
        available = lab.load_levels()
        level_keys = parse_levels(levels, list(available))
        token_counts = parse_counts(tokens if tokens is not None else defaults.tokens, "--tokens")
        if "ep" not in level_keys and (world_size != "1" or ep_chunks != "auto"):
            raise UsageError("--world-size and --ep-chunks are level ep's options: add ep to --levels")
        if profile and level_keys == ["ep"]:
            raise UsageError("--profile times the stages of the one-process levels; level ep's rows split its "
                             "forward into dispatch, compute and combine instead: drop --profile")
        world_sizes = world_sizes_for(world_size, torch_device) if "ep" in level_keys else []
        if ep_chunks != "auto":
            ep_chunks = ",".join(map(str, parse_counts(ep_chunks, "--ep-chunks")))
        preset = preset if preset is not None else defaults.preset
        configs = configs_for(preset, router, capacity_factor)
        traffics = parse_traffics(traffic, zipf_s, hot_share)
        if not out.strip():  # Path("") would be the current folder
            raise UsageError("--out is empty: name the results folder (the default is results)")
        out_dir = prepare_out_dir(Path(out), target)
    except (UsageError, ConfigError) as error:
        refuse(error)

    use_threads(defaults)
    ceilings = bench_mod.measure_ceilings(torch_device)
    run_dir = new_run_dir(out_dir / target, bench_mod.device_label(torch_device))
    args = {"levels": level_keys, "tokens": token_counts, "traffic": [t.label for t in traffics], "warmup": warmup,
            "repeats": repeats, "timing_rounds": bench_mod.TIMING_ROUNDS, "profile": profile,
            "world_sizes": world_sizes, "ep_chunks": ep_chunks}
    # The run, every default resolved, as a command that repeats it.
    args["command"] = shlex.join(["aisp", "bench", "run", "-t", target, "--levels", ",".join(level_keys),
                                  "--tokens", ",".join(map(str, token_counts)),
                                  "--preset", preset, "--router", router,
                                  "--capacity-factor", f"{capacity_factor:g}", "--traffic", traffic,
                                  "--zipf-s", f"{zipf_s:g}", "--hot-share", f"{hot_share:g}", "--device", device,
                                  "--warmup", str(warmup), "--repeats", str(repeats), "--out", str(out)]
                                 + (["--profile"] if profile else [])
                                 + (["--world-size", ",".join(map(str, world_sizes)), "--ep-chunks", ep_chunks]
                                    if world_sizes else []))
    env = environment(torch_device, ceilings, configs, args)
    (run_dir / "environment.json").write_text(json.dumps(env, indent=2) + "\n")
    console.print(f"run folder: {escape(str(run_dir))}", soft_wrap=True)
    if ceilings:
        console.print(f"ceilings on {env['device']}: bf16 matmul {ceilings.matmul_tflops:.0f} TFLOP/s, "
                      f"copy {ceilings.copy_gbps:.0f} GB/s")

    rows = []
    interrupted = None  # the signal that stopped the run, if one did

    def stop(signum, frame):  # a scheduler's kill or a closed terminal ends the run as Ctrl-C does: rows kept
        raise KeyboardInterrupt(signal.Signals(signum).name)

    # The description is plain text (a preset's name may hold brackets) and gives way at the screen's edge, cut
    # with an ellipsis, so that the bar, the count and the time always show.
    progress = Progress(TextColumn("{task.description}", markup=False,
                                   table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
                        BarColumn(bar_width=12), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                        expand=True)
    in_process = [key for key in level_keys if key != "ep"]
    cases = len(configs) * len(traffics) * len(token_counts)
    with progress, open(run_dir / "rows.jsonl", "a") as rows_file:
        task = progress.add_task("starting", total=cases * (len(in_process) + len(world_sizes)))

        def record(row: dict, advance: bool = True) -> None:
            rows.append(row)
            rows_file.write(json.dumps(row) + "\n")
            rows_file.flush()  # an interrupted run keeps every finished row
            if advance:
                progress.advance(task)

        previous_handlers = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGHUP)}
        try:
            for config in configs if in_process else []:
                progress.update(task, description=f"{config.name}: drawing weights")
                try:
                    weights = bench_mod.init_weights(config, torch_device)
                except Exception as error:  # too big for this device: its rows say so, and the run goes on
                    if debugging() or not (isinstance(error, torch.cuda.OutOfMemoryError)
                                           or bench_mod.out_of_host_memory(error)):
                        raise
                    bench_mod.release_memory(torch_device)
                    for shape in traffics:
                        for num_tokens in token_counts:
                            for key in in_process:
                                row = bench_mod.base_row(available[key], config, num_tokens, torch_device, shape)
                                row.update(status="oom", note=f"out of {torch_device.type} memory for "
                                                              f"{config.name}'s weights")
                                record(row.to_json())
                    continue
                settings = bench_mod.Settings(ceilings=ceilings, warmup=warmup, repeats=repeats,
                                              time_budget_s=defaults.time_budget_s, profile=profile)
                for shape in traffics:
                    for num_tokens in token_counts:
                        case = f"{config.name} · {shape.label} · {num_tokens} tokens"
                        for row in bench_mod.benchmark_case(
                                [available[key] for key in in_process], config, num_tokens, torch_device,
                                weights=weights, traffic=shape, settings=settings,
                                status=lambda doing, case=case: progress.update(task,
                                                                                description=f"{case} · {doing}"),
                                done=lambda share: progress.advance(task, share)):  # step by step
                            record(row, advance=False)
                del weights
                bench_mod.release_memory(torch_device)
            if world_sizes:
                progress.update(task, description=f"level ep: {max(world_sizes)} process(es), world sizes "
                                                  f"{', '.join(map(str, world_sizes))} in turn, {cases} case(s)")
                run_expert_parallel(world_sizes, configs, traffics, token_counts, torch_device, warmup, repeats,
                                    defaults.time_budget_s, ep_chunks, run_dir, record)
        except KeyboardInterrupt as signal_name:
            interrupted = str(signal_name) or "SIGINT"
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)

    if interrupted and not rows:  # stopped before a row finished: no folder to become the newest run, empty
        shutil.rmtree(run_dir)
        stderr.print(f"interrupted ({interrupted}) before any row finished: no run folder kept")
        raise typer.Exit(128 + signal.Signals[interrupted])
    env["finished_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    env["interrupted"] = interrupted is not None
    timed = [row["repeats"] for row in rows if row.get("repeats")]
    env["timed_calls"] = [min(timed), max(timed)] if timed else None  # what ran, beside args.repeats (asked)
    (run_dir / "environment.json").write_text(json.dumps(env, indent=2) + "\n")
    from cli import report

    report.write_report(run_dir)  # LATEST.md is left alone: only `aisp bench publish` changes what it shows
    console.print(bench_mod.rows_table(rows, title=f"{target} on {env['device']}"))
    plots = " and plots" if any(run_dir.glob("*.png")) else ""  # a run of rows none of which was timed has none
    console.print(f"rows, summary.md, report.html{plots}: {escape(str(run_dir))}", soft_wrap=True)
    if interrupted:
        stderr.print(f"[yellow]interrupted ({interrupted}):[/yellow] {len(rows)} finished rows kept in "
                      f"{escape(str(run_dir / 'rows.jsonl'))} (a case's rows are written once all its levels "
                      "are timed)", soft_wrap=True)
        raise typer.Exit(128 + signal.Signals[interrupted])
    failed = [row for row in rows if row["status"] == "error"]
    if failed:  # a level that crashed or computed the wrong function: the run is written, and it did not pass
        stderr.print(f"[red]error:[/red] {len(failed)} of {len(rows)} rows failed (status error; the table's notes "
                     "say why)")
        raise typer.Exit(1)


def run_expert_parallel(world_sizes: list[int], configs: list, traffics: list, token_counts: list[int], device,
                        warmup: int, repeats: int, time_budget_s: float, chunks: str, run_dir: Path,
                        record: Callable[[dict], None]) -> None:
    """Launch the EP level under torchrun with the largest of `world_sizes` processes, which times every world size
    in turn (ep_benchmark.benchmark_ep), choosing among `chunks` (auto, or chunk counts comma-separated). Each row
    goes to `record` as soon as the launch has written it, so the progress bar moves case by case and an
    interrupted run keeps every finished row; then an `error` row for every (world size, case) it did not finish,
    with why the launch failed (launch_failure)."""
    lab = journey()
    ep = lab.expert_parallel()
    rows_path, log_path = run_dir / ".ep-rows.jsonl", run_dir / ".ep-launch.log"
    rows_path.unlink(missing_ok=True)
    traffic = traffics[0]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={max(world_sizes)}", ep.__file__,
               "--world-size", ",".join(map(str, world_sizes)),
               "--config-json", json.dumps([config.to_dict() for config in configs]),
               "--tokens", ",".join(map(str, token_counts)), "--device", device.type,
               "--traffic", ",".join(t.shape for t in traffics), "--zipf-s", str(traffic.zipf_s),
               "--hot-share", str(traffic.hot_share), "--warmup", str(warmup), "--repeats", str(repeats),
               "--time-budget-s", str(time_budget_s), "--ep-chunks", chunks, "--rows-out", str(rows_path)]
    done = set()
    read = 0  # how much of the rows file has been recorded: whole lines only, a row being written waits

    def record_new_rows() -> None:
        nonlocal read
        text = rows_path.read_text() if rows_path.exists() else ""
        for line in text[read:text.rfind("\n") + 1].splitlines(keepends=True):
            read += len(line)  # past it before recording it: never recorded twice
            row = json.loads(line)
            done.add((row["world_size"], row["preset"], row["traffic"], row["tokens_per_rank"]))
            record(row)

    try:
        with open(log_path, "w") as log:
            launch = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT)
            try:
                while launch.poll() is None:
                    record_new_rows()
                    try:
                        launch.wait(timeout=0.5)
                    except subprocess.TimeoutExpired:
                        pass
            finally:
                if launch.poll() is None:  # interrupted: torchrun stops its workers, or is made to
                    launch.terminate()
                    try:
                        launch.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        launch.kill()
                        launch.wait()
        output = log_path.read_text()
    finally:
        try:
            record_new_rows()  # the last rows, an interrupted launch's too
        finally:
            rows_path.unlink(missing_ok=True)
            log_path.unlink(missing_ok=True)
    reason = launch_failure(output, launch.returncode)
    for config in configs:
        for shape in traffics:
            for num_tokens in token_counts:
                for world_size in world_sizes:
                    if (world_size, config.name, shape.label, num_tokens) in done:
                        continue
                    row = lab.moe_benchmark.base_row(
                        ep.ExpertParallelMoE, dataclasses.replace(config, num_experts=config.num_experts * world_size),
                        num_tokens * world_size, device, shape)
                    row.update(world_size=world_size, tokens_per_rank=num_tokens, status="error",
                               note=f"ep launch failed: {reason}")
                    record(row.to_json())


def launch_failure(output: str, returncode: int) -> str:
    """Why an EP launch left rows unwritten, in one line: the first exception a worker raised ("[rank0]: XError:
    ..." in the launch's output), not torchrun's own ChildFailedError after it, which names no cause; else a
    refusal's "error:" line; else the exit code."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", line).strip() for line in output.splitlines()]
    raised = [line for line in lines if re.match(r"[\w.]*(Error|Exception): ", line) and "ChildFailedError" not in line]
    found = raised or [line for line in lines if "error:" in line]
    return found[0][:300] if found else f"torchrun exited with code {returncode}"


def existing_run_dir(path: Path) -> Path:
    if not path.exists():
        fail(f"{str(path)!r} does not exist")
    if not (path / "rows.jsonl").is_file():
        fail(f"{str(path)!r} is not a run folder (no rows.jsonl in it)")
    return path


def warn(message: str) -> None:
    stderr.print(f"[yellow]warning:[/yellow] {escape(message)}")


@bench.command("report")
def report_command(run_dir: Path = typer.Argument(None, help="a run folder (default: the newest one)"),
                   results: Path = typer.Option(Path("results"), help="where to look for the newest run")) -> None:
    """Rebuild summary.md and the plots of a run folder from its rows, running nothing."""
    from cli import report

    if run_dir is None:
        runs = sorted((results / TARGET).glob("*/rows.jsonl"), key=lambda p: p.parent.name)
        if not runs:
            fail(f"no run folders under {results / TARGET}")
        run_dir = runs[-1].parent
    try:
        summary = report.write_report(existing_run_dir(run_dir), warn=warn)
    except report.DamagedFile as error:
        refuse(error)
    except OSError as error:
        fail(f"cannot write the report into {str(run_dir)!r}: {error.strerror}")
    plots = " and the plots" if any(summary.parent.glob("*.png")) else " (no rows: no plots)"
    console.print(f"wrote {escape(str(summary))}, {escape(str(summary.parent / 'report.html'))}{plots}",
                  soft_wrap=True)


GEOMEAN_TITLE = "B's speedup over A, per level (over the cases timed in both runs, host-bound ones left out)"


@bench.command("compare")
def compare_command(run_a: Path = typer.Argument(..., help="the baseline run folder"),
                    run_b: Path = typer.Argument(..., help="the run compared with it"),
                    markdown: Path = typer.Option(None, help="also write the tables to this markdown file")) -> None:
    """Case by case (level, preset, shape, traffic, router, dtype, world size, tokens): both times and B's speedup
    over A; then per level, the geometric mean of the speedups."""
    from cli import report

    if markdown and markdown.exists():  # a run's summary.md, README.md: never overwritten silently
        fail(f"{str(markdown)!r} exists; --markdown writes a new file: name another or remove it first")
    if markdown and not (markdown.parent.is_dir() and os.access(markdown.parent, os.W_OK)):
        fail(f"cannot write {str(markdown)!r}: {str(markdown.parent)!r} is not a folder this user can write")
    try:
        rows_a, rows_b = (report.load_rows(existing_run_dir(run), skip_damaged_last=warn) for run in (run_a, run_b))
        env_a, env_b = report.load_environment(run_a), report.load_environment(run_b)
    except report.DamagedFile as error:
        refuse(error)
    if run_a.resolve() == run_b.resolve():
        fail(f"A and B are the same run folder, {str(run_a)!r}: compare two runs")
    for run, rows in ((run_a, rows_a), (run_b, rows_b)):
        if not rows:
            fail(f"{str(run)!r} has no rows to compare (a run stopped before its first row finished)")
    table, geomean, shared = report.compare_runs(rows_a, rows_b)
    if geomean.empty:
        fail("no case was timed in both runs (same level, preset, shape, traffic, router, dtype, world size and "
             "tokens): nothing to compare")
    heading = (f"A = {run_a.name} ({report.device_name(env_a)})\nB = {run_b.name} ({report.device_name(env_b)})\n"
               f"in every case: {', '.join(f'{k}={v}' for k, v in shared.items()) or '-'}")
    if table["A ms"].str.endswith(report.HOST_BOUND_MARK).any() or table["B ms"].str.endswith(
            report.HOST_BOUND_MARK).any():
        heading += f"\n{report.HOST_BOUND_MARK}: {report.HOST_BOUND_MEANING}; left out of the geometric means"
    console.print(heading, highlight=False)
    for case, part in table.groupby("case", sort=False):
        console.print(text_table(part.drop(columns="case"), title=case))
    console.print(text_table(geomean.rename_axis("level").reset_index(), title=GEOMEAN_TITLE))
    if markdown:
        try:
            markdown.write_text(f"{heading.replace(chr(10), '  ' + chr(10))}\n\n"
                                f"{report.markdown_table(*markdown_cases(table))}\n\n"
                                f"{GEOMEAN_TITLE}:\n\n{report.markdown_table(geomean, 'level')}\n")
        except OSError as error:
            fail(f"cannot write {str(markdown)!r}: {error.strerror}")
        console.print(f"wrote {escape(str(markdown))}", soft_wrap=True)


def markdown_cases(table):
    """The comparison as markdown's (table, corner): indexed by case, or by level where every case is the same one
    (the heading names it) and a case column would stand empty."""
    if table["case"].any():
        return table.set_index("case"), "case"
    return table.drop(columns="case").set_index("level"), "level"


def text_table(df, title: str, left: tuple[str, ...] = ("level",)) -> Table:
    """A DataFrame of text cells as a console table: one line per row (long cells are cut, never folded); the
    `left` columns left-aligned, the numbers right."""
    table = Table(title=escape(title), box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in df.columns:
        table.add_column(escape(str(column)), no_wrap=True, overflow="ellipsis",
                         justify="left" if column in left else "right")
    for values in df.itertuples(index=False):
        table.add_row(*(escape(str(v)) for v in values))
    return table


def write_latest(run_dirs: list[Path]) -> Path:
    """results/moe_journey/LATEST.md: the published GPU runs' summaries, their links pointing into their folders."""
    from cli import report

    latest = run_dirs[0].parent / "LATEST.md"
    latest.write_text("".join(f"{report.published_mark(run_dir.name)}\n"
                              + report.relink((run_dir / "summary.md").read_text(), run_dir.name)
                              for run_dir in run_dirs))
    return latest


def is_ep_run(run_dir: Path, rows: list[dict]) -> bool:
    """Whether a run folder holds the expert-parallel level's rows (each has a world size) rather than single-GPU
    ones; a folder of both is refused, since the README shows the two in different blocks."""
    kinds = {row.get("world_size") is not None for row in rows}
    if len(kinds) > 1:
        fail(f"{run_dir.name} holds both expert-parallel rows (with a world size) and single-GPU rows; publish takes "
             "a folder of one kind")
    return kinds == {True}


def fill_block(text: str, block: tuple[str, str], relatives: list[str], in_summaries: str, body: str) -> str:
    """`text` with its block between the `block` markers replaced: the command that made it, a line linking each
    run's summary.md (saying what more is there, `in_summaries`), then `body`."""
    start, end = block
    sources = ", ".join(f"[`{relative}`]({relative}/summary.md)" for relative in relatives)
    filled = (f"{start}\n<!-- generated by `aisp bench publish {' '.join(relatives)}`; do not edit -->\n"
              f"From {sources} ({in_summaries}):\n\n{body}\n{end}")
    return text[:text.index(start)] + filled + text[text.index(end) + len(end):]


@bench.command("publish")
def publish_command(run_dirs: list[Path] = typer.Argument(..., help="GPU run folder(s): one sweep may have run "
                                                                     "as several processes, one per GPU, and the EP "
                                                                     "level runs one folder per preset"),
                    readme: Path = typer.Option(REPO_ROOT / "README.md", help="the README to update")) -> None:
    """Make GPU runs the ones the README shows (tables and plots, copied): single-GPU runs in LATEST.md (beside the
    run folders; the repository's only with the repository's README) and the results block, expert-parallel runs in
    the ep-results block; each run's report is rebuilt in its folder. A block whose kind of run is not given
    stays."""
    from cli import report

    run_dirs = list({run_dir.resolve(): existing_run_dir(run_dir) for run_dir in run_dirs}.values())  # each once
    if not readme.is_file():
        fail(f"--readme {str(readme)!r} is not a file")
    for path in (readme, run_dirs[0].parent, *run_dirs):  # written below: checked before anything is
        if not os.access(path, os.W_OK):
            fail(f"cannot write to {str(path)!r}: publish rewrites the README, LATEST.md beside the runs and each "
                 "run's report")
    ep_dirs = []
    for run_dir in run_dirs:
        try:
            env = report.load_environment(run_dir)
            rows = report.load_rows(run_dir)
        except report.DamagedFile as error:
            refuse(error)
        if env.get("device_type") != "cuda":
            fail(f"{run_dir.name} is not a GPU run; the README shows GPU results only")
        if is_ep_run(run_dir, rows):
            ep_dirs.append(run_dir)
    journey_dirs = [run_dir for run_dir in run_dirs if run_dir not in ep_dirs]
    text = readme.read_text()
    for dirs, (start, end) in ((journey_dirs, RESULTS_BLOCK), (ep_dirs, EP_RESULTS_BLOCK)):
        if dirs and (start not in text or end not in text):
            fail(f"{readme} has no {start} … {end} block to fill")
    if ep_dirs:
        try:
            report.ep_rows_of(ep_dirs)  # refused before anything is written
        except report.OverlappingRuns as error:
            refuse(error)
    for run_dir in run_dirs:
        report.write_report(run_dir)
    shown = []
    if ep_dirs:
        relatives = [os.path.relpath(run_dir, readme.parent) for run_dir in ep_dirs]
        body = report.ep_readme_summary(ep_dirs, relatives)
        text = fill_block(text, EP_RESULTS_BLOCK, relatives, "the phases, chunk counts, bytes moved and each row's "
                          "notes are there", body)
        shown.append(f"the README's expert-parallel block shows {', '.join(relatives)}")
    # The repository's LATEST.md (what `aisp lab show` reads as the published run) follows the repository's README
    # only: a trial publish into another README leaves it alone.
    runs_root = (REPO_ROOT / "results" / TARGET).resolve()
    repository_runs = journey_dirs and journey_dirs[0].parent.resolve() == runs_root
    writes_latest = not repository_runs or readme.resolve() == (REPO_ROOT / "README.md").resolve()
    if journey_dirs:
        if writes_latest:
            write_latest(journey_dirs)
        relatives = [os.path.relpath(run_dir, readme.parent) for run_dir in journey_dirs]
        text = fill_block(text, RESULTS_BLOCK, relatives, "speedup, TFLOP/s, decode GB/s and memory tables, the "
                          "claimed and measured counts, and each row's notes, are there",
                          "\n\n".join(report.readme_summary(run_dir, relative)
                                       for run_dir, relative in zip(journey_dirs, relatives)))
        shown.append(f"README and LATEST.md now show {', '.join(relatives)}" if writes_latest else
                     f"{readme} now shows {', '.join(relatives)} (the repository's LATEST.md follows its own README "
                     "only: left as it was)")
    readme.write_text(text)
    console.print("; ".join(shown))


def main() -> None:
    # Not standalone: click's errors come back here as exceptions instead of typer's framed box, and an Exit as its
    # code; the help that a bare `aisp` or `aisp bench` asks for is printed as before.
    try:
        outcome = app(standalone_mode=False)
    except ClickException as error:  # an option click itself could not parse: one line, its exit code (2)
        if type(error).__name__ != "NoArgsIsHelpError":  # that one's help is already printed
            context = getattr(error, "ctx", None)
            where = f" (see {context.command_path} --help)" if context is not None else ""
            stderr.print(f"[red]error:[/red] {escape(' '.join(error.format_message().split()))}{where}")
        sys.exit(error.exit_code)
    except Exception as error:  # what no check foresaw is still one line, never a traceback (--debug shows it)
        if debugging():
            raise
        stderr.print(f"[red]error:[/red] {escape(error_line(error))} (aisp --debug shows where)")
        sys.exit(1)
    sys.exit(outcome if isinstance(outcome, int) else 0)


if __name__ == "__main__":
    main()
