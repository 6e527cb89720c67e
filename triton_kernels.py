"""The lab's Triton kernels.

Without a CUDA GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before Triton is imported),
which executes the same kernel code on CPU tensors with NumPy: slow, but it checks the indexing and masking
exactly as the GPU would run them.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_device(*tensors: torch.Tensor) -> None:
    if any(t.device.type == "cpu" for t in tensors) and not interpreting():
        raise RuntimeError("Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 to run on the CPU")


# ---------------------------------------------------------------------------------------------------------------
# Fused SiLU·up: h = silu(gate) * up, elementwise.
#
# In eager PyTorch `F.silu(gate) * up` is two kernels: silu reads gate and writes a temporary, then the multiply
# reads the temporary and up and writes h: 5 passes over a [rows, I] tensor. Fused, it is 3 (read gate, read up,
# write h), and no temporary is allocated. The math runs in fp32 whatever the storage dtype.
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, num_elements, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(axis=0)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    in_bounds = offsets < num_elements  # the last block may hang past the end
    gate = tl.load(gate_ptr + offsets, mask=in_bounds).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=in_bounds).to(tl.float32)
    hidden = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + offsets, hidden.to(out_ptr.dtype.element_ty), mask=in_bounds)


def silu_mul(
    gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None, block_size: int | None = None
) -> torch.Tensor:
    """silu(gate) * up in one pass. `out` may be `gate` itself (in place): each element is read before it is
    written by the same program. `block_size` is for tests that want many blocks on a small tensor."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    _check_device(gate, up)
    if out is None:
        out = torch.empty_like(gate)
    if not (gate.is_contiguous() and up.is_contiguous() and out.is_contiguous()):
        raise ValueError("silu_mul indexes flat memory: gate, up and out must be contiguous")
    num_elements = gate.numel()
    if num_elements == 0:
        return out
    # On the GPU: 8 warps × 32 threads × 4 elements, 8-byte bf16 accesses per thread, coalesced. The interpreter
    # runs programs one after another at a fixed cost each, so there fewer, larger blocks are much faster.
    BLOCK_SIZE = block_size or (2**16 if interpreting() else 1024)
    grid = (triton.cdiv(num_elements, BLOCK_SIZE),)
    _silu_mul_kernel[grid](gate, up, out, num_elements, BLOCK_SIZE=BLOCK_SIZE, num_warps=8)
    return out
