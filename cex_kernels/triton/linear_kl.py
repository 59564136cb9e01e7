"""Vocabulary-tiled linear + KL in Triton: the (N, V) logits never exist, not even in chunks.

For student hidden states h (N, H), output layer W (V, H) (+ bias b), teacher logits t (N, V),
temperature T and student logits z = h Wᵀ + b, each row's loss needs only a handful of
running statistics, so the kernels keep those and recompute logit tiles instead of storing
them (the Cut Cross-Entropy idea, extended to a teacher distribution):

* ``linear_kl_stats_kernel`` (grid: row blocks x vocabulary splits) computes one
  BLOCK_M x BLOCK_V logit tile at a time on the tensor cores and folds it into online
  statistics per row, all taken around the raw (unscaled) row maxima m_s = max z and
  m_t = max t, so nothing is ever scaled by 1/T before its max is subtracted (small T,
  large constant offsets): ``l_s = sum e^((z-m_s)/T)`` (and at T = 1 for the hard-label
  cross-entropy), ``l_t = sum e^((t-m_t)/T)``, and the cross terms on raw differences
  ``Xf = sum e^((t-m_t)/T) (t - z)`` and ``Xr = sum e^((z-m_s)/T) (z - t)``. The few
  splits are merged with log-sum-exp algebra on the host side (O(N) work). Then
  ``KL(q || p) = (Xf / l_t - (m_t - m_s)) / T - log l_t + log l_s`` and
  ``KL(p || q) = (Xr / l_s - (m_s - m_t)) / T - log l_s + log l_t``.
* ``linear_kl_grad_kernel`` (grid: row blocks x vocabulary tiles) recomputes its tile,
  forms ``g = dL/dlogits`` with ``log p = (z - m_s)/T - log l_s`` (log q alike):
  ``w/T (p - q)`` forward, ``w/T p (log p - log q - KL)`` reverse, and for the symmetric
  KL ``(1-beta) KL(q || p) + beta KL(p || q)`` their weighted sum, with the reverse KL as
  KL (its value is both KLs weighted alike, from the same statistics), plus
  ``w_ce (softmax(z) - onehot)``; it adds ``g W`` into d hidden and
  ``gᵀ h`` into d weight with fp32 atomics (so the summation order, and the last bits,
  vary between runs).

FLOPs: 2 N V H (stats) + 2 N V H (recomputed tile) + 4 N V H (d hidden, d weight) =
8 N V H, against 6 N V H for a materializing implementation: the price of O(N) memory.
Minimal bytes: read h, W and t once (t dominates: N V itemsize), write d hidden and
d weight. Extra memory: fp32 d hidden/d weight accumulators and 9 floats per row per
split. Supported here: teacher given as logits, forward, reverse or symmetric KL, optional
hard-label cross-entropy; the generalized JSD and teacher-as-hidden-states use the chunked
algorithm.
Block shapes are fixed per dtype (spill-free for sm_80/sm_90, not yet tuned on a GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from cex_kernels.triton._common import aot_spec, dot_input_precision, math_mode, on_device

# (BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages) per kernel, math mode and alignment
# (aligned: sizes and row strides divisible by 16, as the JIT specializes them). Each one
# compiles without spills for sm_80 and sm_90 with Triton 3.6 to 3.9 (`cex aot`); the
# stats kernel keeps three online reductions beside its logit tile, hence the small tiles.
# Aligned configs have 64-row blocks, the least wgmma (Hopper's tensor-core instruction)
# takes; 32-row blocks run on the older mma.sync. The unaligned ones keep 32 rows: 64
# spill there.
STATS_CONFIG = {
    ("tensor_core", True): (64, 64, 64, 8, 3), ("tensor_core", False): (32, 64, 64, 8, 2),
    ("tf32", True): (64, 64, 32, 8, 2), ("tf32", False): (32, 64, 32, 8, 2),
    ("fp32", True): (16, 64, 32, 4, 2), ("fp32", False): (32, 64, 32, 8, 1),
}
GRAD_CONFIG = {
    ("tensor_core", True): (128, 64, 32, 8, 2), ("tensor_core", False): (64, 64, 32, 8, 2),
    ("tf32", True): (64, 64, 32, 8, 1), ("tf32", False): (64, 64, 32, 8, 2),
    ("fp32", True): (32, 64, 32, 8, 1), ("fp32", False): (32, 64, 32, 8, 1),
}
INTERPRETER_CONFIG = (16, 16, 16, 1, 1)
N_STATS = 9  # m_s, l_s, x_r, m_t, l_t, x_f, m_1, l_1, picked


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, col_mask, H,
                 stride_hm, stride_hk, stride_wv, stride_wk, HAS_BIAS: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """z = h[rows] @ W[tile]ᵀ (+ b[tile]) in fp32, for the BLOCK_V vocabulary entries that
    w_ptr and b_ptr point at (moved there with 64-bit arithmetic by the caller: V x H can
    exceed 2^31); h_ptr points at the block's row 0."""
    offs_v = tl.arange(0, BLOCK_V)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + offs_k
        h = tl.load(h_ptr + rows[:, None] * stride_hm + kk[None, :] * stride_hk,
                    mask=row_mask[:, None] & (kk[None, :] < H), other=0.0)
        w = tl.load(w_ptr + offs_v[None, :] * stride_wv + kk[:, None] * stride_wk,
                    mask=col_mask[None, :] & (kk[:, None] < H), other=0.0)
        acc = tl.dot(h, w, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _online_update(m, l, x, z, other, inv_t):
    """Fold a tile of raw logits into (max, sum e^((z-max)/T), sum e^((z-max)/T) (z - other))
    per row: the max is subtracted before the scaling, and the cross term is on raw
    differences, so it never needs rescaling beyond the weights'.

    0 · anything = 0 (a zero-probability entry adds nothing, even against -inf), but a
    probable entry against -inf adds +inf, as the divergence says.
    """
    m_new = tl.maximum(m, tl.max(z, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp((m - m_safe) * inv_t)
    e = tl.exp((z - m_safe[:, None]) * inv_t)
    l = l * alpha + tl.sum(e, axis=1)
    x = x * alpha + tl.sum(tl.where(e > 0, e * (z - other), 0.0), axis=1)
    return m_new, l, x


@triton.jit
def linear_kl_stats_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, label_ptr, stats_ptr,
    N, V, H, v_per_split,
    stride_hm, stride_hk, stride_wv, stride_wk, stride_tm, stride_tv,
    inv_t,
    HAS_BIAS: tl.constexpr, NEED_CE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    row0 = pid_m.to(tl.int64) * BLOCK_M  # 64-bit base offsets; per-element offsets stay 32-bit
    h_ptr += row0 * stride_hm
    t_ptr += row0 * stride_tm
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < N - row0
    v_lo = split * v_per_split
    v_hi = tl.minimum(V, v_lo + v_per_split)
    neg_inf = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    zero = tl.zeros((BLOCK_M,), tl.float32)
    m_s, l_s, x_r = neg_inf, zero, zero
    m_t, l_t, x_f = neg_inf, zero, zero
    m_1, l_1, picked = neg_inf, zero, zero
    label = tl.full((BLOCK_M,), -1, tl.int64)
    if NEED_CE:
        label = tl.load(label_ptr + row0 + rows, mask=row_mask, other=-1).to(tl.int64)
    # The current tile's rows of W (and entries of b), advanced tile by tile from a 64-bit
    # base: V x H can exceed 2^31, the per-tile offsets cannot.
    w_tile = w_ptr + split.to(tl.int64) * v_per_split * stride_wv
    b_tile = b_ptr + v_lo
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_hi
        z = _logits_tile(h_ptr, w_tile, b_tile, rows, row_mask, col_mask, H, stride_hm,
                         stride_hk, stride_wv, stride_wk, HAS_BIAS, INPUT_PRECISION, BLOCK_M,
                         BLOCK_V, BLOCK_K)
        w_tile += BLOCK_V * stride_wv
        b_tile += BLOCK_V
        s = tl.where(col_mask[None, :], z, float("-inf"))  # raw: scaled only after max-subtraction
        t = tl.load(t_ptr + rows[:, None] * stride_tm + cols[None, :] * stride_tv,
                    mask=row_mask[:, None] & col_mask[None, :], other=float("-inf"))
        t = t.to(tl.float32)
        m_s, l_s, x_r = _online_update(m_s, l_s, x_r, s, t, inv_t)
        m_t, l_t, x_f = _online_update(m_t, l_t, x_f, t, s, inv_t)
        if NEED_CE:
            m_1, l_1, _unused = _online_update(m_1, l_1, zero, s, s, 1.0)
            picked += tl.sum(tl.where(cols[None, :] == label[:, None], z, 0.0), axis=1)
    # stats layout (splits, N_STATS, N), fp32
    out = stats_ptr + split.to(tl.int64) * 9 * N + row0 + rows
    tl.store(out, m_s, mask=row_mask)
    tl.store(out + N, l_s, mask=row_mask)
    tl.store(out + 2 * N, x_r, mask=row_mask)
    tl.store(out + 3 * N, m_t, mask=row_mask)
    tl.store(out + 4 * N, l_t, mask=row_mask)
    tl.store(out + 5 * N, x_f, mask=row_mask)
    tl.store(out + 6 * N, m_1, mask=row_mask)
    tl.store(out + 7 * N, l_1, mask=row_mask)
    tl.store(out + 8 * N, picked, mask=row_mask)


@triton.jit
def linear_kl_grad_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, label_ptr, row_ptr, dh_ptr, dw_ptr, db_ptr,
    N, V, H,
    stride_hm, stride_hk, stride_wv, stride_wk, stride_tm, stride_tv,
    inv_t, beta,
    REVERSE: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr,
    NEED_CE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """g = dL/dlogits for one tile, then d hidden += g W and d weight += gᵀ h (fp32 atomics).

    row_ptr: (8, N) fp32 per-row values: the raw maxima m_s, m_t and log l_s, log l_t (so
    log p = (z - m_s)/T - log l_s), the reverse KL, lse at T = 1, the KD weight
    (mask x T² x divisor x upstream) and the CE weight. ``beta``: the reverse KL's weight
    in the symmetric KL (read only when SYMMETRIC).
    """
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    row0 = pid_m.to(tl.int64) * BLOCK_M
    h_ptr += row0 * stride_hm
    t_ptr += row0 * stride_tm
    dh_ptr += row0 * H
    # This program's vocabulary tile, as a 64-bit base (V x H can exceed 2^31) plus 32-bit
    # offsets within the tile.
    col0 = pid_v * BLOCK_V
    w_ptr += col0.to(tl.int64) * stride_wv
    dw_ptr += col0.to(tl.int64) * H
    offs_v = tl.arange(0, BLOCK_V)
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < N - row0
    cols = col0 + offs_v
    col_mask = cols < V
    tile_mask = row_mask[:, None] & col_mask[None, :]

    z = _logits_tile(h_ptr, w_ptr, b_ptr + col0, rows, row_mask, col_mask, H, stride_hm,
                     stride_hk, stride_wv, stride_wk, HAS_BIAS, INPUT_PRECISION, BLOCK_M,
                     BLOCK_V, BLOCK_K)
    r = row_ptr + row0 + rows
    m_s = tl.load(r, mask=row_mask, other=0.0)
    log_l_s = tl.load(r + N, mask=row_mask, other=0.0)
    m_t = tl.load(r + 2 * N, mask=row_mask, other=0.0)
    log_l_t = tl.load(r + 3 * N, mask=row_mask, other=0.0)
    kd_w = tl.load(r + 6 * N, mask=row_mask, other=0.0)
    t = tl.load(t_ptr + rows[:, None] * stride_tm + cols[None, :] * stride_tv,
                mask=tile_mask, other=float("-inf")).to(tl.float32)
    log_p = (z - m_s[:, None]) * inv_t - log_l_s[:, None]
    log_q = (t - m_t[:, None]) * inv_t - log_l_t[:, None]
    p = tl.exp(log_p)
    if SYMMETRIC:  # (1 - beta) (p - q) + beta p (log p - log q - KL(p || q))
        kl_r = tl.load(r + 4 * N, mask=row_mask, other=0.0)
        g = tl.where(p > 0, p * (log_p - log_q - kl_r[:, None]), 0.0)
        g = (1.0 - beta) * (p - tl.exp(log_q)) + beta * g
    elif REVERSE:  # d/ds of sum p (log p - log q): p (log p - log q - KL)
        kl_r = tl.load(r + 4 * N, mask=row_mask, other=0.0)
        g = tl.where(p > 0, p * (log_p - log_q - kl_r[:, None]), 0.0)
    else:  # d/ds of sum q (log q - log p): p - q
        g = p - tl.exp(log_q)
    # Dropped rows (weight 0) contribute exactly nothing, even where their logits are odd.
    g = tl.where(kd_w[:, None] != 0, g * (kd_w * inv_t)[:, None], 0.0)
    if NEED_CE:
        lse_1 = tl.load(r + 5 * N, mask=row_mask, other=0.0)
        ce_w = tl.load(r + 7 * N, mask=row_mask, other=0.0)
        label = tl.load(label_ptr + row0 + rows, mask=row_mask, other=-1)
        onehot = tl.where(cols[None, :] == label[:, None], 1.0, 0.0)
        g += tl.where(ce_w[:, None] != 0, ce_w[:, None] * (tl.exp(z - lse_1[:, None]) - onehot), 0.0)
    g = tl.where(tile_mask, g, 0.0)
    g_in = g.to(h_ptr.dtype.element_ty)  # tensor-core operand, as the logits would be

    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < H
        w = tl.load(w_ptr + offs_v[:, None] * stride_wv + kk[None, :] * stride_wk,
                    mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        tl.atomic_add(dh_ptr + rows[:, None] * H + kk[None, :],
                      tl.dot(g_in, w, input_precision=INPUT_PRECISION),
                      mask=row_mask[:, None] & k_mask[None, :])
        h = tl.load(h_ptr + rows[:, None] * stride_hm + kk[None, :] * stride_hk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        tl.atomic_add(dw_ptr + offs_v[:, None] * H + kk[None, :],
                      tl.dot(tl.trans(g_in), h, input_precision=INPUT_PRECISION),
                      mask=col_mask[:, None] & k_mask[None, :])
    if HAS_BIAS:
        tl.atomic_add(db_ptr + cols, tl.sum(g, axis=0), mask=col_mask)


def _config(table, tensors, sizes):
    """The block shape for these inputs: by math mode and by 16-alignment."""
    first = tensors[0]
    if first.device.type == "cpu":
        return INTERPRETER_CONFIG
    aligned = (all(x % 16 == 0 for x in sizes)
               and all(t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 for t in tensors))
    return table[(math_mode(first.dtype), aligned)]


def _merge(m, l, x, inv_t):
    """Combine per-split (raw max, sum e^((z-max)/T), cross) statistics of shape (splits, N)."""
    m_all = m.max(dim=0).values
    m_safe = torch.where(torch.isinf(m_all) & (m_all < 0), torch.zeros_like(m_all), m_all)
    scale = torch.exp((m - m_safe) * inv_t)
    return m_all, (l * scale).sum(0), (torch.where(scale > 0, x * scale, 0.0)).sum(0)


def linear_kl_tiled(hidden, weight, bias, teacher_logits, labels, kd_weight, ce_weight,
                    temperature: float, reverse: bool, want_grad: bool, *,
                    symmetric_beta=None, stats_config=None, grad_config=None, splits=None,
                    parts=False):
    """Row losses (fp32) and, when ``want_grad``, d hidden / d weight / d bias (fp32).
    With ``parts`` the row losses come as two tensors, the divergence's and the
    cross-entropy's (each times its row weight), instead of their sum. ``symmetric_beta``
    in (0, 1): the symmetric KL ``(1-beta) KL(q || p) + beta KL(p || q)`` (``reverse`` is
    then ignored).

    2-D inputs of one dtype (fp32/fp16/bf16) with unit stride along their last dimension
    (the kernels are compiled for that layout); ``kd_weight``/``ce_weight`` (N,) fp32 row
    weights (``ce_weight`` None: no hard-label term); ``labels`` int64 (N,) or None.
    ``stats_config`` / ``grad_config`` force a block shape (a tuple as in STATS_CONFIG /
    GRAD_CONFIG) on any device, the interpreter included, as the tests do to check every
    GPU config; by default the tables pick one by math mode and alignment. ``splits``
    forces the number of vocabulary splits (by default enough programs to fill a GPU twice;
    2 under the interpreter).

    Under the interpreter (CPU tensors) bf16 inputs are computed in fp32: the interpreter's
    bf16 ``tl.dot`` returns garbage (triton issue 11584; fp16 is fine). The outputs are fp32
    either way; a GPU never takes that branch.
    """
    if hidden.device.type == "cpu" and hidden.dtype == torch.bfloat16:
        hidden, weight, teacher_logits = hidden.float(), weight.float(), teacher_logits.float()
        bias = bias.float() if bias is not None else None
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    inv_t = 1.0 / temperature
    need_ce = ce_weight is not None
    labels_arg = labels if need_ce else kd_weight  # unread when not need_ce
    bias_arg = bias if bias is not None else kd_weight
    precision = dot_input_precision(hidden.dtype)
    common = dict(HAS_BIAS=bias is not None, NEED_CE=need_ce, INPUT_PRECISION=precision)

    layout = ((hidden, weight, teacher_logits), (n_rows, vocab, hidden_size))
    bm, bv, bk, warps, stages = stats_config or _config(STATS_CONFIG, *layout)
    row_blocks = triton.cdiv(n_rows, bm)
    if splits is None and device.type == "cuda":  # enough programs to fill the GPU twice
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = triton.cdiv(2 * sms, row_blocks)
    elif splits is None:
        splits = 2  # exercise the merge under the interpreter
    splits = max(1, min(splits, triton.cdiv(vocab, bv)))
    v_per_split = triton.cdiv(triton.cdiv(vocab, splits), bv) * bv
    splits = triton.cdiv(vocab, v_per_split)
    stats = torch.empty((splits, N_STATS, n_rows), dtype=torch.float32, device=device)
    strides = (*hidden.stride(), *weight.stride(), *teacher_logits.stride())
    with on_device(device):
        linear_kl_stats_kernel[(row_blocks, splits)](
            hidden, weight, bias_arg, teacher_logits, labels_arg, stats, n_rows, vocab,
            hidden_size, v_per_split, *strides, inv_t, **common, BLOCK_M=bm, BLOCK_V=bv,
            BLOCK_K=bk, num_warps=warps, num_stages=stages)

    m_s, l_s, x_r = _merge(stats[:, 0], stats[:, 1], stats[:, 2], inv_t)
    m_t, l_t, x_f = _merge(stats[:, 3], stats[:, 4], stats[:, 5], inv_t)
    log_l_s, log_l_t = torch.log(l_s), torch.log(l_t)
    # Raw differences first, scaled once: no lse of scaled logits cancels against another.
    symmetric = symmetric_beta is not None
    kl_r = (x_r / l_s - (m_s - m_t)) * inv_t - log_l_s + log_l_t
    kl_f = (x_f / l_t - (m_t - m_s)) * inv_t - log_l_t + log_l_s
    if symmetric:
        kl = (1.0 - symmetric_beta) * kl_f + symmetric_beta * kl_r
    else:
        kl = kl_r if reverse else kl_f
    kept = kd_weight != 0
    kd_rows = torch.where(kept, kd_weight * kl, torch.zeros_like(kl))
    ce_rows = torch.zeros_like(kl)
    lse_1 = torch.zeros_like(kl)
    if need_ce:
        m_1, l_1, _ = _merge(stats[:, 6], stats[:, 7], torch.zeros_like(stats[:, 7]), 1.0)
        lse_1 = m_1 + torch.log(l_1)
        ce = lse_1 - stats[:, 8].sum(0)
        ce_rows = torch.where(ce_weight != 0, ce_weight * ce, torch.zeros_like(ce))
    rows = (kd_rows, ce_rows) if parts else (kd_rows + ce_rows,)
    if not want_grad:
        return (*rows, None, None, None)

    row_values = torch.stack([m_s, log_l_s, m_t, log_l_t, kl_r if symmetric else kl, lse_1,
                              kd_weight.float(),
                              ce_weight.float() if need_ce else torch.zeros_like(kl)])
    d_hidden = torch.zeros((n_rows, hidden_size), dtype=torch.float32, device=device)
    d_weight = torch.zeros((vocab, hidden_size), dtype=torch.float32, device=device)
    d_bias = torch.zeros((vocab,), dtype=torch.float32, device=device) if bias is not None else d_weight
    bm, bv, bk, warps, stages = grad_config or _config(GRAD_CONFIG, *layout)
    with on_device(device):
        linear_kl_grad_kernel[(triton.cdiv(n_rows, bm), triton.cdiv(vocab, bv))](
            hidden, weight, bias_arg, teacher_logits, labels_arg, row_values, d_hidden,
            d_weight, d_bias, n_rows, vocab, hidden_size, *strides, inv_t,
            float(symmetric_beta or 0.0), REVERSE=reverse and not symmetric, SYMMETRIC=symmetric,
            **common, BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return (*rows, d_hidden, d_weight, d_bias if bias is not None else None)


# Ahead-of-time compile specs (``python -m cex_kernels.triton.aot``): each kernel in each
# dtype with the config the launcher uses, specialized as the JIT specializes the inputs
# the op passes (unit inner strides: ``linear_kl`` makes them so), with 16-divisible
# pointers and sizes, plus a variant without divisibility (odd sizes).
_INNER_STRIDES = ("stride_hk", "stride_wk", "stride_tv")


def _aot_spec(kernel, name, dtype, config, constexprs, aligned):
    bm, bv, bk, warps, stages = config
    types = {"h_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}",
             "t_ptr": f"*{dtype}", "label_ptr": "*i64", "inv_t": "fp32", "beta": "fp32",
             **{ptr: "*fp32" for ptr in ("stats_ptr", "row_ptr", "dh_ptr", "dw_ptr", "db_ptr")}}
    label = ",".join(f"{k}={v}" for k, v in constexprs.items()
                     if k in ("REVERSE", "SYMMETRIC", "HAS_BIAS", "NEED_CE",
                              "INPUT_PRECISION"))
    constexprs = dict(constexprs, BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk,
                      **{s: 1 for s in _INNER_STRIDES})
    divisible = ()
    if aligned:
        divisible = [n for n in kernel.arg_names if n.endswith("_ptr") or n in
                     ("N", "V", "H", "v_per_split", "stride_hm", "stride_wv", "stride_tm")]
    return aot_spec(kernel, f"{name}[{dtype},{label},{bm}x{bv}x{bk},w{warps}"
                            f"{'' if aligned else ',unaligned'}]", types, constexprs, divisible,
                    num_warps=warps, num_stages=stages,
                    vector_loads=aligned and constexprs["INPUT_PRECISION"] != "tf32",
                    # wgmma needs 64-row blocks, which spill on the unaligned (masked) path.
                    tensor_cores=aligned and (dtype != "fp32"
                                              or constexprs["INPUT_PRECISION"] == "tf32"))


def aot_specs():
    specs = []
    for dtype, precision, kind in (("fp32", "ieee", "fp32"), ("fp32", "tf32", "tf32"),
                                   ("bf16", "ieee", "tensor_core"), ("fp16", "ieee", "tensor_core")):
        flags = dict(HAS_BIAS=True, NEED_CE=True, INPUT_PRECISION=precision)
        for aligned in (True, False):
            specs.append(_aot_spec(linear_kl_stats_kernel, "linear_kl_stats", dtype,
                                   STATS_CONFIG[(kind, aligned)], flags, aligned))
            for reverse, symmetric in ((False, False), (True, False), (False, True)):
                specs.append(_aot_spec(linear_kl_grad_kernel, "linear_kl_grad", dtype,
                                       GRAD_CONFIG[(kind, aligned)],
                                       dict(flags, REVERSE=reverse, SYMMETRIC=symmetric),
                                       aligned))
    return specs
