"""Level 2: fused activation. Level 1, with SiLU·up done by one Triton kernel (`moe_kernels.silu_mul`).

The idea
    `F.silu(gate) * up` is two kernels and a temporary: silu reads gate [T, K, I] and writes a temporary, the
    multiply reads the temporary and up and writes the hidden activation. Five passes over a [T, K, I] tensor.
    One Triton kernel reads gate and up once and writes the result once: three passes, no temporary. This is the
    first kernel of the lab's own (`moe_kernels.py`), and the simplest kind: elementwise, memory-bound, fused.

Why it should be faster than level 1
    It saves two passes over [T, K, I] = 2·T·K·I·2 bytes (bf16): at 2048 tokens on `journey` about 34 MB, some
    11 µs at 3 TB/s. Count it against what level 1 moves: each gathered weight copy is T·K·H·I·2 bytes, 16 GiB
    at the same size. The fusion is real but invisible here: it removes 0.002 of the bytes. Fusing what is not
    the bottleneck does not pay, and the table shows it (on an H100, 35.0 ms before and after). The kernel comes
    back in every later level, where the GEMMs shrink to their true size and the activation's share grows.

What it costs
    A Triton dependency, and a kernel to keep correct. Without a GPU it runs in Triton's interpreter (slowly).

Shared experts (if the config has any) run after the einsums as a separate dense MLP: not fused.

Run: python labs/moe_optimization_journey/level2_fused.py [--preset journey] [--tokens 2048] [--device cuda]
"""

from level1_batched import BatchedLevel
from moe_benchmark import Claims, run_level_script

from moe_kernels import silu_mul


class FusedLevel(BatchedLevel):
    level = 2
    name = "fused"
    summary = "level 1 with the Triton fused SiLU·up kernel"
    claims = Claims(launches="(8 + shared_kernels_min, 10 + shared_kernels_max) if T*K*H*I < 2**31 "  # level 1's − 1
                             "else (29 + shared_kernels_min, 32 + shared_kernels_max)", syncs="0",
                    extra_bytes="T*K*(H*I + 2*I + H)*bytes")

    def activation(self, gate_TKI, up_TKI):
        return silu_mul(gate_TKI, up_TKI)  # one kernel: read gate and up once, write hidden once


if __name__ == "__main__":
    run_level_script(FusedLevel)
