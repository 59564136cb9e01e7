"""Fused projected MSE in Triton: ``teacher @ projection`` never leaves registers.

For student S (N, d_s), teacher T (N, d_t) and projection P (d_t, d_s):

    Y = T @ P                      (one BLOCK_M x BLOCK_N tile at a time, fp32 accumulator)
    D = S - Y
    row_partial[j, r] = sum over the columns of tile column j of D[r, :]^2
    grad = grad_scale * D          (only when WRITE_GRAD; the student's gradient)

FLOPs: 2 * N * d_t * d_s for the product, plus about 4 * N * d_s in the epilogue.
Minimal bytes: (N*d_s + N*d_t + d_t*d_s) * itemsize read, N*d_s*itemsize (grad) + 4*N
written. The product dominates for the shapes we target (d_t >= 256), so the kernel is a
GEMM with a fused epilogue and is judged against the cuBLAS rate for the same product.

It is an ordinary tiled GEMM (grouped program order so programs that share teacher rows
run together and hit L2), whose epilogue loads the matching student tile, subtracts,
squares, reduces along the row and writes the scaled gradient. Row sums are written per
column tile (no atomics: deterministic) and summed over the few column tiles afterwards.
The configs target N=16384, d_t=4096, d_s=1024 in bf16 and N=8192, d_t=1024, d_s=256; they
are chosen from the ahead-of-time compile (bench/NOTES.md).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from cex_kernels.triton._common import (AUTOTUNE, aot_spec, dot_input_precision, math_mode,
                                        on_device)

class TileConfig(NamedTuple):
    """One launch configuration of :func:`projected_mse_fwd_kernel`: output tiles of
    ``block_m`` rows x ``block_n`` columns, ``block_k`` steps along d_t, ``group_m`` row
    tiles per group (tiles that share projection columns run together, for L2 reuse), and
    the launch's warps and software-pipeline stages."""
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int

    def meta(self) -> dict:
        """The kernel's block-size constexprs."""
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k,
                "GROUP_M": self.group_m}

    def triton_config(self) -> "triton.Config":
        return triton.Config(self.meta(), num_warps=self.num_warps, num_stages=self.num_stages)


# Every config here compiles without spills for sm_80 and sm_90 with Triton 3.6 and 3.9
# (checked by `cex aot`); the epilogue keeps a student tile beside the accumulator, so
# 128x256 tiles spill (16 B on sm_90 with Triton 3.6) and are out; 256x128 fits (242-255
# registers).
# bf16/fp16 on tensor cores: large tiles for big problems, smaller ones for small d_s or N.
# The first config is the one launched without autotuning (CEX_TRITON_AUTOTUNE=0).
TENSOR_CORE_CONFIGS = [
    TileConfig(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=4),
    TileConfig(block_m=256, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3),
    TileConfig(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=4, num_stages=4),
    TileConfig(block_m=128, block_n=64, block_k=32, group_m=8, num_warps=4, num_stages=4),
    TileConfig(block_m=64, block_n=64, block_k=32, group_m=8, num_warps=4, num_stages=4),
]
# fp32 with TF32 allowed: operands are twice as wide, so shorter K steps and fewer stages.
TF32_CONFIGS = [
    TileConfig(block_m=128, block_n=128, block_k=32, group_m=8, num_warps=8, num_stages=3),
    TileConfig(block_m=128, block_n=64, block_k=32, group_m=8, num_warps=4, num_stages=4),
    TileConfig(block_m=64, block_n=64, block_k=32, group_m=8, num_warps=4, num_stages=4),
]
# Exact fp32 runs on the FMA units: the accumulator and both operands live in registers,
# so tiles are smaller.
FP32_CONFIGS = [
    TileConfig(block_m=128, block_n=64, block_k=32, group_m=8, num_warps=8, num_stages=3),
    TileConfig(block_m=64, block_n=128, block_k=32, group_m=8, num_warps=8, num_stages=3),
    TileConfig(block_m=64, block_n=64, block_k=32, group_m=8, num_warps=4, num_stages=2),
    TileConfig(block_m=32, block_n=64, block_k=32, group_m=8, num_warps=4, num_stages=3),
]
# Under the interpreter (CPU tests) one small config, and no autotuning.
INTERPRETER_CONFIG = TileConfig(block_m=16, block_n=16, block_k=16, group_m=4, num_warps=1,
                                num_stages=1)
MIN_BLOCK_N = min(c.block_n for c in TENSOR_CORE_CONFIGS + TF32_CONFIGS + FP32_CONFIGS
                  + [INTERPRETER_CONFIG])


@triton.jit
def projected_mse_fwd_kernel(
    s_ptr, t_ptr, p_ptr, g_ptr, partial_ptr,
    N, d_t, d_s,
    stride_sm, stride_sn, stride_tm, stride_tk, stride_pk, stride_pn, stride_gm, stride_gn,
    grad_scale,
    WRITE_GRAD: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(N, BLOCK_M)
    num_pid_n = tl.cdiv(d_s, BLOCK_N)
    # Grouped order: GROUP_M row tiles sweep all column tiles before moving on, so the
    # teacher rows they share are read from L2 rather than HBM.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # Move the base pointers to this tile with 64-bit scalar arithmetic (N * stride may
    # exceed 2^31) so that the per-element offsets below stay 32-bit: 64-bit pointer
    # tensors held across pipeline stages cost registers and caused spills.
    row0 = pid_m.to(tl.int64) * BLOCK_M
    s_ptr += row0 * stride_sm
    t_ptr += row0 * stride_tm
    g_ptr += row0 * stride_gm
    rows = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = rows < N - row0
    mask_n = offs_n < d_s
    # Rows past N read row 0 instead of masking every teacher load: their results are
    # discarded by the epilogue masks. Columns are masked instead: clamping them the same
    # way hides from the compiler that P's columns are contiguous, which turned P's loads
    # into scalar loads that could not be pipelined (and spilled).
    rows_in = tl.where(mask_m, rows, 0)
    # When the sizes divide the blocks (the common case) the masks are constant-true and
    # the compiler drops them from the loop.
    if EVEN_N:
        load_n = tl.full((BLOCK_N,), True, tl.int1)
    else:
        load_n = mask_n

    t_ptrs = t_ptr + rows_in[:, None] * stride_tm + offs_k[None, :] * stride_tk
    p_ptrs = p_ptr + offs_k[:, None] * stride_pk + offs_n[None, :] * stride_pn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(d_t, BLOCK_K)):
        if EVEN_K:
            load_k = tl.full((BLOCK_K,), True, tl.int1)
        else:
            load_k = offs_k < d_t - k * BLOCK_K
        t = tl.load(t_ptrs, mask=load_k[None, :], other=0.0)
        p = tl.load(p_ptrs, mask=load_k[:, None] & load_n[None, :], other=0.0)
        acc = tl.dot(t, p, acc, input_precision=INPUT_PRECISION)
        t_ptrs += BLOCK_K * stride_tk
        p_ptrs += BLOCK_K * stride_pk

    # Epilogue: the product tile is still in registers.
    mask = mask_m[:, None] & mask_n[None, :]
    s = tl.load(s_ptr + rows[:, None] * stride_sm + offs_n[None, :] * stride_sn,
                mask=mask, other=0.0).to(tl.float32)
    diff = tl.where(mask, s - acc, 0.0)
    if WRITE_GRAD:
        g = (diff * grad_scale).to(g_ptr.dtype.element_ty)
        tl.store(g_ptr + rows[:, None] * stride_gm + offs_n[None, :] * stride_gn, g, mask=mask)
    row_sq = tl.sum(diff * diff, axis=1)
    tl.store(partial_ptr + pid_n.to(tl.int64) * N + row0 + rows, row_sq, mask=mask_m)


# EVEN_K / EVEN_N follow from the sizes and the block shape the autotuner tries.
_with_even_flags = triton.heuristics({
    "EVEN_K": lambda args: args["d_t"] % args["BLOCK_K"] == 0,
    "EVEN_N": lambda args: args["d_s"] % args["BLOCK_N"] == 0,
})(projected_mse_fwd_kernel)
# One autotuner per math mode, each over that mode's configs.
CONFIGS = {"tensor_core": TENSOR_CORE_CONFIGS, "tf32": TF32_CONFIGS, "fp32": FP32_CONFIGS}
# reset_to_zero: configs with a narrower BLOCK_N write more rows of the per-column-tile
# partial sums than the one finally chosen; without it those rows, left over from the
# benchmark runs, would be added into the first (autotuning) call's loss.
_AUTOTUNED = {mode: triton.autotune(configs=[c.triton_config() for c in configs],
                                    key=["d_t", "d_s"],
                                    reset_to_zero=["partial_ptr"])(_with_even_flags)
              for mode, configs in CONFIGS.items()}


def projected_mse_fwd(student: torch.Tensor, teacher: torch.Tensor, projection: torch.Tensor,
                      grad_scale: float, compute_grad: bool, *, config=None, autotune=None):
    """Launch the fused kernel. 2-D inputs of one dtype, any strides.

    By default a GPU autotunes over the configs of the inputs' math mode (or takes its
    first config with CEX_TRITON_AUTOTUNE=0) and the interpreter runs INTERPRETER_CONFIG.
    ``config`` (a :class:`TileConfig`, or a tuple in its field order) forces one block shape on any device, the
    interpreter included: the tests run every GPU config that way; ``autotune=True`` forces
    the autotuner (the tests give it a stand-in timer under the interpreter).

    Returns ``(row_sq_err float32 (N,), grad (N, d_s) in the student's dtype or empty)``.

    Under the interpreter (CPU tensors) bf16 inputs are computed in fp32: the interpreter's
    bf16 ``tl.dot`` returns garbage (triton issue 11584; fp16 is fine). A GPU never takes
    that branch.
    """
    if student.device.type == "cpu" and student.dtype == torch.bfloat16:
        row_sq_err, grad = projected_mse_fwd(student.float(), teacher.float(), projection.float(),
                                             grad_scale, compute_grad, config=config,
                                             autotune=autotune)
        return row_sq_err, grad.to(student.dtype)
    n_rows, d_s = student.shape
    d_t = teacher.shape[1]
    device = student.device
    grad = (torch.empty((n_rows, d_s), dtype=student.dtype, device=device) if compute_grad
            else torch.empty((0,), dtype=student.dtype, device=device))
    if n_rows == 0 or d_s == 0:
        return torch.zeros((n_rows,), dtype=torch.float32, device=device), grad
    if d_t == 0:  # empty product: Y = 0
        teacher = torch.zeros((n_rows, 1), dtype=student.dtype, device=device)
        projection = torch.zeros((1, d_s), dtype=student.dtype, device=device)
        d_t = 1
    # Sized for the smallest BLOCK_N any config uses; column tiles a config does not have
    # stay zero and add nothing to the sum.
    partial = torch.zeros((triton.cdiv(d_s, MIN_BLOCK_N), n_rows), dtype=torch.float32,
                          device=device)
    g_strides = grad.stride() if compute_grad else (0, 0)
    args = (student, teacher, projection, grad if compute_grad else student, partial,
            n_rows, d_t, d_s, *student.stride(), *teacher.stride(), *projection.stride(),
            *g_strides, float(grad_scale))
    flags = dict(WRITE_GRAD=compute_grad, INPUT_PRECISION=dot_input_precision(student.dtype))
    mode = math_mode(student.dtype)
    if autotune is None:
        autotune = AUTOTUNE and device.type != "cpu"  # no autotuning under the interpreter
    if config is None and not autotune:
        config = INTERPRETER_CONFIG if device.type == "cpu" else CONFIGS[mode][0]

    with on_device(device):
        if config is not None:
            config = TileConfig(*config)
            grid = (triton.cdiv(n_rows, config.block_m) * triton.cdiv(d_s, config.block_n),)
            _with_even_flags[grid](*args, **flags, **config.meta(), num_warps=config.num_warps,
                                   num_stages=config.num_stages)
        else:
            def grid(meta):
                return (triton.cdiv(n_rows, meta["BLOCK_M"]) * triton.cdiv(d_s, meta["BLOCK_N"]),)
            _AUTOTUNED[mode][grid](*args, **flags)
    return partial.sum(0), grad


# Ahead-of-time compile specs: every config of every autotuner, for every dtype and
# precision the op can launch on a GPU, specialized as the JIT specializes the common case
# (unit inner strides become constants; pointers and sizes divisible by 16; sizes that the
# blocks divide). Two more variants per dtype check the other paths compile clean too:
# "tails" (aligned, but sizes the blocks do not divide) and "generic" (odd strides and sizes).
_INNER_STRIDES = ("stride_sn", "stride_tk", "stride_pn", "stride_gn")
_INT_ARGS = ("N", "d_t", "d_s", "stride_sm", "stride_tm", "stride_pk", "stride_gm")


def _aot_spec(dtype, precision, config: TileConfig, layout="aligned"):
    types = {"s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "p_ptr": f"*{dtype}",
             "g_ptr": f"*{dtype}", "partial_ptr": "*fp32", "grad_scale": "fp32"}
    even = layout == "aligned"
    constexprs = {"WRITE_GRAD": True, "INPUT_PRECISION": precision, "EVEN_K": even,
                  "EVEN_N": even, **config.meta()}
    divisible = ()
    if layout != "generic":
        constexprs.update({name: 1 for name in _INNER_STRIDES})
        divisible = ("s_ptr", "t_ptr", "p_ptr", "g_ptr", "partial_ptr") + _INT_ARGS
    return aot_spec(projected_mse_fwd_kernel,
                    f"projected_mse_fwd[{dtype}/{precision},{config.block_m}x{config.block_n}x"
                    f"{config.block_k},w{config.num_warps},s{config.num_stages}"
                    f"{'' if even else ',' + layout}]", types, constexprs, divisible,
                    num_warps=config.num_warps, num_stages=config.num_stages,
                    # TF32 wgmma reads B only K-major, so on sm_90 Triton stages the
                    # row-major projection with 4-byte copies; every other aligned case
                    # must stream both operands in 16-byte copies.
                    vector_loads=layout != "generic" and precision != "tf32",
                    tensor_cores=dtype != "fp32" or precision == "tf32")


def aot_specs():
    specs = []
    variants = [("fp32", "ieee", FP32_CONFIGS), ("fp32", "tf32", TF32_CONFIGS),
                ("fp16", "ieee", TENSOR_CORE_CONFIGS), ("bf16", "ieee", TENSOR_CORE_CONFIGS)]
    for dtype, precision, configs in variants:
        specs += [_aot_spec(dtype, precision, cfg) for cfg in configs]
        specs.append(_aot_spec(dtype, precision, configs[0], "tails"))
        specs.append(_aot_spec(dtype, precision, configs[-1], "generic"))
    return specs
