"""Fused softmax KL / generalized JSD / symmetric KL (and total variation distance, its own
kernel ``tvd_fwd_kernel``) in Triton: one program per row, gradients in the forward.

The loss and gradients per row (KL, generalized JSD, symmetric KL) and the kernel contract
are stated once in ``cex_kernels/ops/_divergence.py``; names here follow it (z = s / T,
z' = t / T, ls, lt, p, q, lm, Kt, Ks, F, R).

Reverse KL is beta == 0 with the inputs swapped (done by the caller). The row weight w
(mask x T² x batchmean divisor) multiplies the loss, and w / T the gradients; rows with
w == 0 are never read (their gradients are written as zeros).

The log-softmax is taken around the raw row max m = max x, before scaling by 1/T:
ls = (s - m_s) / T - log sum exp((s - m_s) / T) (and lt alike), so small T, large constant
offsets and logits near the float maximum lose nothing; the online max rescales the
running sum by exp((m_old - m_new) / T). JSD vs KL is decided by the launcher on the
Python (double) beta, which also takes log beta and log(1 - beta) in double; symmetric vs
KL on the fp32 beta (a 0 weight must not multiply an infinite R).
NaN rule: a kept row whose loss is NaN (a NaN logit, or +inf giving inf - inf) gets NaN in
every entry of each requested gradient (tl.maximum and 0 log 0 = 0 would otherwise let
some entries, e.g. where q = 0, stay finite).

The program streams its row in BLOCK_V chunks: pass 1 keeps an online max and sum of exp
for both rows (one exp per element each), pass 2 sums the loss terms (and writes the
student gradient when that is all that is asked for in KL mode), pass 3 writes the
gradients that need the row total. Passes 2 and 3 re-read the row, which for V <= 256k
bf16 (512 KiB per row pair) mostly hits L2 when a few rows per SM are in flight.
FLOPs per element: ~2 exp (pass 1) + 2 exp and ~8 ops (pass 2), + a log1p/exp pair per
pass for JSD (symmetric: one more exp in pass 2). Minimal bytes: read both logits once (2 N V itemsize), write each requested
gradient once (N V itemsize) and 4 N bytes of row losses; the kernel is bandwidth-bound.
Configs are chosen to compile spill-free on sm_80/sm_90 for N = 4096..16384 rows,
V = 32k..152k (Llama 3, Qwen 2) in bf16.
"""
from __future__ import annotations

import math
import struct
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from cex_kernels.triton._common import AUTOTUNE, aot_spec, on_device

class RowConfig(NamedTuple):
    """One launch configuration of :func:`softmax_kl_fwd_kernel`: each program streams its
    row in chunks of ``block_v`` entries, with ``num_warps`` warps."""
    block_v: int
    num_warps: int

    def triton_config(self) -> "triton.Config":
        return triton.Config({"BLOCK_V": self.block_v}, num_warps=self.num_warps)


# 4..16 elements per thread per live tensor, so the JSD pass (seven live chunk tensors; the
# symmetric pass has fewer) stays in registers. Autotuned on V.
CONFIGS = [RowConfig(block_v=1024, num_warps=4), RowConfig(block_v=2048, num_warps=8),
           RowConfig(block_v=4096, num_warps=16)]
# Under the interpreter (CPU tests) a small chunk, so short rows still loop; long rows
# (V > 4096) take big chunks to keep the interpreted loop short.
INTERPRETER_CONFIG = RowConfig(block_v=64, num_warps=1)
INTERPRETER_LONG_ROW_BLOCK_V = 2048


@triton.jit
def _row_stats(x_ptr, stride_v, V, inv_t, BLOCK_V: tl.constexpr):
    """The row's raw max m and log sum exp(inv_t (x - m)), with an online max (one exp per
    element): its log-softmax is inv_t (x - m) - log_sum. A NaN makes log_sum NaN."""
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    acc = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = tl.load(x_ptr + cols * stride_v, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: nothing to add
        acc = acc * tl.exp((m - m_safe) * inv_t) + tl.sum(tl.exp((x - m_safe) * inv_t), axis=0)
        m = m_new
    return m, tl.log(acc)


@triton.jit
def _log_softmax(x_ptr, cols, mask, stride_v, m, log_sum, inv_t):
    """inv_t (x - m) - log_sum for a chunk; masked lanes read -inf (probability 0)."""
    x = tl.load(x_ptr + cols * stride_v, mask=mask, other=float("-inf")).to(tl.float32)
    return (x - m) * inv_t - log_sum


@triton.jit
def _fill_row(g_ptr, V, value, BLOCK_V: tl.constexpr):
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        tl.store(g_ptr + cols, tl.full((BLOCK_V,), value, tl.float32).to(g_ptr.dtype.element_ty),
                 mask=cols < V)


@triton.jit
def _this_row(s_ptr, t_ptr, gs_ptr, gt_ptr, stride_sm, stride_tm, stride_gsm, stride_gtm):
    """This program's row and the four row pointers moved to it (64-bit offsets: N * V may
    exceed 2^31)."""
    row = tl.program_id(0).to(tl.int64)
    return (row, s_ptr + row * stride_sm, t_ptr + row * stride_tm, gs_ptr + row * stride_gsm,
            gt_ptr + row * stride_gtm)


@triton.jit
def _fill_gradients(gs_ptr, gt_ptr, V, value, WRITE_GS: tl.constexpr, WRITE_GT: tl.constexpr,
                    BLOCK_V: tl.constexpr):
    """Each requested gradient row set to ``value`` (0 for a dropped row, NaN for a NaN loss)."""
    if WRITE_GS:
        _fill_row(gs_ptr, V, value, BLOCK_V)
    if WRITE_GT:
        _fill_row(gt_ptr, V, value, BLOCK_V)


@triton.jit
def _log_mixture(ls, lt, log_b, log_1mb):
    a = lt + log_b
    b = ls + log_1mb
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    return tl.where(hi == float("-inf"), hi, hi + tl.log(1.0 + tl.exp(lo - hi)))


@triton.jit
def softmax_kl_fwd_kernel(
    s_ptr, t_ptr, w_ptr, loss_ptr, gs_ptr, gt_ptr,
    V, stride_sm, stride_sv, stride_tm, stride_tv, stride_gsm, stride_gtm,
    inv_t, beta, log_b, log_1mb,
    IS_JSD: tl.constexpr, IS_SYM: tl.constexpr, WRITE_GS: tl.constexpr,
    WRITE_GT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row, s_ptr, t_ptr, gs_ptr, gt_ptr = _this_row(s_ptr, t_ptr, gs_ptr, gt_ptr, stride_sm,
                                                  stride_tm, stride_gsm, stride_gtm)
    offs = tl.arange(0, BLOCK_V)
    w = tl.load(w_ptr + row)
    if w == 0.0:  # dropped row: write zeros, read nothing
        tl.store(loss_ptr + row, 0.0)
        _fill_gradients(gs_ptr, gt_ptr, V, 0.0, WRITE_GS, WRITE_GT, BLOCK_V)
    else:
        ms, cs = _row_stats(s_ptr, stride_sv, V, inv_t, BLOCK_V)
        mt, ct = _row_stats(t_ptr, stride_tv, V, inv_t, BLOCK_V)
        g_scale = w * inv_t
        acc_t = tl.zeros((BLOCK_V,), tl.float32)
        acc_s = tl.zeros((BLOCK_V,), tl.float32)
        FUSE_GS: tl.constexpr = WRITE_GS and not WRITE_GT and not IS_JSD and not IS_SYM
        # Pass 2: loss terms (masked lanes load -inf: p = q = 0, so their terms are 0).
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            ls = _log_softmax(s_ptr, cols, mask, stride_sv, ms, cs, inv_t)
            lt = _log_softmax(t_ptr, cols, mask, stride_tv, mt, ct, inv_t)
            q = tl.exp(lt)
            if IS_JSD:
                p = tl.exp(ls)
                lm = _log_mixture(ls, lt, log_b, log_1mb)
                acc_t += tl.where(q == 0.0, 0.0, q * (lt - lm))
                acc_s += tl.where(p == 0.0, 0.0, p * (ls - lm))
            elif IS_SYM:  # acc_t: F's terms, acc_s: R's
                p = tl.exp(ls)
                acc_t += tl.where(q == 0.0, 0.0, q * (lt - ls))
                acc_s += tl.where(p == 0.0, 0.0, p * (ls - lt))
            else:
                acc_t += tl.where(q == 0.0, 0.0, q * (lt - ls))
                if FUSE_GS:
                    g = (tl.exp(ls) - q) * g_scale
                    tl.store(gs_ptr + cols, g.to(gs_ptr.dtype.element_ty), mask=mask)
        kt = tl.sum(acc_t, axis=0)
        if IS_JSD:
            ks = tl.sum(acc_s, axis=0)
            loss = beta * kt + (1.0 - beta) * ks
        elif IS_SYM:
            ks = tl.sum(acc_s, axis=0)
            loss = (1.0 - beta) * kt + beta * ks
        else:
            ks = kt
            loss = kt
        tl.store(loss_ptr + row, w * loss)
        if loss != loss:  # the NaN rule: the whole row of each gradient is NaN
            _fill_gradients(gs_ptr, gt_ptr, V, float("nan"), WRITE_GS, WRITE_GT, BLOCK_V)
        # Pass 3: the gradients that need the row totals.
        elif (WRITE_GS and not FUSE_GS) or WRITE_GT:
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                mask = cols < V
                ls = _log_softmax(s_ptr, cols, mask, stride_sv, ms, cs, inv_t)
                lt = _log_softmax(t_ptr, cols, mask, stride_tv, mt, ct, inv_t)
                p = tl.exp(ls)
                q = tl.exp(lt)
                if IS_JSD:
                    lm = _log_mixture(ls, lt, log_b, log_1mb)
                    if WRITE_GS:
                        gs = tl.where(p == 0.0, 0.0, p * (ls - lm - ks)) * ((1.0 - beta) * g_scale)
                        tl.store(gs_ptr + cols, gs.to(gs_ptr.dtype.element_ty), mask=mask)
                    if WRITE_GT:
                        gt = tl.where(q == 0.0, 0.0, q * (lt - lm - kt)) * (beta * g_scale)
                        tl.store(gt_ptr + cols, gt.to(gt_ptr.dtype.element_ty), mask=mask)
                elif IS_SYM:  # kt = F, ks = R
                    if WRITE_GS:
                        rev = tl.where(p == 0.0, 0.0, p * (ls - lt - ks))
                        gs = ((1.0 - beta) * (p - q) + beta * rev) * g_scale
                        tl.store(gs_ptr + cols, gs.to(gs_ptr.dtype.element_ty), mask=mask)
                    if WRITE_GT:
                        fwd = tl.where(q == 0.0, 0.0, q * (lt - ls - kt))
                        gt = ((1.0 - beta) * fwd + beta * (q - p)) * g_scale
                        tl.store(gt_ptr + cols, gt.to(gt_ptr.dtype.element_ty), mask=mask)
                else:
                    if WRITE_GS:
                        tl.store(gs_ptr + cols, ((p - q) * g_scale).to(gs_ptr.dtype.element_ty),
                                 mask=mask)
                    if WRITE_GT:
                        gt = tl.where(q == 0.0, 0.0, q * (lt - ls - loss)) * g_scale
                        tl.store(gt_ptr + cols, gt.to(gt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def tvd_fwd_kernel(
    s_ptr, t_ptr, w_ptr, loss_ptr, gs_ptr, gt_ptr,
    V, stride_sm, stride_sv, stride_tm, stride_tv, stride_gsm, stride_gtm, inv_t,
    WRITE_GS: tl.constexpr, WRITE_GT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Total variation distance of one row (one program per row), with p, q as above and
    sg = sign(p - q) (0 where equal):

        L = 1/2 sum |p - q|,   Sp = sum p sg,   Sq = sum q sg
        dL/dz = 1/2 p (sg - Sp),   dL/dz' = 1/2 q (Sq - sg)

    (the softmax Jacobian applied to dL/dp = sg / 2, the subgradient 0 at p == q). L is in
    [0, 1] and |dL/dz| <= 1. Same passes, row weight, dropped rows and NaN rule as
    softmax_kl_fwd_kernel: pass 1 the two rows' statistics, pass 2 the three sums, pass 3
    the gradients (which need Sp, Sq).
    FLOPs per element: 2 exp (pass 1) + 2 exp and ~8 ops (pass 2) + 2 exp and ~6 ops
    (pass 3). Minimal bytes: read both logits once (2 N V itemsize), write each requested
    gradient once (N V itemsize) and 4 N bytes of row losses: bandwidth-bound.
    """
    row, s_ptr, t_ptr, gs_ptr, gt_ptr = _this_row(s_ptr, t_ptr, gs_ptr, gt_ptr, stride_sm,
                                                  stride_tm, stride_gsm, stride_gtm)
    offs = tl.arange(0, BLOCK_V)
    w = tl.load(w_ptr + row)
    if w == 0.0:  # dropped row: write zeros, read nothing
        tl.store(loss_ptr + row, 0.0)
        _fill_gradients(gs_ptr, gt_ptr, V, 0.0, WRITE_GS, WRITE_GT, BLOCK_V)
    else:
        # Park w in the row's loss slot and read it back after pass 2: kept live across
        # the passes it was spilled to the stack by ptxas (Triton 3.6/3.7, sm_80/sm_90).
        tl.store(loss_ptr + row, w)
        ms, cs = _row_stats(s_ptr, stride_sv, V, inv_t, BLOCK_V)
        mt, ct = _row_stats(t_ptr, stride_tv, V, inv_t, BLOCK_V)
        acc_abs = tl.zeros((BLOCK_V,), tl.float32)
        acc_sp = tl.zeros((BLOCK_V,), tl.float32)
        acc_sq = tl.zeros((BLOCK_V,), tl.float32)
        # Pass 2 (masked lanes load -inf: p = q = 0, so their terms are 0).
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            p = tl.exp(_log_softmax(s_ptr, cols, mask, stride_sv, ms, cs, inv_t))
            q = tl.exp(_log_softmax(t_ptr, cols, mask, stride_tv, mt, ct, inv_t))
            sg = tl.where(p > q, 1.0, tl.where(p < q, -1.0, 0.0))
            acc_abs += tl.abs(p - q)
            acc_sp += p * sg
            acc_sq += q * sg
        loss = 0.5 * tl.sum(acc_abs, axis=0)
        w = tl.load(loss_ptr + row, volatile=True)
        tl.store(loss_ptr + row, w * loss)
        if loss != loss:  # the NaN rule: the whole row of each gradient is NaN
            _fill_gradients(gs_ptr, gt_ptr, V, float("nan"), WRITE_GS, WRITE_GT, BLOCK_V)
        elif WRITE_GS or WRITE_GT:  # Pass 3
            sp = tl.sum(acc_sp, axis=0)
            sq = tl.sum(acc_sq, axis=0)
            half_scale = 0.5 * w * inv_t
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                mask = cols < V
                p = tl.exp(_log_softmax(s_ptr, cols, mask, stride_sv, ms, cs, inv_t))
                q = tl.exp(_log_softmax(t_ptr, cols, mask, stride_tv, mt, ct, inv_t))
                sg = tl.where(p > q, 1.0, tl.where(p < q, -1.0, 0.0))
                if WRITE_GS:
                    gs = p * (sg - sp) * half_scale
                    tl.store(gs_ptr + cols, gs.to(gs_ptr.dtype.element_ty), mask=mask)
                if WRITE_GT:
                    gt = q * (sq - sg) * half_scale
                    tl.store(gt_ptr + cols, gt.to(gt_ptr.dtype.element_ty), mask=mask)


softmax_kl_fwd_tuned = triton.autotune(
    configs=[c.triton_config() for c in CONFIGS],
    key=["V", "IS_JSD", "IS_SYM", "WRITE_GS", "WRITE_GT"],
)(softmax_kl_fwd_kernel)
tvd_fwd_tuned = triton.autotune(
    configs=[c.triton_config() for c in CONFIGS],
    key=["V", "WRITE_GS", "WRITE_GT"],
)(tvd_fwd_kernel)


def _launch(kernel, tuned, student, teacher, row_weight, grad_student, grad_teacher,
            scalars, flags, config, autotune):
    """Allocate the outputs and launch ``kernel`` (or its autotuned ``tuned``) with one
    program per row: the row-kernel arguments, then ``scalars``, then ``flags``."""
    n_rows, V = student.shape
    device = student.device
    gs = torch.empty((n_rows, V) if grad_student else (0,), dtype=student.dtype, device=device)
    gt = torch.empty((n_rows, V) if grad_teacher else (0,), dtype=teacher.dtype, device=device)
    row_loss = torch.zeros((n_rows,), dtype=torch.float32, device=device)
    if n_rows == 0 or V == 0:
        return row_loss, gs, gt
    weight = row_weight.to(torch.float32).contiguous()
    args = (student, teacher, weight, row_loss, gs if grad_student else student,
            gt if grad_teacher else teacher, V, *student.stride(), *teacher.stride(),
            V if grad_student else 0, V if grad_teacher else 0, *scalars)
    flags = dict(flags, WRITE_GS=grad_student, WRITE_GT=grad_teacher)
    if autotune is None:
        autotune = AUTOTUNE and device.type != "cpu"  # no autotuning under the interpreter
    if config is None and not autotune:
        if device.type == "cpu":
            config = INTERPRETER_CONFIG
            if V > 4096:
                config = config._replace(block_v=INTERPRETER_LONG_ROW_BLOCK_V)
        else:
            config = CONFIGS[0]
    with on_device(device):
        if config is not None:
            config = RowConfig(*config)
            kernel[(n_rows,)](*args, **flags, BLOCK_V=config.block_v,
                              num_warps=config.num_warps)
        else:
            tuned[(n_rows,)](*args, **flags)
    return row_loss, gs, gt


def softmax_kl_fwd(student: torch.Tensor, teacher: torch.Tensor, row_weight: torch.Tensor,
                   inv_temperature: float, beta: float, symmetric: bool, grad_student: bool,
                   grad_teacher: bool, *, config=None, autotune=None):
    """Launch one program per row. 2-D logits of one dtype, any strides; ``beta`` in [0, 1),
    ``symmetric`` selects the symmetric KL over the generalized JSD.

    By default a GPU autotunes over CONFIGS (or takes the first with CEX_TRITON_AUTOTUNE=0)
    and the interpreter runs INTERPRETER_CONFIG; ``config`` (a :class:`RowConfig`, or a
    ``(block_v, num_warps)`` tuple) forces one on any device, as the tests do to check every
    GPU config; ``autotune=True`` forces the autotuner (the tests give it a stand-in timer
    under the interpreter).

    Returns ``(row_loss float32 (N,), grad_student, grad_teacher)``, the gradients
    contiguous in the logits' dtype or empty.
    """
    # Decided in double: a beta that rounds to 0 in fp32 (< 1.4e-45) is still a JSD; a
    # symmetric one is the forward KL (its 0 weight must not multiply an infinite R).
    is_jsd = not symmetric and beta > 0.0
    is_sym = bool(symmetric) and struct.unpack("f", struct.pack("f", beta))[0] > 0.0
    log_b = math.log(beta) if is_jsd else 0.0
    log_1mb = math.log1p(-beta) if is_jsd else 0.0
    return _launch(softmax_kl_fwd_kernel, softmax_kl_fwd_tuned, student, teacher, row_weight,
                   grad_student, grad_teacher,
                   (float(inv_temperature), float(beta), log_b, log_1mb),
                   dict(IS_JSD=is_jsd, IS_SYM=is_sym), config, autotune)


def tvd_fwd(student: torch.Tensor, teacher: torch.Tensor, row_weight: torch.Tensor,
            inv_temperature: float, grad_student: bool, grad_teacher: bool, *, config=None,
            autotune=None):
    """The total-variation row kernel (``tvd_fwd_kernel``), launched as
    :func:`softmax_kl_fwd` (same inputs without beta, same returns and options)."""
    return _launch(tvd_fwd_kernel, tvd_fwd_tuned, student, teacher, row_weight, grad_student,
                   grad_teacher, (float(inv_temperature),), {}, config, autotune)


# Ahead-of-time compile specs: every config, for each dtype and each mode, with both
# gradients written (the most registers), specialized as the JIT specializes the common
# case (unit inner strides, 16-divisible pointers and sizes), plus one generic variant per
# dtype and mode (odd strides and V).
_INT_ARGS = ("V", "stride_sm", "stride_tm", "stride_gsm", "stride_gtm")


MODES = {"kl": dict(IS_JSD=False, IS_SYM=False), "jsd": dict(IS_JSD=True, IS_SYM=False),
         "sym": dict(IS_JSD=False, IS_SYM=True)}


def _aot_spec(dtype, mode, config: RowConfig, aligned):
    block_v, warps = config
    types = {"s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "w_ptr": "*fp32", "loss_ptr": "*fp32",
             "gs_ptr": f"*{dtype}", "gt_ptr": f"*{dtype}", "inv_t": "fp32"}
    if mode == "tvd":
        kernel, name, constexprs = tvd_fwd_kernel, "tvd_fwd", {}
    else:
        kernel, name, constexprs = softmax_kl_fwd_kernel, "softmax_kl_fwd", MODES[mode]
        types.update({"beta": "fp32", "log_b": "fp32", "log_1mb": "fp32"})
    constexprs = {**constexprs, "WRITE_GS": True, "WRITE_GT": True, "BLOCK_V": block_v}
    divisible = ()
    if aligned:
        constexprs.update({"stride_sv": 1, "stride_tv": 1})
        divisible = ("s_ptr", "t_ptr", "w_ptr", "loss_ptr", "gs_ptr", "gt_ptr") + _INT_ARGS
    return aot_spec(kernel, f"{name}[{dtype}/{mode},{block_v},w{warps}"
                            f"{'' if aligned else ',generic'}]", types, constexprs, divisible,
                    num_warps=warps, num_stages=1)


def aot_specs():
    specs = []
    for dtype in ("fp32", "fp16", "bf16"):
        for mode in (*MODES, "tvd"):
            specs += [_aot_spec(dtype, mode, cfg, aligned=True) for cfg in CONFIGS]
            specs.append(_aot_spec(dtype, mode, CONFIGS[0], aligned=False))
    return specs
