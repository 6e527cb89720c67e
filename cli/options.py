"""The lab's command-line language, spoken by `aisp bench run` and by every level script alike.

One place parses what a user types (levels, token counts, presets in their three forms, traffic shapes, warm-up
and repeats) and holds the defaults per device, so `python labs/.../level4_grouped.py --preset X` and
`aisp bench run --preset X` accept the same things and refuse the same things with the same words.

Nothing here imports torch at module level: `aisp --help` stays fast. A parser raises `UsageError` (or the
model's `ConfigError`); the caller prints it as one line on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import sys
import tomllib
from pathlib import Path
from typing import NoReturn

DEBUG_ENV = "AISP_DEBUG"  # set (to 1) by `aisp --debug` and by a level script's --debug: re-raise, full traceback


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def error_line(error: BaseException) -> str:
    """An exception as one line, for an error row or the console: its type and its message's first line."""
    message = str(error).strip()
    return f"{type(error).__name__}: {message.splitlines()[0] if message else ''}"[:300]


class UsageError(ValueError):
    """Bad input from the user: printed as one line, exit code 2."""


# The layer's own defaults, where the CLI's options name them: moe_model's MoEConfig and Traffic hold the same (a test
# keeps them equal; this module does not import moe_model, which imports torch).
ROUTER, CAPACITY_FACTOR, ZIPF_S, HOT_SHARE = "softmax-topk", 1.25, 1.2, 0.5


@dataclasses.dataclass(frozen=True)
class Defaults:
    preset: str
    tokens: str  # what `aisp bench run` sweeps
    script_tokens: str  # what a level script run alone measures
    repeats: int  # timed calls per row, when they fit the time budget
    time_budget_s: float  # how long one row's timed calls may take (fewer repeats past it, never under 5)
    warmup: int
    threads: int | None = None  # torch's intra-op threads (torch.set_num_threads); None leaves PyTorch's choice


# Per device type: what a bare `aisp bench run -t moe_journey` or `python levelN_*.py` measures.
DEFAULTS = {
    "cuda": Defaults(preset="journey", tokens="2048,8192,16384,32768", script_tokens="8192", repeats=50,
                     time_budget_s=3.0, warmup=3),
    # The CPU run must finish in about 2 minutes on 2 cores and rank levels 0-6 the same run after run: 128, 512
    # and 1024 tokens, where the GEMMs decide (16 tokens, where per-op overhead does, moved by up to 22% from one
    # run to the next; two runs of these sizes agreed within 6% at 512 and 1024 but for one slow row, and within
    # 11-19% at 128). One thread: with two, OpenMP's barriers wait on any thread the OS lends to other work, and a
    # busy machine timed level 4 at 128 tokens 100x slower (456 ms against 4 ms on one thread). NOTES.md, "CPU
    # journey", has more.
    "cpu": Defaults(preset="small", tokens="128,512,1024", script_tokens="256", repeats=300, time_budget_s=1.5,
                    warmup=2, threads=1),
}


# --preset's help, for `aisp bench run` and every level script. The rule is in words before the example: at 80
# columns the help's column cuts the example short.
PRESET_HELP = ("preset name(s), comma-separated; an inline shape, key=value pairs joined by commas (hidden, "
               "intermediate, experts and top_k; shared_experts, dtype and seed if wanted), e.g. "
               "hidden=768,intermediate=1536,experts=16,top_k=4; or a TOML file with those keys (default: "
               f"{DEFAULTS['cuda'].preset} on a GPU, {DEFAULTS['cpu'].preset} on the CPU)")


def parse_levels(spec: str | None, available: list[str], on_request: tuple[str, ...] = ("ep",)) -> list[str]:
    """Level keys from `0-10`, `0,4,9,peer,peer-fp8`, ...; the default (or `all`) is every single-GPU level and
    every peer. Levels in `on_request` (ep: several processes) run only when named."""
    if spec is None or spec == "all":
        return list(available)
    available = [*available, *on_request]
    chosen = []
    for part in spec.split(","):
        part = part.strip()
        if "-" in part and all(p.strip().isdigit() for p in part.split("-", 1)):
            low, high = (int(p) for p in part.split("-", 1))
            if low > high:
                raise UsageError(f"level range {part!r} runs backwards")
            chosen += [str(n) for n in range(low, high + 1)]
        else:
            chosen.append(part)
    unknown = [level for level in chosen if level not in available]
    if unknown:
        raise UsageError(f"unknown level {unknown[0]!r}; available: {', '.join(available)}")
    return list(dict.fromkeys(chosen))


MAX_COUNT = 2**31 - 1  # past it no tensor the lab indexes with int32 could hold one row per count


def parse_counts(spec: str, option: str) -> list[int]:
    """Positive whole numbers separated by commas (--tokens, --world-size), duplicates dropped."""
    try:
        counts = [int(part) for part in spec.split(",")]
    except ValueError:
        raise UsageError(f"{option} takes whole numbers separated by commas, got {spec!r}") from None
    if any(count <= 0 for count in counts):
        raise UsageError(f"{option} values must be positive, got {spec!r}")
    if any(count > MAX_COUNT for count in counts):
        raise UsageError(f"{option} values must be at most {MAX_COUNT}, got {spec!r}")
    return list(dict.fromkeys(counts))


def parse_world_sizes(spec: str, option: str) -> list[int]:
    """Level ep's world sizes: positive whole numbers, each dividing the largest, since at each size the largest's
    ranks run as groups of that size, every GPU busy (ep_benchmark.world_groups)."""
    sizes = parse_counts(spec, option)
    if any(max(sizes) % size for size in sizes):
        raise UsageError(f"{option} {spec}: each size must divide the largest, {max(sizes)}")
    return sizes


def timing(warmup: int | None, repeats: int | None, defaults: Defaults) -> tuple[int, int]:
    """--warmup and --repeats as asked, the device's defaults where not, checked."""
    warmup = warmup if warmup is not None else defaults.warmup
    repeats = repeats if repeats is not None else defaults.repeats
    if warmup < 0 or repeats < 1:
        raise UsageError(f"--warmup must be ≥ 0 and --repeats ≥ 1, got --warmup {warmup} --repeats {repeats}")
    return warmup, repeats


# A preset's keys as the user writes them (inline or in TOML) → MoEConfig's fields.
SHAPE_KEYS = {"hidden": "hidden", "intermediate": "intermediate", "experts": "num_experts",
              "num_experts": "num_experts", "top_k": "top_k", "dtype": "dtype", "seed": "seed", "name": "name",
              "shared_experts": "num_shared_experts"}


def config_from_mapping(values: dict, source: str):
    """A MoEConfig from the user's keys; its errors name the keys the user wrote (`experts`, not
    `num_experts`)."""
    from moe_model import ConfigError, MoEConfig

    fields, written_as = {}, {}
    for key, value in values.items():
        if key not in SHAPE_KEYS:
            raise UsageError(f"{source}: unknown key {key!r}; use {', '.join(sorted(SHAPE_KEYS))}")
        if SHAPE_KEYS[key] in fields:
            raise UsageError(f"{source}: {written_as[SHAPE_KEYS[key]]!r} and {key!r} both set the same field")
        fields[SHAPE_KEYS[key]] = value
        written_as[SHAPE_KEYS[key]] = key
    missing = [key for key in ("hidden", "intermediate", "experts", "top_k") if SHAPE_KEYS[key] not in fields]
    if missing:
        raise UsageError(f"{source}: missing {', '.join(missing)}")
    fields.setdefault("name", "custom-H{hidden}-I{intermediate}-E{num_experts}-K{top_k}".format(**fields))
    try:
        return MoEConfig(**fields)
    except ConfigError as error:
        renamed = {field: key for field, key in written_as.items() if field != key}
        message = re.sub(r"\b(" + "|".join(renamed) + r")\b", lambda m: renamed[m.group(1)], str(error)) \
            if renamed else str(error)
        raise UsageError(f"{source}: {message}") from None


def parse_inline_shape(spec: str) -> dict:
    values = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            raise UsageError(f"inline shape {spec!r}: expected key=value, got {part!r}")
        if key in values:
            raise UsageError(f"inline shape {spec!r}: {key!r} is given twice")
        values[key] = int(value) if value.lstrip("-").isdigit() else value
    return values


def parse_presets(spec: str) -> list:
    """Preset names (comma-separated), an inline shape `hidden=768,intermediate=1536,experts=16,top_k=4`, or a
    TOML file with those keys."""
    from moe_model import get_preset

    if spec.endswith(".toml") or Path(spec).is_file():
        try:
            values = tomllib.loads(Path(spec).read_text())
        except OSError as error:
            raise UsageError(f"cannot read preset file {spec!r}: {error.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise UsageError(f"preset file {spec!r} is not valid TOML: {error}") from None
        return [config_from_mapping(values, spec)]
    if "=" in spec:
        return [config_from_mapping(parse_inline_shape(spec), "inline shape")]
    return [get_preset(name) for name in dict.fromkeys(name.strip() for name in spec.split(","))]


def configs_for(preset_spec: str, router: str, capacity_factor: float) -> list:
    """The presets with the router applied; the switch router is top-1, so its presets run with top_k=1."""
    return [dataclasses.replace(config, router=router, capacity_factor=capacity_factor,
                                top_k=1 if router == "switch" else config.top_k)
            for config in parse_presets(preset_spec)]


def parse_traffics(spec: str, zipf_s: float, hot_share: float) -> list:
    from moe_model import Traffic

    return [Traffic(shape, zipf_s=zipf_s, hot_share=hot_share)
            for shape in dict.fromkeys(shape.strip() for shape in spec.split(","))]


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors in the CLI's words: one line on stderr (no usage block), exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def script_parser(prog: str, lesson: str, tokens_help: str = "token counts") -> argparse.ArgumentParser:
    """The options every level script shares with `aisp bench run` (the expert-parallel one included), in its
    words and with its defaults; `--help` prints the level's lesson first, refilled to the screen's width as `aisp
    lab show` prints it. `script_cases` reads them back."""
    from cli.lab import reflowed

    gpu, cpu = DEFAULTS["cuda"], DEFAULTS["cpu"]
    lesson = "\n".join(reflowed(lesson, shutil.get_terminal_size().columns))
    parser = OneLineParser(prog=prog, description=lesson, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help=PRESET_HELP)
    parser.add_argument("--tokens", help=f"{tokens_help}, comma-separated (default: {gpu.script_tokens} on a GPU, "
                                         f"{cpu.script_tokens} on the CPU)")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--traffic", default="uniform", help="traffic shape(s), comma-separated: uniform, zipf, hot")
    parser.add_argument("--zipf-s", type=float, default=ZIPF_S)
    parser.add_argument("--hot-share", type=float, default=HOT_SHARE)
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed calls before each of a row's two turns of timed calls (default: "
                             f"{gpu.warmup} on a GPU, {cpu.warmup} on the CPU)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed calls to aim for, over both turns (on a GPU do_bench times for that many of the "
                             f"warm-up's calls, so its count varies; fewer when slow) "
                             f"(default: {gpu.repeats} on a GPU, {cpu.repeats} on the CPU)")
    parser.add_argument("--debug", action="store_true", help="a crash raises with its full traceback")
    return parser


@dataclasses.dataclass(frozen=True)
class ScriptCases:
    """What a level script's shared options ask for, checked: the timing, the token counts and the traffic."""

    defaults: Defaults
    warmup: int
    repeats: int
    token_counts: list[int]
    traffics: list


def use_threads(defaults: Defaults) -> None:
    """Give torch the device's thread count, where the defaults set one (after the request has been checked)."""
    if defaults.threads:
        import torch

        torch.set_num_threads(defaults.threads)


def script_cases(args, device_type: str) -> ScriptCases:
    """The shared options of `script_parser` read back for this device (its defaults where none is given);
    raises UsageError or ConfigError as `aisp bench run` would. `--debug` is set for the rest of the process."""
    if args.debug:
        os.environ[DEBUG_ENV] = "1"
    defaults = DEFAULTS[device_type]
    warmup, repeats = timing(args.warmup, args.repeats, defaults)
    return ScriptCases(defaults, warmup, repeats, parse_counts(args.tokens or defaults.script_tokens, "--tokens"),
                       parse_traffics(args.traffic, args.zipf_s, args.hot_share))


def refuse(prog: str, error: Exception, quiet: bool = False) -> NoReturn:
    """A level script's bad input: one line on stderr (none from `quiet`, another rank says it), exit code 2;
    under --debug, the traceback instead."""
    if debugging():
        raise error
    if not quiet:
        print(f"{prog}: error: {error}", file=sys.stderr)
    sys.exit(2)
