"""Compiles level 9's and level 10's kernels, level 9's alignment and the combine's sum for Hopper (sm_90) with
Triton's own compiler and its bundled ptxas, on any machine: no GPU is needed to compile, only to run.
test_hopper_compile runs it in a process of its own, because the test process runs Triton in interpreter mode. Each
kernel is compiled with one decode tile and one prefill tile from its autotune list, and with each constexpr branch
that picks other code (the alignment in registers or from the alignment's tensors, the sum over K in the kernel or
apart, consecutive rows or listed ones). Example arguments are CPU tensors: only their types and the descriptors'
boxes reach the compiler.

Prints one line per compiled kernel; exits 3 when this Triton has no API for compiling without a device."""

import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # the GPU code generator, not the interpreter
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

try:
    import triton  # noqa: E402
    from triton.backends.compiler import GPUTarget  # noqa: E402
    from triton.compiler import ASTSource  # noqa: E402
    from triton.runtime.jit import mangle_type  # noqa: E402
except ImportError as missing:
    print(f"this Triton cannot compile without a device here: {missing}")
    sys.exit(3)

import moe_kernels as kernels  # noqa: E402
from moe_kernels import TensorDescriptor  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
E, T, H, I = 8, 64, 1024, 2048  # shapes only set the arguments' types; any will do
P = 1024  # the aligned rows


def compile_for_hopper(kernel, args: dict, constexprs: dict, num_warps: int, num_stages: int) -> None:
    fn = kernel if isinstance(kernel, triton.runtime.JITFunction) else kernel.fn  # an autotuned kernel's JIT one
    signature = {name: "constexpr" if name in constexprs else mangle_type(args[name]) for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=HOPPER,
                              options={"num_warps": num_warps, "num_stages": num_stages})
    shown = ", ".join(f"{name}={value}" for name, value in constexprs.items() if name in SHOWN)
    print(f"{fn.__name__} ({shown}): {len(compiled.asm['cubin'])} bytes of sm_90 code")


SHOWN = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "PAIRS_IN_REGISTERS", "SUM_HERE", "EXPERTS", "CONSECUTIVE")


def descriptor(tensor: torch.Tensor, box: list[int]) -> TensorDescriptor:
    return TensorDescriptor(tensor, list(tensor.shape), list(tensor.stride()), box)


def empty(*shape, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


ids = empty(P, dtype=torch.int32)
routing_ids = empty(T * 2, dtype=torch.int64)
common = dict(GROUP_M=8, NUM_PROGRAMS=132)
# (BLOCK_M, BLOCK_N, BLOCK_D, warps, stages): a decode tile and a prefill tile of the autotune lists
tiles = [(16, 32, 128, 4, 4), (128, 128, 64, 8, 3)]

for BLOCK_M, BLOCK_N, BLOCK_D, warps, stages in tiles:
    for pairs_in_registers in ((0, 16) if BLOCK_M == 16 else (0,)):
        shape = dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, PAIRS_IN_REGISTERS=pairs_in_registers,
                     **common)
        compile_for_hopper(
            kernels._moe_gate_up_persistent_kernel,
            dict(x_ptr=empty(T, H), w_desc=descriptor(empty(E, H, 2 * I), [1, BLOCK_D, 2 * BLOCK_N]),
                 hidden_desc=descriptor(empty(P, I), [BLOCK_M, BLOCK_N]), sorted_pair_ids_ptr=ids,
                 block_expert_ids_ptr=ids, padded_starts_ptr=ids, num_padded_ptr=ids, expert_of_pair_ptr=routing_ids,
                 cols=I, depth=H, num_pairs=2 * T, top_k=2, pairs_bucket=2 * T, stride_xt=H),
            dict(shape, UPCAST=False), warps, stages)
        for sum_here in (False, True):
            compile_for_hopper(
                kernels._moe_down_persistent_kernel,
                dict(hidden_desc=descriptor(empty(P, I), [BLOCK_M, BLOCK_D]),
                     w_desc=descriptor(empty(E, I, H), [1, BLOCK_D, BLOCK_N]), out_ptr=empty(2 * T, H),
                     routing_weights_ptr=empty(2 * T), sorted_pair_ids_ptr=ids, block_expert_ids_ptr=ids,
                     padded_starts_ptr=ids, num_padded_ptr=ids, expert_of_pair_ptr=routing_ids, sum_ptr=empty(T, H),
                     arrivals_ptr=empty(T, H // 16, dtype=torch.int32), slots=2, arrivals_stride=H // 16, cols=H,
                     depth=I, num_pairs=2 * T, pairs_bucket=2 * T, split_k=2, stride_om=H, stride_sm=H),
                dict(shape, UPCAST=False, SUM_HERE=sum_here), warps, stages)
    fp8 = dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=128, **common)
    compile_for_hopper(
        kernels._moe_gate_up_fp8_kernel,
        dict(x_ptr=empty(T, H, dtype=kernels.FP8_DTYPE), x_scales_ptr=empty(T, dtype=torch.float32),
             w_desc=descriptor(empty(E, 2 * I, H, dtype=kernels.FP8_DTYPE), [1, 2 * BLOCK_N, 128]),
             w13_scales_ptr=empty(E, 2 * I, dtype=torch.float32),
             hidden_desc=descriptor(empty(P, I), [BLOCK_M, BLOCK_N]), sorted_pair_ids_ptr=ids,
             block_expert_ids_ptr=ids, padded_starts_ptr=ids, num_padded_ptr=ids, cols=I, depth=H, num_pairs=2 * T,
             top_k=2, pairs_bucket=2 * T, stride_xt=H, stride_se=2 * I),
        dict(fp8, INTERPRETED=False), warps, stages)
    compile_for_hopper(
        kernels._moe_down_fp8_kernel,
        dict(hidden_desc=descriptor(empty(P, I, dtype=kernels.FP8_DTYPE), [BLOCK_M, 128]),
             hidden_scales_ptr=empty(P, dtype=torch.float32),
             w_desc=descriptor(empty(E, H, I, dtype=kernels.FP8_DTYPE), [1, BLOCK_N, 128]),
             w2_scales_ptr=empty(E, H, dtype=torch.float32), out_ptr=empty(2 * T, H), routing_weights_ptr=empty(2 * T),
             sorted_pair_ids_ptr=ids, block_expert_ids_ptr=ids, padded_starts_ptr=ids, num_padded_ptr=ids,
             sum_ptr=empty(T, H), arrivals_ptr=empty(T, H // 16, dtype=torch.int32), slots=2, arrivals_stride=H // 16,
             cols=H, depth=I, num_pairs=2 * T, pairs_bucket=2 * T, stride_se=H, stride_om=H, stride_sm=H),
        dict(fp8, SUM_HERE=BLOCK_M == 16), warps, stages)

# The sum over a token's rows, consecutive (levels 7-10's combine over K) or listed (the EP level).
for consecutive in (True, False):
    compile_for_hopper(kernels._gather_sum_kernel,
                       dict(rows_ptr=empty(2 * T, H), index_ptr=empty(T, 2, dtype=torch.int64), out_ptr=empty(T, H),
                            cols=H, slots=2, stride_r=H, stride_i=2, stride_o=H),
                       dict(ACCUMULATE=False, CONSECUTIVE=consecutive, BLOCK=1024), 4, 1)

# The alignment: level 9's one program (decode), level 7's three (count, offsets, place) and level 9's two (the
# count with the offsets, place);
# deepseek-v3's 257 experts and journey's 8.
for experts in (8, 512):
    alignment = dict(expert_ids_ptr=routing_ids, cursors_ptr=ids, padded_starts_ptr=ids, sorted_pair_ids_ptr=ids,
                     block_expert_ids_ptr=ids, num_padded_ptr=ids, num_pairs=2 * T, num_experts=experts - 1,
                     max_padded=P, num_blocks=P // 16, block_m=16)
    compile_for_hopper(kernels._align_one_program_kernel, alignment,
                       dict(PAIRS=2 * T, EXPERTS=experts, FILL=1024), 8, 1)
    compile_for_hopper(kernels._count_pairs_kernel,
                       dict(expert_ids_ptr=routing_ids, counts_ptr=ids, num_pairs=2 * T, num_experts=experts - 1),
                       dict(BLOCK=1024, EXPERTS=experts), 4, 1)
    for mark_padding in (False, True):
        compile_for_hopper(kernels._place_pairs_kernel,
                           dict(expert_ids_ptr=routing_ids, padded_starts_ptr=ids, cursors_ptr=ids,
                                sorted_pair_ids_ptr=ids, counts_ptr=ids, num_pairs=2 * T, num_experts=experts - 1,
                                block_m=16),
                           dict(BLOCK=512, EXPERTS=experts, MARK_PADDING=mark_padding, MAX_PADDING=16), 8, 1)
    compile_for_hopper(kernels._pad_offsets_kernel,
                       dict(counts_ptr=ids, padded_starts_ptr=ids, block_expert_ids_ptr=ids, num_padded_ptr=ids,
                            num_experts=experts - 1, num_blocks=P // 16, block_m=16),
                       dict(EXPERTS=experts, FILL=1024), 4, 1)
    compile_for_hopper(kernels._count_and_pad_kernel,
                       dict(expert_ids_ptr=routing_ids, counters_ptr=ids, padded_starts_ptr=ids,
                            block_expert_ids_ptr=ids, num_padded_ptr=ids, num_pairs=2 * T, num_experts=experts - 1,
                            num_blocks=P // 16, block_m=16),
                       dict(BLOCK=1024, EXPERTS=experts, FILL=1024), 4, 1)
