"""The MoE optimization journey: one level per file (`levelN_*.py`), each runnable alone.

The level files import their base as plain `moe_benchmark`, the way they do when run as scripts from this folder,
so this package puts its folder on the path and loads the levels by file name.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

LAB_DIR = Path(__file__).resolve().parent
if str(LAB_DIR) not in sys.path:
    sys.path.insert(0, str(LAB_DIR))

import moe_benchmark  # noqa: E402


def load_levels() -> dict[str, type[moe_benchmark.MoELevel]]:
    """{"0": Level0Class, ..., "peer": PeerClass} for every levelN_*.py in this folder, in journey order, then the
    peer (peer_*.py: what PyTorch ships, measured beside the levels but not one of them)."""
    levels = {}
    level_files = sorted(LAB_DIR.glob("level[0-9]*_*.py"), key=lambda p: int(p.stem[5:].split("_")[0]))
    for path in [*level_files, *sorted(LAB_DIR.glob("peer_*.py"))]:
        module = importlib.import_module(path.stem)
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, moe_benchmark.MoELevel)
                    and obj.__module__ == module.__name__):
                levels[str(obj.level)] = obj
    return levels


def expert_parallel():
    """The expert-parallel level's module (level_ep_expert_parallel.py): not a `MoELevel`, since it runs as W
    processes under torchrun; `aisp bench run --levels ep` launches it."""
    return importlib.import_module("level_ep_expert_parallel")
