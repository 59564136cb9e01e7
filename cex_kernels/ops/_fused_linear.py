"""The fused-linear losses' shared machinery: the chunked driver, generic over any row loss,
and the autograd glue of every fused-linear op.

A fused-linear loss computes ``rowloss(hidden @ weight.T + bias, teacher)`` without
materializing the student's (N, V) logits. The chunked driver (custom op
``cex::linear_loss_chunked``) takes rows in chunks sized from a memory budget; for each
chunk it forms the student logits (and the teacher's, when the teacher is given as hidden
states + head, or as a top-k pair), hands them to a **row loss**, which returns the
per-row losses and the gradient with respect to the student logits, and turns that into
``d hidden = d logits @ weight`` and ``d weight += d logitsᵀ @ hidden`` before the next
chunk. Peak extra memory is ``O(chunk x V)`` plus the gradients themselves, independent of N.

A new loss plugs in by registering a :class:`RowLoss` (a name, the backend row kernel, and
its eager formula): the chunking, the hard-label cross-entropy, the masks, the reductions,
fp16's storage scale, double backward and torch.compile come from here (as a new loss is a
small subclass of Liger's fused-linear distillation base). ``linear_kl`` registers "kl"
(the KL family of ``ops/_divergence.py``), ``linear_tvd`` registers "tvd".

Gradient-in-forward (rules in ``ops/_autograd.py``): with a reduced loss the forward pass
produces the gradients for a unit upstream gradient and backward scales them.
``reduction="none"`` cannot pre-sum ``d weight`` without the per-row upstream gradient, so
there the forward pass computes only the loss and backward runs the op again with the
upstream gradient folded into the row weights.

The fused-linear ops share their leading arguments (``PREFIX``), so one autograd glue serves
them all: ``(hidden, weight, bias, teacher, kd_weight, ce_weight, labels, out_scale,
soft_weight, hard_weight, temperature, beta, symmetric, reduction, compute_grad,
want_parts)``, then each op's own. ``kd_weight``/``ce_weight`` (N,) carry the row mask, T²,
the reduction's divisor (or fp16's storage scale) and, in backward for reduction="none",
the upstream gradient. Each op returns ``(loss, kd, ce, d hidden, d weight, d bias)``: the
loss ``soft_weight·kd + hard_weight·ce`` and its two parts (for logging: no gradient flows
through them), reduced, in the accumulation dtype, and the gradients for a unit upstream
gradient (internal; empty unless ``compute_grad`` and the loss is reduced; d weight and
d bias in fp32 for fp16 inputs, see ``_autograd``).
"""
# No `from __future__ import annotations` here: torch 2.6 cannot infer a custom op's
# schema from string annotations.
import contextlib
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from cex_kernels import _backends, _checks
from cex_kernels.ops import _divergence
from cex_kernels.ops._autograd import (as_constant, create_graph_requested, eager_gradients,
                                       save_tensors, saved_tensors, scale_saved,
                                       under_functorch_differentiation)

TEACHER_KINDS = ("logits", "hidden", "top_k")
DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024  # chunk budget on GPUs and for 16-bit CPU inputs
# fp32/fp64 on the CPU: a smaller buffer, reused by more chunks, is touched for the first
# time (page faults) less, and its d weight is summed in place by the GEMM (beta = 1):
# fwd+bwd 1.06-1.11x faster than with 256 MiB at N=1024/2048 H=256 V=32000, even at
# N=1024 H=512 V=50257 (2-core EPYC, 2026-12-02). 16-bit inputs keep 256 MiB: their
# per-chunk d weight is a separate product summed in fp32, and 64 MiB ran bf16 1.2x slower.
CPU_WIDE_CHUNK_BYTES = 64 * 1024 * 1024


def check_chunk_bytes(op: str, chunk_bytes) -> Optional[int]:
    """``chunk_bytes`` checked: None (the default budget) or a positive int."""
    return None if chunk_bytes is None else _checks.check_int(op, "chunk_bytes", chunk_bytes,
                                                                low=1)


def default_chunk_bytes(hidden: Tensor) -> int:
    """The chunk budget when the caller gives none (``chunk_bytes=None``)."""
    if hidden.device.type == "cpu" and hidden.element_size() >= 4:
        return CPU_WIDE_CHUNK_BYTES
    return DEFAULT_CHUNK_BYTES


class RowLoss(NamedTuple):
    """A row loss the chunked driver can run.

    ``rows(backend, student, teacher, row_weight, temperature, beta, symmetric, want_grad,
    grad_out=None) -> (row_loss, grad_student)``: 2-D logits of one chunk; ``row_loss[r] =
    w[r]·L_r`` and ``grad_student = w[r]/T · dL_r/dz`` (empty when not ``want_grad``), the
    row-kernel contract of ``ops/_divergence.py``. ``grad_out`` is the student logits
    themselves, which the driver no longer needs: a backend that can (``grad_into_logits``)
    writes the gradient over them; others ignore it.
    ``eager(student, teacher, temperature, beta, symmetric) -> L (rows,)``: the same loss
    in differentiable eager PyTorch (double backward).
    """
    rows: Callable
    eager: Callable


ROW_LOSSES = {}


def register_row_loss(name: str, rows: Callable, eager: Callable) -> None:
    ROW_LOSSES[name] = RowLoss(rows, eager)


def chunk_rows(prep: "Prepared", chunk_bytes: Optional[int]) -> int:
    """Rows per chunk: as many as ``chunk_bytes`` (None: :func:`default_chunk_bytes`) of
    per-chunk buffers hold, then evened out over the chunks (no short last chunk: a small
    GEMM is a slow one)."""
    if chunk_bytes is None:
        chunk_bytes = default_chunk_bytes(prep.hidden)
    n_rows, vocab = prep.hidden.shape[0], prep.weight.shape[0]
    itemsize = prep.hidden.element_size()
    # Per row of a chunk: the student logits and, unless the backend writes it over them,
    # their gradient; the teacher's logits when formed per chunk (head or top-k); with
    # hard labels an fp32 softmax (and, for 16-bit logits, their fp32 copy and the summed
    # gradient's); fp16: the gradient's fp32 copy for d weight (see _accumulate_weight_grad).
    over_logits = _backends.get(prep.backend).grad_into_logits
    hard = prep.ce_weight is not None
    per_row = vocab * (itemsize * (1 if over_logits else 2)
                       + (itemsize if prep.teacher_kind != "logits" else 0)
                       + ((4 if itemsize >= 4 else 12) if hard else 0)
                       + (4 if prep.hidden.dtype == torch.float16 else 0))
    most = max(1, min(max(n_rows, 1), chunk_bytes // max(per_row, 1)))
    n_chunks = -(-max(n_rows, 1) // most)
    return -(-max(n_rows, 1) // n_chunks)


def teacher_logits_of(kind: str, teacher: List[Tensor], r0: int, r1: int, vocab: int,
                      out: Optional[Tensor] = None) -> Tensor:
    """Rows [r0, r1) of the teacher's logits: given (``"logits"``: ``[logits]``), computed
    from its head (``"hidden"``: ``[hidden, weight(, bias)]``) or scattered from a top-k
    pair (``"top_k"``: ``[values, indices]``; -inf off the k entries); the last two into
    ``out`` when given."""
    if kind == "logits":
        return teacher[0][r0:r1]
    if kind == "hidden":
        if out is None:
            return torch.nn.functional.linear(teacher[0][r0:r1], *teacher[1:])
        return linear_into(out, teacher[0][r0:r1], *teacher[1:])
    return _divergence.top_k_dense(teacher[0][r0:r1], teacher[1][r0:r1], vocab, out=out)


def rows_buffer(rows: int, vocab: int, like: Tensor) -> Tensor:
    """A (rows, vocab) fresh buffer. When its products go to MKL (fp32 without oneDNN, fp64,
    on the CPU) a view whose rows start 64-byte aligned (row stride rounded up to a cache
    line): MKL writes an odd-width product (V = 50257) into it up to ~1.3x faster than into
    contiguous rows (fp32, 1024 x 512 x 50257 on the 2-core EPYC, 2026-12-02), and the row
    kernels and the GEMMs that read it take the row stride as it is. Contiguous otherwise:
    oneDNN (fp32 through :func:`_backends.matmul_into`, and 16-bit dtypes inside torch.mm)
    would copy a row-strided operand first; GPUs not measured."""
    padded = (like.device.type == "cpu" and like.element_size() >= 4
              and not (like.dtype == torch.float32 and _backends.onednn_fp32_matmul()))
    if not padded:
        return _backends.empty_for_writing((rows, vocab), like)
    per_line = 64 // like.element_size()
    stride = -(-vocab // per_line) * per_line
    return _backends.empty_for_writing((rows, stride), like)[:, :vocab]


def linear_into(out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)`` written into ``out`` (rows of a reused buffer)."""
    if bias is None:
        return _backends.matmul_into(out, x, weight.T)
    return torch.addmm(bias, x, weight.T, out=out)


def check_labels(op: str, labels: Optional[Tensor], ce_weight: Optional[Tensor],
                 vocab: int) -> None:
    """A wrong label would be silently clamped: refuse it inside the op, so that
    torch.compile (for which the op is opaque) checks it too."""
    if ce_weight is None:
        return
    bad = ((labels < 0) | (labels >= vocab)) & (ce_weight != 0)
    if bool(bad.any()):
        raise ValueError(f"cex_kernels.{op}: labels of kept rows must be in [0, {vocab}) "
                         f"(or ignore_index); found {labels[bad][:5].tolist()}")


def no_autocast(device: torch.device):
    """The caller chose the dtypes; autocast must not change them inside an op."""
    return (torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda")
            else contextlib.nullcontext())


def _chunked_pass(hidden, weight, bias, teacher_kind, teacher, row_loss, kd_weight, ce_weight,
                  labels, soft_weight, hard_weight, temperature, beta, symmetric, backend,
                  n_chunk, want_grad, want_parts):
    """Per-row divergence and cross-entropy and, when ``want_grad``, the gradients of hidden,
    weight and bias (the weight's and bias's in fp32). The rows' gradients are
    ``soft_weight`` / ``hard_weight`` times those parts'. The divergence is evaluated only
    when it contributes (or ``want_parts``)."""
    n_rows, _ = hidden.shape
    vocab = weight.shape[0]
    acc = _checks.accumulation_dtype(hidden.dtype)
    kd_rows = torch.zeros(n_rows, dtype=acc, device=hidden.device)
    ce_rows = torch.zeros(n_rows, dtype=acc, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_grad else None
    # d weight: allocated by the first chunk's product (zeros at the end if none ran)
    grad_weight = None
    only_chunk = n_chunk >= n_rows
    grad_bias = (torch.zeros(vocab, dtype=acc, device=weight.device)
                 if want_grad and bias is not None else None)
    run_kd = soft_weight > 0 or want_parts
    kd_grad = want_grad and soft_weight > 0
    kernel_weight = kd_weight * soft_weight if soft_weight > 0 else kd_weight
    ce_grad = want_grad and ce_weight is not None and hard_weight > 0
    # One (chunk, V) buffer serves every chunk's logits; backends with grad_into_logits
    # then write the gradient over them (the logits are dead by then: the cross-entropy
    # reads them first). A teacher formed per chunk (head, top-k) gets a second one.
    rows_of_chunk = min(n_chunk, n_rows)
    logits_buffer = rows_buffer(rows_of_chunk, vocab, hidden)
    teacher_buffer = (rows_buffer(rows_of_chunk, vocab, teacher[0])
                      if run_kd and teacher_kind != "logits" else None)
    for r0 in range(0, n_rows, n_chunk):
        r1 = min(r0 + n_chunk, n_rows)
        h = hidden[r0:r1]
        logits = linear_into(logits_buffer[:r1 - r0], h, weight, bias)
        d_ce = None
        if ce_weight is not None:  # hard-label cross-entropy at temperature 1, same chunk
            w = ce_weight[r0:r1]
            logits32 = logits.to(acc)
            lse = torch.logsumexp(logits32, dim=-1)
            target = labels[r0:r1].clamp(0, vocab - 1)  # checked in the op
            picked = logits32.gather(1, target[:, None]).squeeze(1)
            ce_rows[r0:r1] = torch.where(w != 0, w * (lse - picked), torch.zeros_like(lse))
            if ce_grad:
                d_ce = torch.softmax(logits32, dim=-1)
                d_ce.scatter_add_(1, target[:, None], -torch.ones_like(picked)[:, None])
                d_ce.mul_((w * hard_weight)[:, None])
        grad_logits = None
        if run_kd:
            t_logits = teacher_logits_of(
                teacher_kind, teacher, r0, r1, vocab,
                out=None if teacher_buffer is None else teacher_buffer[:r1 - r0])
            rows, grad_logits = row_loss.rows(backend, logits, t_logits, kernel_weight[r0:r1],
                                              temperature, beta, symmetric, kd_grad,
                                              grad_out=logits if kd_grad else None)
            rows = rows.to(acc)
            kd_rows[r0:r1] = rows / soft_weight if soft_weight > 0 else rows
            if not kd_grad:
                grad_logits = None
        if d_ce is not None:
            grad_logits = (d_ce if grad_logits is None
                           else grad_logits.to(acc) + d_ce).to(logits.dtype)
        if want_grad:
            if grad_logits is None:  # nothing to differentiate in this chunk's terms
                grad_hidden[r0:r1] = 0
                continue
            _backends.matmul_into(grad_hidden[r0:r1], grad_logits, weight)
            grad_weight = _accumulate_weight_grad(grad_weight, grad_logits, h, weight, acc,
                                                  only_chunk)
            if grad_bias is not None:
                grad_bias += grad_logits.to(acc).sum(0)
    if want_grad and grad_weight is None:
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    return kd_rows, ce_rows, grad_hidden, grad_weight, grad_bias


def _accumulate_weight_grad(grad_weight: Optional[Tensor], grad_logits: Tensor, h: Tensor,
                            weight: Tensor, acc, only_chunk: bool) -> Tensor:
    """``d weight += grad_logitsᵀ @ h`` in ``acc``; the first chunk (``grad_weight`` None)
    allocates it. Returns d weight."""
    if grad_logits.dtype == torch.bfloat16:  # the chunk's product in bf16, summed in fp32
        product = grad_logits.T @ h
        if only_chunk:  # nothing to sum: the bf16 product is d weight, rounded once as
            return product  # the fp32 round trip would leave it
        if grad_weight is None:
            return product.to(acc)
        grad_weight += product
        return grad_weight
    if grad_logits.dtype == torch.float16:
        # fp16 gradients carry no 1/N (see _autograd): a sum over the chunk's rows can
        # pass fp16's range, so this product is formed in fp32.
        grad_logits, h = grad_logits.to(acc), h.to(acc)
    if grad_weight is None:
        out = _backends.empty_for_writing(weight.shape, weight, acc)
        return _backends.matmul_into(out, grad_logits.T, h)
    return _backends.matmul_into(grad_weight, grad_logits.T, h, accumulate=True)


def finish(hidden, weight, rows, out_scale, soft_weight, hard_weight, reduction, want_grad):
    """The ops' common tail: scale and reduce the row losses; the outputs in the schema's
    dtypes (no two outputs may alias each other)."""
    kd_rows, ce_rows, g_h, g_w, g_b = rows
    if out_scale is not None:
        kd_rows, ce_rows = kd_rows * out_scale, ce_rows * out_scale
    if reduction != "none":
        kd_rows, ce_rows = kd_rows.sum(), ce_rows.sum()
    loss = soft_weight * kd_rows + hard_weight * ce_rows
    if not want_grad:
        return (loss, kd_rows.clone(), ce_rows.clone(), *(hidden.new_empty((0,)) for _ in range(3)))
    keep_fp32 = hidden.dtype == torch.float16  # fp16's range: cast after scaling, in backward
    return (loss, kd_rows.clone(), ce_rows.clone(), g_h.to(hidden.dtype),
            g_w if keep_fp32 else g_w.to(weight.dtype),
            hidden.new_empty((0,)) if g_b is None
            else (g_b if keep_fp32 else g_b.to(weight.dtype)))


def fake_outputs(hidden, weight, bias, reduction, compute_grad):
    want_grad = compute_grad and reduction != "none"
    acc = _checks.accumulation_dtype(hidden.dtype)
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=acc)
    parts = (loss, torch.empty_like(loss), torch.empty_like(loss))
    if not want_grad:
        return (*parts, hidden.new_empty((0,)), hidden.new_empty((0,)), hidden.new_empty((0,)))
    grad_dtype = acc if hidden.dtype == torch.float16 else weight.dtype
    return (*parts, hidden.new_empty(hidden.shape),
            weight.new_empty(weight.shape, dtype=grad_dtype),
            weight.new_empty((weight.shape[0],), dtype=grad_dtype) if bias is not None
            else hidden.new_empty((0,)))


@torch.library.custom_op("cex::linear_loss_chunked", mutates_args=())
def linear_loss_chunked_op(
        hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher: List[Tensor],
        kd_weight: Tensor, ce_weight: Optional[Tensor], labels: Optional[Tensor],
        out_scale: Optional[Tensor], soft_weight: float, hard_weight: float, temperature: float,
        beta: float, symmetric: bool, reduction: str, compute_grad: bool, want_parts: bool,
        teacher_kind: str, divergence: str, backend: str, chunk_rows: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The chunked driver (arguments and returns in the module docstring). ``teacher`` as
    ``teacher_kind`` says (:func:`teacher_logits_of`); ``divergence`` a registered
    :class:`RowLoss` run on ``backend``; ``chunk_rows`` rows per chunk."""
    check_labels(f"linear_{divergence}", labels, ce_weight, weight.shape[0])
    if teacher_kind == "top_k":  # checked once, here, so torch.compile keeps the check
        _divergence.check_top_k_entries(teacher[0], teacher[1], weight.shape[0])
    want_grad = compute_grad and reduction != "none"
    with no_autocast(hidden.device):
        rows = _chunked_pass(hidden, weight, bias, teacher_kind, teacher, ROW_LOSSES[divergence],
                             kd_weight, ce_weight, labels, soft_weight, hard_weight,
                             temperature, beta, symmetric, backend, chunk_rows, want_grad,
                             want_parts)
    return finish(hidden, weight, rows, out_scale, soft_weight, hard_weight, reduction,
                  want_grad)


@linear_loss_chunked_op.register_fake
def _(hidden, weight, bias, teacher, kd_weight, ce_weight, labels, out_scale, soft_weight,
      hard_weight, temperature, beta, symmetric, reduction, compute_grad, *_):
    return fake_outputs(hidden, weight, bias, reduction, compute_grad)


# --- autograd, shared by every fused-linear op ----------------------------------------------

# Positions in PREFIX, the leading arguments every fused-linear op shares.
PREFIX = ("hidden", "weight", "bias", "teacher", "kd_weight", "ce_weight", "labels",
          "out_scale", "soft_weight", "hard_weight", "temperature", "beta", "symmetric",
          "reduction", "compute_grad", "want_parts")
_I = {name: i for i, name in enumerate(PREFIX)}


def _flat_tensors(inputs):
    """Every tensor among the inputs (tensor lists flattened), and how to put them back."""
    flat, layout = [], []
    for x in inputs:
        if isinstance(x, (list, tuple)):
            layout.append(len(x))
            flat.extend(x)
        elif isinstance(x, Tensor) or x is None:
            layout.append(-1)
            flat.append(x)
        else:
            layout.append(None)
    return flat, layout


def _unflatten(inputs, flat, layout):
    out, i = [], 0
    for x, kind in zip(inputs, layout):
        if kind is None:
            out.append(x)
        elif kind == -1:
            out.append(flat[i])
            i += 1
        else:
            out.append(list(flat[i:i + kind]))
            i += kind
    return out


def eager_loss(inputs, row_loss: RowLoss, teacher_kind: str):
    """A fused-linear op's loss in differentiable eager PyTorch (for double backward):
    ``inputs`` as the op's arguments."""
    (hidden, weight, bias, teacher, kd_w, ce_w, labels, out_scale, soft, hard, temperature,
     beta, symmetric, reduction) = inputs[:14]
    acc = _checks.accumulation_dtype(hidden.dtype)
    z = torch.nn.functional.linear(hidden.to(acc), weight.to(acc),
                                   None if bias is None else bias.to(acc))
    t_logits = teacher_logits_of(teacher_kind, teacher, 0, hidden.shape[0], weight.shape[0])
    zero = torch.zeros((), dtype=acc, device=z.device)
    kd = row_loss.eager(z, t_logits.to(acc), temperature, beta, symmetric)
    rows = soft * torch.where(kd_w != 0, kd_w.to(acc) * kd, zero)
    if ce_w is not None and hard > 0:
        ce = torch.logsumexp(z, -1) - z.gather(1, labels.clamp(0, z.shape[-1] - 1)[:, None])[:, 0]
        rows = rows + hard * torch.where(ce_w != 0, ce_w.to(acc) * ce, zero)
    if out_scale is not None:
        rows = rows * out_scale.to(acc)
    return rows if reduction == "none" else rows.sum()


def register_autograd(op, name: str, describe: Callable) -> None:
    """Autograd for a fused-linear op whose arguments start with PREFIX. ``describe(inputs)
    -> (row_loss, teacher_kind)`` names its loss for the eager formula."""

    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        ctx.reduction, ctx.compute_grad = inputs[_I["reduction"]], inputs[_I["compute_grad"]]
        ctx.has_bias = inputs[_I["bias"]] is not None
        ctx.dtypes = (inputs[_I["hidden"]].dtype, inputs[_I["weight"]].dtype)
        grads = (None, None, None) if ctx.reduction == "none" else output[3:]
        flat, ctx.layout = _flat_tensors(inputs)
        # The non-tensor arguments as they are; the tensors (references: reduction="none"
        # recomputes in backward, and a create_graph backward needs them) saved.
        ctx.inputs = [None if kind is not None else x for x, kind in zip(inputs, ctx.layout)]
        save_tensors(ctx, *grads, *flat)

    def backward(ctx, grad_loss, *_internal):
        # (a list input gets a list of gradients: autograd checks the structure)
        out = [None if kind is None or kind == -1 else [None] * kind for kind in ctx.layout]
        if grad_loss is None:
            return tuple(out)
        if not ctx.compute_grad:
            raise RuntimeError(f"{name} was called with compute_grad=False; call the "
                               "public function (cex_kernels.linear_kl, ...), which sets it")
        g_h, g_w, g_b, *flat = saved_tensors(ctx)
        inputs = _unflatten(ctx.inputs, flat, ctx.layout)
        hidden, weight, bias = inputs[:3]
        needs = ctx.needs_input_grad
        if create_graph_requested():  # differentiable: recompute with the eager formula
            wanted = [i for i in range(3) if needs[i] and inputs[i] is not None]
            constant = [as_constant(x) if isinstance(x, Tensor) else
                        [as_constant(t) for t in x] if isinstance(x, list) else x
                        for x in inputs]
            loss = eager_loss(constant, *describe(inputs))
            return eager_gradients(loss, constant, wanted, grad_loss, out)
        weight_dtype = ctx.dtypes[1]
        out_scale = inputs[_I["out_scale"]]
        if ctx.reduction == "none":
            # The gradient of sum_r upstream[r] * loss[r] is the op itself, reduced by "sum"
            # with the upstream folded into the row weights (through the op, so it traces).
            kd_w, ce_w = inputs[_I["kd_weight"]], inputs[_I["ce_weight"]]
            upstream = grad_loss.to(kd_w.dtype)
            again = list(inputs)
            again[_I["kd_weight"]] = kd_w * upstream
            again[_I["ce_weight"]] = None if ce_w is None else ce_w * upstream
            again[_I["out_scale"]] = None
            again[_I["reduction"]], again[_I["compute_grad"]] = "sum", True
            again[_I["want_parts"]] = False
            _, _, _, g_h, g_w, g_b = op(*again)
            g_w, g_b = g_w.to(weight_dtype), g_b.to(weight_dtype)
        else:
            factor = grad_loss if out_scale is None else grad_loss.float() * out_scale
            g_h = scale_saved(g_h, factor)
            g_w = scale_saved(g_w, factor).to(weight_dtype)
            g_b = scale_saved(g_b, factor).to(weight_dtype)
        out[:3] = (g_h if needs[0] else None, g_w if needs[1] else None,
                   g_b if ctx.has_bias and needs[2] else None)
        return tuple(out)

    op.register_autograd(backward, setup_context=setup_context)


register_autograd(linear_loss_chunked_op, "cex::linear_loss_chunked",
                  lambda inputs: (ROW_LOSSES[inputs[17]], inputs[16]))


# --- the public side: checks, flattening, row weights, one call of the op --------------------

def check_teacher(op: str, student_hidden: Tensor, vocab: int, teacher_logits, teacher_hidden,
                  teacher_weight, teacher_bias) -> str:
    """Which form the teacher takes (a ``TEACHER_KINDS`` entry), its shapes checked."""
    lead = student_hidden.shape[:-1]
    if (teacher_logits is None) == (teacher_hidden is None and teacher_weight is None):
        raise ValueError(f"cex_kernels.{op}: give the teacher either as teacher_logits or as "
                         "teacher_hidden + teacher_weight (and optionally teacher_bias), not both")
    if isinstance(teacher_logits, (tuple, list)):
        _divergence.check_top_k_pair(op, lead, teacher_logits)
        return "top_k"
    if teacher_logits is not None:
        if teacher_logits.shape != (*lead, vocab):
            raise ValueError(f"cex_kernels.{op}: teacher_logits must be {(*lead, vocab)} for "
                             f"student_hidden {tuple(student_hidden.shape)} and student_weight "
                             f"({vocab}, {student_hidden.shape[-1]}), got "
                             f"{tuple(teacher_logits.shape)}")
        return "logits"
    if teacher_hidden is None or teacher_weight is None:
        raise ValueError(f"cex_kernels.{op}: teacher_hidden and teacher_weight go together")
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(f"cex_kernels.{op}: teacher_hidden {tuple(teacher_hidden.shape)} "
                         f"and student_hidden {tuple(student_hidden.shape)} must share leading dims")
    if teacher_weight.dim() != 2 or tuple(teacher_weight.shape) != (vocab, teacher_hidden.shape[-1]):
        raise ValueError(f"cex_kernels.{op}: teacher_weight must be ({vocab}, "
                         f"{teacher_hidden.shape[-1]}) (student vocabulary {vocab}, teacher "
                         f"hidden size), got {tuple(teacher_weight.shape)}")
    if teacher_bias is not None and tuple(teacher_bias.shape) != (vocab,):
        raise ValueError(f"cex_kernels.{op}: teacher_bias must be ({vocab},), got "
                         f"{tuple(teacher_bias.shape)}")
    return "hidden"


class Prepared(NamedTuple):
    """What :func:`prepare` hands the op-specific part of a public fused-linear function."""
    hidden: Tensor          # (N, H), unit inner stride
    weight: Tensor
    bias: Optional[Tensor]
    teacher_kind: str
    teacher: List[Tensor]   # as teacher_kind says, detached, flattened to rows
    kd_weight: Tensor
    ce_weight: Optional[Tensor]
    labels: Optional[Tensor]
    out_scale: Optional[Tensor]
    compute_grad: bool
    lead: tuple
    out_dtype: torch.dtype
    backend: str


def prepare(op: str, student_hidden, student_weight, student_bias, teacher_logits,
            teacher_hidden, teacher_weight, teacher_bias, *, mask, labels, ignore_index,
            temperature, reduction, scale_by_t2, soft, hard, return_parts, grad_bound,
            backend, eager: Callable, unit_teacher_stride: Callable):
    """The checks and preparation every public fused-linear function shares. Returns a
    :class:`Prepared`, or, under a differentiating torch.func transform, the public
    function's result from ``eager(student_hidden, student_weight, dense teacher logits or
    None, teacher_hidden, teacher_weight, student_bias, teacher_bias) -> (loss, kd, ce)``
    (the eager formula, differentiable).

    ``grad_bound``: a bound on |dL/dz| of the divergence's student gradient for a unit row
    weight at T = 1 (sizes fp16's storage scale); ``unit_teacher_stride(backend)``: whether
    the backend's kernel needs the teacher's logits with unit stride along V."""
    top_k = isinstance(teacher_logits, (tuple, list))
    named = {"student_hidden": student_hidden, "student_weight": student_weight,
             "student_bias": student_bias,
             "teacher top-k values" if top_k else "teacher_logits":
                 teacher_logits[0] if top_k else teacher_logits,
             "teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight,
             "teacher_bias": teacher_bias}
    given = {k: v for k, v in named.items() if v is not None}
    for name, t in given.items():
        _checks.check_tensor(op, name, t)
    low = _checks.autocast_dtype(student_hidden.device)
    autocast = low is not None
    if autocast:  # as F.linear under autocast: compute in the autocast dtype
        given = {k: (v if v.dtype == torch.float64 else v.to(low)) for k, v in given.items()}
        named.update(given)
        (student_hidden, student_weight, student_bias, t_values, teacher_hidden,
         teacher_weight, teacher_bias) = named.values()
        teacher_logits = (t_values, teacher_logits[1]) if top_k else t_values
    dtype = _checks.check_same_dtype(op, **given)
    _checks.check_row_selectors(op, student_hidden.shape[:-1], mask, labels)
    extra = {k: v for k, v in (("mask", mask), ("labels", labels)) if v is not None}
    if top_k:
        extra["teacher top-k indices"] = teacher_logits[1]
    device = _checks.check_same_device(op, **given, **extra)

    if (student_hidden.dim() < 1 or student_weight.dim() != 2
            or student_weight.shape[1] != student_hidden.shape[-1]):
        raise ValueError(f"cex_kernels.{op}: student_weight must be (V, H) with H = "
                         f"student_hidden's last dimension; got student_hidden "
                         f"{tuple(student_hidden.shape)}, student_weight "
                         f"{tuple(student_weight.shape)}")
    vocab = student_weight.shape[0]
    lead = student_hidden.shape[:-1]
    if student_bias is not None and tuple(student_bias.shape) != (vocab,):
        raise ValueError(f"cex_kernels.{op}: student_bias must be ({vocab},), got "
                         f"{tuple(student_bias.shape)}")
    kind = check_teacher(op, student_hidden, vocab, teacher_logits, teacher_hidden,
                         teacher_weight, teacher_bias)
    if hard > 0 and labels is None:
        raise ValueError(f"cex_kernels.{op}: hard_label_weight > 0 needs labels")
    out_dtype = torch.float32 if autocast and dtype != torch.float64 else dtype

    if under_functorch_differentiation():  # torch.func: the eager formula, differentiable
        dense = (_divergence.top_k_dense(*teacher_logits, vocab) if kind == "top_k"
                 else teacher_logits)
        return eager_outputs(eager(student_hidden, student_weight, dense, teacher_hidden,
                                   teacher_weight, student_bias, teacher_bias),
                             out_dtype, return_parts)

    backend = _backends.resolve_backend(op, backend, device, dtype)
    hidden2 = _checks.as_rows(student_hidden, unit_inner_stride=True)
    if kind == "logits":
        teacher = [_checks.as_rows(teacher_logits.detach(),
                                   unit_inner_stride=unit_teacher_stride(backend))]
    elif kind == "hidden":
        teacher = [_checks.as_rows(teacher_hidden.detach(), unit_inner_stride=True),
                   teacher_weight.detach()] + ([] if teacher_bias is None
                                               else [teacher_bias.detach()])
    else:
        values, indices = teacher_logits
        teacher = [_checks.as_rows(values.detach(), unit_inner_stride=False),
                   _checks.as_rows(indices, unit_inner_stride=False)]
    keep = _divergence.kept_rows(lead, device, mask, labels, ignore_index)
    use_ce = labels is not None and (hard > 0 or return_parts)
    t2 = temperature ** 2 if scale_by_t2 else 1.0
    # One storage scale for both terms (fp16): the summing of a row's logit gradients into
    # d hidden gets 16x more headroom than the per-logit bound (d hidden sums V gradients
    # against weights of magnitude < 64).
    bound = 16 * max(grad_bound * soft / temperature * t2, 2.0 * hard)
    # reduction="none" stores no gradient (backward recomputes): no fp16 storage scale.
    weights = _divergence.row_weights(
        keep, torch.float32 if reduction == "none" and dtype == torch.float16 else dtype,
        reduction, 1.0, bound)
    compute_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (student_hidden, student_weight, student_bias))
    return Prepared(hidden2, student_weight, student_bias, kind, teacher,
                    weights.kernel * t2, weights.kernel if use_ce else None,
                    labels.reshape(-1).to(torch.int64) if labels is not None else None,
                    weights.out_scale, compute_grad, lead, out_dtype, backend)


def outputs(prep: Prepared, result, reduction: str, return_parts: bool):
    """The public functions' return value from an op's outputs."""
    loss, kd, ce = (x.to(prep.out_dtype) for x in result[:3])
    if reduction == "none":
        loss, kd, ce = loss.reshape(prep.lead), kd.reshape(prep.lead), ce.reshape(prep.lead)
    return (loss, kd.detach(), ce.detach()) if return_parts else loss


def eager_outputs(result, out_dtype, return_parts: bool):
    """As :func:`outputs`, for the eager formula's ``(loss, kd, ce)``."""
    loss, kd, ce = result
    loss = loss.to(out_dtype)
    return (loss, kd.detach().to(out_dtype), ce.detach().to(out_dtype)) if return_parts else loss
