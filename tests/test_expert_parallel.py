"""The expert-parallel level on the CPU: gloo processes under torchrun, against the full-expert reference."""

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import FAST, bench, run_dirs

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("world_size", [2, 4])
def test_ep_matches_the_reference(tmp_path, world_size):
    out = tmp_path / "results.json"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc-per-node={world_size}", str(REPO / "tests" / "ep_worker.py"), str(out)],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    per_rank = json.loads(out.read_text())
    assert len(per_rank) == world_size
    for rank, cases in enumerate(per_rank):
        # The layer in groups of two ranks, sharing the whole world's weights: right on every rank.
        place, rel_err, passed = cases.pop("in_pairs")
        assert place == rank % 2 and passed, (rank, rel_err)
        assert set(cases) == {"uniform", "zipf", "shared_expert_top1", "idle_rank", "few_tokens", "every_expert"}
        for case, result in cases.items():
            assert set(result["checks"]) == {"1", "4"}  # chunk counts
            for chunks, (rel_err, passed) in result["checks"].items():
                assert passed and rel_err < 2e-2, (rank, case, chunks, rel_err)
            # Each token once to each other rank that holds any of its experts, however many it holds there.
            assert result["sent"] == {"1": result["tokens_out"], "4": result["tokens_out"]}, (rank, case)
        # Top-2 of 2·W experts: some tokens have both experts on one other rank, and cross once, not twice.
        assert cases["uniform"]["tokens_out"] < cases["uniform"]["pairs_out"]
        # K = E: every token to every other rank, once, with its two slots there.
        tokens = 37 + 5 * rank
        assert cases["every_expert"]["tokens_out"] == tokens * (world_size - 1)
        assert cases["every_expert"]["pairs_out"] == 2 * tokens * (world_size - 1)
        assert cases["every_expert"]["received"] == sum(37 + 5 * r for r in range(world_size))  # every rank's tokens
    assert per_rank[1]["idle_rank"]["received"] == 0  # rank 1's experts got no rows at all
    assert all(cases["uniform"]["received"] > 0 for cases in per_rank)


def test_cli_runs_ep_on_the_cpu(tmp_path):
    result = bench("run", "-t", "moe_journey", "--levels", "ep", "--world-size", "1,2", "--tokens", "16",
                   "--ep-chunks", "1,2", "--out", str(tmp_path), *FAST)
    assert result.exit_code == 0, result.output
    (run_dir,) = run_dirs(tmp_path)
    rows = [json.loads(line) for line in (run_dir / "rows.jsonl").read_text().splitlines()]
    assert [(r["level"], r["world_size"], r["tokens"], r["experts"]) for r in rows] == [("ep", 1, 16, 4),
                                                                                       ("ep", 2, 32, 8)]
    assert all(r["status"] == "ok" and r["rel_err"] < 2e-2 for r in rows)
    two = rows[1]
    assert two["dispatch_ms"] > 0 and two["compute_ms"] > 0 and two["combine_ms"] > 0 and two["a2a_bytes"] > 0
    assert two["a2a_busbw_gbps"] > 0 and two["allreduce_busbw_gbps"] > 0 and rows[0]["a2a_busbw_gbps"] is None
    # The chunk count chosen from brief timings of the candidates, then the exposed communication before and after.
    assert set(two["chunk_ms"]) == {"1", "2"}
    brief_pick = min((1, 2), key=lambda chunks: two["chunk_ms"][str(chunks)])
    # The full timing decides between the brief timing's pick and one chunk.
    assert two["chunks"] in (brief_pick, 1) and (two["chunks"] == 1) == (two["ms"] == two["ms_c1"])
    assert 0 < two["exposed_comm_ms_c1"] < two["ms_c1"] and 0 < two["exposed_comm_ms"] < two["ms"]
    # The phases come from the rank that computed longest, whom the others wait for under skew.
    assert two["phases_rank"] == "busiest"
    summary = re.sub(" +", " ", (run_dir / "summary.md").read_text())  # the tables' padding squeezed out
    assert "## Expert parallelism (level ep)" in summary and "| tiny | 16 | 2 | 8 |" in summary
    assert "| exposed comm, 1 chunk | exposed comm, chunked |" in summary
    assert "on the busiest rank (the one whose expert compute took longest)" in summary
    assert (run_dir / "expert_parallel.png").exists()


@pytest.mark.parametrize("args, message", [(["--world-size", "0"], "positive"),
                                           (["--world-size", "two"], "whole numbers"),
                                           (["--world-size", "1,3,4"], "must divide the largest"),
                                           (["--ep-chunks", "0"], "positive"),
                                           (["--ep-chunks", "4,many"], "whole numbers")])
def test_bad_ep_option(tmp_path, args, message):
    result = bench("run", "-t", "moe_journey", "--levels", "ep", *args, "--out", str(tmp_path), *FAST)
    assert result.exit_code == 2 and message in result.output


def test_ep_rows_are_recorded_as_the_launch_writes_them(tmp_path, monkeypatch):
    """The progress bar moves case by case, and an interrupted run keeps every finished row: each row the launch
    writes is recorded at the next look, before the launch ends; a case it never finished gets an error row. The
    launch is stubbed: it writes one row per look, then exits."""
    import subprocess

    import torch

    from cli import aisp
    from moe_model import Traffic, get_preset

    events = []

    class Launch:
        def __init__(self, command, **kwargs):
            self.rows_out = Path(command[command.index("--rows-out") + 1])
            self.looks, self.returncode = 0, None

        def poll(self):
            if self.looks < 2:
                with open(self.rows_out, "a") as rows:
                    row = {"world_size": 2, "preset": "tiny", "traffic": "uniform",
                           "tokens_per_rank": 8 * (1 + self.looks)}
                    rows.write(json.dumps(row) + "\n")
                events.append(f"wrote {self.looks}")
                self.looks += 1
                return None
            self.returncode = 1
            return 1

        def wait(self, timeout=None):
            if self.returncode is None:
                raise subprocess.TimeoutExpired("torchrun", timeout)
            return self.returncode

    def record(row):
        events.append(("recorded", row["tokens_per_rank"], row.get("status")))

    monkeypatch.setattr(aisp.subprocess, "Popen", Launch)
    aisp.run_expert_parallel([1, 2], [get_preset("tiny")], [Traffic()], [8, 16, 32], torch.device("cpu"), 1, 5,
                             1.0, "1", tmp_path, record)
    assert events[:4] == ["wrote 0", ("recorded", 8, None), "wrote 1", ("recorded", 16, None)]
    # The (world size, case) pairs the launch never finished: world size 1 of every case, and 32 tokens at 2.
    assert [event[1:] for event in events[4:]] == [(8, "error"), (16, "error"), (32, "error"), (32, "error")]
    assert not list(tmp_path.iterdir())  # the launch's rows file and log are gone


def test_chunk_counts_are_timed_in_turn():
    """The candidates' forwards alternate, each round in an order rotated by one, so that a card heating through
    the timed calls favours no count; the phases come back per count."""
    sys.path.insert(0, str(REPO / "labs" / "moe_optimization_journey"))
    import torch.distributed as dist
    from ep_benchmark import time_forwards

    class Layer:  # records the order of its forwards; one compute span each, as a layer without shared experts
        config = type("Config", (), {"num_shared_experts": 0})()

        def __init__(self):
            self.order = []

        def forward(self, *args, chunks, compute_spans=None):
            if compute_spans is not None:
                self.order.append(chunks)
                compute_spans.extend([(0.0, 0.0)] * chunks)

    class Inputs:
        def as_args(self):
            return ()

    with socket.socket() as free:  # a port no other group uses
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        layer = Layer()
        times = time_forwards({chunks: (layer, Inputs(), chunks) for chunks in (1, 2, 4)}, torch.device("cpu"),
                              warmup=1, repeats=6, budget_s=60)
    finally:
        dist.destroy_process_group()
    assert layer.order == [1, 2, 4, 2, 4, 1, 4, 1, 2, 1, 2, 4, 2, 4, 1, 4, 1, 2]
    assert {chunks: len(forwards) for chunks, forwards in times.items()} == {1: 6, 2: 6, 4: 6}
    assert set(times[2][0]) == {"ms", "busy_ms", "exposed_comm_ms", "dispatch_ms", "compute_ms", "combine_ms"}


def test_a_graphed_local_level_runs_eagerly(monkeypatch):
    """On a Hopper GPU the local experts are level 9's, whose forward replays a graph recorded for one T; the rows a
    rank receives change every forward, so the level calls its eager path. Here level 9 in Triton's interpreter, in
    a group of one, against the reference, in one chunk and in two."""
    sys.path.insert(0, str(REPO / "labs" / "moe_optimization_journey"))
    import level_ep_expert_parallel
    import torch.distributed as dist
    from level7_triton_grouped import TritonGroupedLevel
    from level9_persistent_tma import PersistentTmaLevel
    from moe_benchmark import compare_to_reference, make_inputs

    from moe_model import MoEConfig, init_weights, reference_forward

    monkeypatch.setattr(level_ep_expert_parallel, "local_level_class", lambda device: PersistentTmaLevel)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        config = MoEConfig(hidden=64, intermediate=96, num_experts=4, top_k=2, name="ep")
        layer = level_ep_expert_parallel.ExpertParallelMoE(config, torch.device("cpu"))
        assert layer.local_forward.__func__ is TritonGroupedLevel.forward  # level 9's kernels, no graph
        inputs = make_inputs(config, layer.weights, 37, seed=5)
        ref_TH = reference_forward(inputs.tokens_TH, init_weights(config, "cpu"), inputs.routing_weights_TK,
                                   inputs.expert_ids_TK)
        for chunks in (1, 2):
            check = compare_to_reference(layer.forward(*inputs.as_args(), chunks=chunks), ref_TH, config.tolerance)
            assert check.passed, (chunks, check.message)
    finally:
        dist.destroy_process_group()
