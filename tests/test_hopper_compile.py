"""Level 9's and level 10's kernels, level 9's alignment and the combine's sum, compiled for Hopper (sm_90) without
a GPU: the interpreter checks what the kernels compute, but it runs them as Python, so code that the GPU's compiler
rejects could pass there. hopper_compile.py compiles them with Triton's own compiler and bundled ptxas, in a
process of its own (this one runs Triton in interpreter mode), into an empty cache so that nothing is reused."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNELS = ["_moe_gate_up_persistent_kernel", "_moe_down_persistent_kernel", "_moe_gate_up_fp8_kernel",
           "_moe_down_fp8_kernel", "_align_one_program_kernel", "_count_pairs_kernel", "_pad_offsets_kernel",
           "_place_pairs_kernel", "_gather_sum_kernel"]


def test_kernels_compile_for_hopper(tmp_path):
    worker = Path(__file__).with_name("hopper_compile.py")
    result = subprocess.run([sys.executable, str(worker)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_CACHE_DIR": str(tmp_path)})
    if result.returncode == 3:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = result.stdout.splitlines()
    assert all(any(line.startswith(f"{name} (") for line in compiled) for name in KERNELS), result.stdout
    assert any("PAIRS_IN_REGISTERS=16" in line for line in compiled)  # level 9's alignment in registers
