"""``linear_kl``: the student's output layer and the KL/JSD distillation loss, fused.

``logits = hidden @ weight.T + bias`` (N x V, V = 32k-256k) is the largest tensor of
language-model distillation; this op never builds it for all rows at once. Rows are taken
in chunks sized from a memory budget; for each chunk the student logits (and the teacher's,
when the teacher is given as hidden states + head) are computed, reduced by the fused
softmax-KL row kernel (``ops/_divergence.py``), which also writes the gradient with respect
to the logits, and turned into ``d hidden = d logits @ weight`` and
``d weight += d logitsᵀ @ hidden`` before the next chunk. Peak extra memory is
``O(chunk x V)`` plus the gradients themselves, independent of N. The vocabulary-tiled
Triton algorithm (``triton/linear_kl.py``) keeps only per-row statistics instead.

Cost: the two output-layer GEMMs of the forward pass (``2 N V H`` FLOPs each for student
and teacher head) plus the two of the backward pass (``4 N V H``), done once; the KL pass
reads each logit chunk once more from cache.

Gradient-in-forward as for the other ops (rules in ``ops/_autograd.py``): with a reduced
loss the forward pass produces the gradients for a unit upstream gradient and backward
scales them. ``reduction="none"`` cannot pre-sum ``d weight`` without the per-row upstream
gradient, so there the forward pass computes only the loss and backward runs the chunks
again with the upstream gradient folded into the row weights.
"""
# No `from __future__ import annotations` here: torch 2.6 cannot infer a custom op's
# schema from string annotations.
import contextlib
from typing import Optional, Tuple

import torch
from torch import Tensor

from cex_kernels import _backends, _checks, reference
from cex_kernels.ops import _divergence
from cex_kernels.ops._autograd import (as_constant, create_graph_requested, save_tensors,
                                       saved_tensors, scale_saved,
                                       under_functorch_differentiation)

DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024
ALGORITHMS = ("auto", "chunked", "tiled")


def _chunk_rows(n_rows: int, vocab: int, itemsize: int, chunk_bytes: int) -> int:
    # Per row of a chunk: student logits, their gradient, teacher logits (input dtype) and
    # an fp32 softmax for the hard-label term (fp16: and an fp32 copy of the gradient).
    per_row = vocab * (3 * itemsize + 4 + (4 if itemsize == 2 else 0))
    return max(1, min(max(n_rows, 1), chunk_bytes // max(per_row, 1)))


def _chunked_pass(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight,
                  teacher_bias, kd_weight, ce_weight, labels, soft_weight, hard_weight,
                  temperature, beta, symmetric, backend, chunk_rows, want_grad, want_parts):
    """Per-row divergence and cross-entropy and, when ``want_grad``, the gradients of hidden,
    weight and bias (the weight's and bias's in fp32).

    ``kd_weight``/``ce_weight`` (N,) carry the row mask, T², the reduction's divisor (or
    fp16's storage scale) and, in backward for reduction="none", the upstream gradient; the
    rows' gradients are ``soft_weight`` / ``hard_weight`` times those parts'. The
    divergence is evaluated only when it contributes (or ``want_parts``).
    """
    n_rows, _ = hidden.shape
    acc = _checks.accumulation_dtype(hidden.dtype)
    kd_rows = torch.zeros(n_rows, dtype=acc, device=hidden.device)
    ce_rows = torch.zeros(n_rows, dtype=acc, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_grad else None
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_grad else None
    grad_bias = (torch.zeros(weight.shape[0], dtype=acc, device=weight.device)
                 if want_grad and bias is not None else None)
    run_kd = soft_weight > 0 or want_parts
    kd_grad = want_grad and soft_weight > 0
    kernel_weight = kd_weight * soft_weight if soft_weight > 0 else kd_weight
    ce_grad = want_grad and ce_weight is not None and hard_weight > 0
    for r0 in range(0, n_rows, chunk_rows):
        r1 = min(r0 + chunk_rows, n_rows)
        h = hidden[r0:r1]
        logits = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
        grad_logits = None
        if run_kd:
            if teacher_logits is not None:
                t_logits = teacher_logits[r0:r1]
            else:
                th = teacher_hidden[r0:r1]
                t_logits = (th @ teacher_weight.T if teacher_bias is None
                            else torch.addmm(teacher_bias, th, teacher_weight.T))
            rows, grad_logits, _ = _divergence.divergence_rows(
                backend, logits, t_logits, kernel_weight[r0:r1], temperature, beta, symmetric,
                kd_grad, False)
            rows = rows.to(acc)
            kd_rows[r0:r1] = rows / soft_weight if soft_weight > 0 else rows
            if not kd_grad:
                grad_logits = None
        if ce_weight is not None:  # hard-label cross-entropy at temperature 1, same chunk
            w = ce_weight[r0:r1]
            logits32 = logits.to(acc)
            lse = torch.logsumexp(logits32, dim=-1)
            target = labels[r0:r1].clamp(0, logits.shape[-1] - 1)  # checked in linear_kl_op
            picked = logits32.gather(1, target[:, None]).squeeze(1)
            ce_rows[r0:r1] = torch.where(w != 0, w * (lse - picked), torch.zeros_like(lse))
            if ce_grad:
                d_ce = torch.softmax(logits32, dim=-1)
                d_ce.scatter_add_(1, target[:, None], -torch.ones_like(picked)[:, None])
                d_ce.mul_((w * hard_weight)[:, None])
                grad_logits = (d_ce if grad_logits is None
                               else grad_logits.to(acc) + d_ce).to(logits.dtype)
        if want_grad:
            if grad_logits is None:  # nothing to differentiate in this chunk's terms
                grad_hidden[r0:r1] = 0
                continue
            grad_hidden[r0:r1] = grad_logits @ weight
            if grad_logits.dtype == acc:
                grad_weight.addmm_(grad_logits.T, h)
            elif grad_logits.dtype == torch.float16:
                # fp16 gradients carry no 1/N (see _autograd): a sum over the chunk's rows
                # can pass fp16's range, so this product is formed in fp32.
                grad_weight.addmm_(grad_logits.T.to(acc), h.to(acc))
            else:  # bf16: the chunk's product in the input dtype, summed in fp32
                grad_weight += (grad_logits.T @ h).to(acc)
            if grad_bias is not None:
                grad_bias += grad_logits.to(acc).sum(0)
    return kd_rows, ce_rows, grad_hidden, grad_weight, grad_bias


def _tiled_pass(hidden, weight, bias, teacher_logits, kd_weight, ce_weight, labels,
                soft_weight, hard_weight, temperature, beta, symmetric, want_grad, want_parts):
    """The vocabulary-tiled Triton kernels (``triton/linear_kl.py``): O(N) extra memory.
    Same returns as :func:`_chunked_pass` (the gradients in fp32)."""
    from cex_kernels.triton.linear_kl import linear_kl_tiled

    def run(kd_w, ce_w, grad):
        return linear_kl_tiled(hidden, weight, bias, teacher_logits, labels, kd_w, ce_w,
                               temperature, beta == 1.0, grad, parts=True,
                               symmetric_beta=beta if symmetric and 0.0 < beta < 1.0 else None)

    acc = _checks.accumulation_dtype(hidden.dtype)
    use_ce = ce_weight is not None and hard_weight > 0
    kd_rows, ce_rows, g_h, g_w, g_b = run(kd_weight.float() * soft_weight,
                                          ce_weight.float() * hard_weight if use_ce else None,
                                          want_grad)
    kd_rows = kd_rows.to(acc) / soft_weight if soft_weight > 0 else kd_rows.to(acc)
    ce_rows = ce_rows.to(acc) / hard_weight if use_ce else ce_rows.to(acc)
    if want_parts and (soft_weight == 0 or (ce_weight is not None and not use_ce)):
        # A part whose weight is 0 was left out above: its value alone, without gradients.
        kd_alone, ce_alone, *_ = run(kd_weight.float(), None if ce_weight is None
                                     else ce_weight.float(), False)
        kd_rows = kd_alone.to(acc) if soft_weight == 0 else kd_rows
        ce_rows = ce_alone.to(acc) if ce_weight is not None and not use_ce else ce_rows
    return kd_rows, ce_rows, g_h, g_w, g_b


@torch.library.custom_op("cex::linear_kl", mutates_args=())
def linear_kl_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                 teacher_logits: Optional[Tensor], teacher_hidden: Optional[Tensor],
                 teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
                 kd_weight: Tensor, ce_weight: Optional[Tensor], labels: Optional[Tensor],
                 out_scale: Optional[Tensor], soft_weight: float, hard_weight: float,
                 temperature: float, beta: float, symmetric: bool, reduction: str,
                 backend: str, chunk_rows: int, algorithm: str, compute_grad: bool,
                 want_parts: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """2-D inputs. Returns ``(loss, kd, ce, d hidden, d weight, d bias)``: the loss
    ``soft_weight·kd + hard_weight·ce`` and its two parts, reduced, in the accumulation
    dtype (the parts are for logging: no gradient flows through them), and the gradients
    for a unit upstream gradient (internal; empty unless ``compute_grad`` and the loss is
    reduced; d weight and d bias in fp32 for fp16 inputs, see ``_autograd``)."""
    if ce_weight is not None:  # a wrong label would be silently clamped: refuse it here,
        # inside the op, so that torch.compile (for which the op is opaque) checks it too
        bad = ((labels < 0) | (labels >= weight.shape[0])) & (ce_weight != 0)
        if bool(bad.any()):
            raise ValueError(f"cex_kernels.linear_kl: labels of kept rows must be in [0, "
                             f"{weight.shape[0]}) (or ignore_index); found "
                             f"{labels[bad][:5].tolist()}")
    want_grad = compute_grad and reduction != "none"
    with torch.autocast(hidden.device.type, enabled=False) if hidden.device.type in ("cpu", "cuda") \
            else contextlib.nullcontext():  # the caller chose the dtypes; autocast must not
        if algorithm == "tiled":
            kd_rows, ce_rows, g_h, g_w, g_b = _tiled_pass(
                hidden, weight, bias, teacher_logits, kd_weight, ce_weight, labels,
                soft_weight, hard_weight, temperature, beta, symmetric, want_grad, want_parts)
        else:
            kd_rows, ce_rows, g_h, g_w, g_b = _chunked_pass(
                hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight,
                teacher_bias, kd_weight, ce_weight, labels, soft_weight, hard_weight,
                temperature, beta, symmetric, backend, chunk_rows, want_grad, want_parts)
    if out_scale is not None:
        kd_rows, ce_rows = kd_rows * out_scale, ce_rows * out_scale
    if reduction != "none":
        kd_rows, ce_rows = kd_rows.sum(), ce_rows.sum()
    loss = soft_weight * kd_rows + hard_weight * ce_rows
    if not want_grad:  # (outputs may not alias each other: three distinct empties)
        return (loss, kd_rows.clone(), ce_rows.clone(), *(hidden.new_empty((0,)) for _ in range(3)))
    keep_fp32 = hidden.dtype == torch.float16  # fp16's range: cast after scaling, in backward
    return (loss, kd_rows.clone(), ce_rows.clone(), g_h.to(hidden.dtype),
            g_w if keep_fp32 else g_w.to(weight.dtype),
            hidden.new_empty((0,)) if g_b is None
            else (g_b if keep_fp32 else g_b.to(weight.dtype)))


@linear_kl_op.register_fake
def _(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
      kd_weight, ce_weight, labels, out_scale, soft_weight, hard_weight, temperature, beta,
      symmetric, reduction, backend, chunk_rows, algorithm, compute_grad, want_parts):
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


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    (hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
     kd_weight, ce_weight, labels, out_scale, soft_weight, hard_weight, temperature, beta,
     symmetric, reduction, backend, chunk_rows, algorithm, compute_grad, want_parts) = inputs
    ctx.reduction, ctx.compute_grad = reduction, compute_grad
    ctx.has_bias = bias is not None
    ctx.dtypes = (hidden.dtype, weight.dtype)
    ctx.args = (soft_weight, hard_weight, temperature, beta, symmetric, backend, chunk_rows,
                algorithm)
    grads = (None, None, None) if reduction == "none" else output[3:]
    # The inputs (references) for reduction="none", which recomputes in backward, and for a
    # create_graph backward.
    save_tensors(ctx, *grads, out_scale, hidden, weight, bias, teacher_logits,
                          teacher_hidden, teacher_weight, teacher_bias, kd_weight, ce_weight,
                          labels)


def _eager_loss(ctx, hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, kd_w, ce_w,
                labels, out_scale):
    """The op's loss in differentiable eager PyTorch (for double backward)."""
    soft, hard, temperature, beta, symmetric = ctx.args[:5]
    acc = _checks.accumulation_dtype(hidden.dtype)
    z = torch.nn.functional.linear(hidden.to(acc), weight.to(acc),
                                   None if bias is None else bias.to(acc))
    if t_logits is None:
        t_logits = torch.nn.functional.linear(t_hidden, t_weight, t_bias)
    zero = torch.zeros((), dtype=acc, device=z.device)
    kd = reference.generalized_jsd_rows(z, t_logits.to(acc), temperature, beta, symmetric)
    rows = soft * torch.where(kd_w != 0, kd_w.to(acc) * kd, zero)
    if ce_w is not None and hard > 0:
        ce = torch.logsumexp(z, -1) - z.gather(1, labels.clamp(0, z.shape[-1] - 1)[:, None])[:, 0]
        rows = rows + hard * torch.where(ce_w != 0, ce_w.to(acc) * ce, zero)
    if out_scale is not None:
        rows = rows * out_scale.to(acc)
    return rows if ctx.reduction == "none" else rows.sum()


_N_INPUTS = 22


def _backward(ctx, grad_loss, *_internal):
    if grad_loss is None:
        return (None,) * _N_INPUTS
    if not ctx.compute_grad:
        raise RuntimeError("cex::linear_kl was called with compute_grad=False; call "
                           "cex_kernels.linear_kl, which sets it")
    hidden_dtype, weight_dtype = ctx.dtypes
    (g_h, g_w, g_b, out_scale, hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias,
     kd_w, ce_w, labels) = saved_tensors(ctx)
    needs = ctx.needs_input_grad
    if create_graph_requested():  # differentiable: recompute with the eager formula
        inputs = (hidden, weight, bias)
        wanted = [i for i in range(3) if needs[i] and inputs[i] is not None]
        loss = _eager_loss(ctx, *(as_constant(x) for x in (hidden, weight, bias, t_logits,
                                                           t_hidden, t_weight, t_bias)),
                           kd_w, ce_w, labels, out_scale)
        grads = torch.autograd.grad(loss, [inputs[i] for i in wanted], grad_loss,
                                    create_graph=True)
        out = [None] * _N_INPUTS
        for i, g in zip(wanted, grads):
            out[i] = g.to(inputs[i].dtype)
        return tuple(out)
    if ctx.reduction == "none":
        upstream = grad_loss.to(kd_w.dtype)
        soft, hard, temperature, beta, symmetric, backend, chunk_rows, algorithm = ctx.args
        # The gradient of sum_r upstream[r] * loss[r] is the op itself, reduced by "sum"
        # with the upstream folded into the row weights (through the op, so it traces).
        _, _, _, g_h, g_w, g_b = linear_kl_op(
            hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, kd_w * upstream,
            None if ce_w is None else ce_w * upstream, labels, None, soft, hard, temperature,
            beta, symmetric, "sum", backend, chunk_rows, algorithm, True, False)
        g_w, g_b = g_w.to(weight_dtype), g_b.to(weight_dtype)
    else:
        factor = grad_loss if out_scale is None else grad_loss.float() * out_scale
        g_h = scale_saved(g_h, factor)
        g_w = scale_saved(g_w, factor).to(weight_dtype)
        g_b = scale_saved(g_b, factor).to(weight_dtype)
    grads = (g_h if needs[0] else None, g_w if needs[1] else None,
             g_b if ctx.has_bias and needs[2] else None)
    return grads + (None,) * (_N_INPUTS - 3)


linear_kl_op.register_autograd(_backward, setup_context=_setup_context)


def check_options(op: str, *, temperature, direction, beta, reduction, ignore_index,
                  hard_label_weight, soft_label_weight, scale_by_t2, chunk_bytes, algorithm,
                  backend, forward_weight=None) -> dict:
    """Every non-tensor option of :func:`linear_kl`, checked (``LinearKLLoss`` calls this at
    construction). Returns them normalized (Python scalars; ``beta`` and ``symmetric``
    resolved from ``direction`` and ``forward_weight`` when beta is not given)."""
    temperature, ignore_index, scale_by_t2 = _divergence.check_options(
        op, temperature=temperature, reduction=reduction, ignore_index=ignore_index,
        scale_by_t2=scale_by_t2, backend=backend)
    beta_of_direction, symmetric = _divergence.check_direction(op, direction, forward_weight)
    if beta is not None:
        if direction != "forward":
            raise ValueError(f"cex_kernels.{op}: give either direction= or beta= (JSD), not both")
        beta = _divergence.check_beta(op, beta)
    else:
        beta = beta_of_direction
    hard = _checks.check_real(op, "hard_label_weight", hard_label_weight, low=0.0)
    soft = _checks.check_real(op, "soft_label_weight", soft_label_weight, low=0.0)
    _checks.check_choice(op, "algorithm", algorithm, ALGORITHMS)
    chunk_bytes = _checks.check_int(op, "chunk_bytes", chunk_bytes, low=1)
    return dict(temperature=temperature, beta=beta, symmetric=symmetric, reduction=reduction,
                ignore_index=ignore_index, hard_label_weight=hard, soft_label_weight=soft,
                scale_by_t2=scale_by_t2, chunk_bytes=chunk_bytes, algorithm=algorithm,
                backend=backend)


def linear_kl(student_hidden: Tensor, student_weight: Tensor,
              teacher_logits: Optional[Tensor] = None, *, teacher_hidden: Optional[Tensor] = None,
              teacher_weight: Optional[Tensor] = None, student_bias: Optional[Tensor] = None,
              teacher_bias: Optional[Tensor] = None, temperature: float = 1.0,
              direction: str = "forward", forward_weight: Optional[float] = None,
              beta: Optional[float] = None, reduction: str = "batchmean", mask: Optional[Tensor] = None,
              labels: Optional[Tensor] = None, ignore_index: int = -100,
              hard_label_weight: float = 0.0, soft_label_weight: float = 1.0,
              scale_by_t2: bool = True, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
              algorithm: str = "auto", backend: str = "auto", return_parts: bool = False):
    """Distillation loss of ``student_hidden @ student_weight.T + student_bias`` against a
    teacher, without materializing the student's (N, V) logits.

    The teacher is either ``teacher_logits (..., V)`` or its last hidden states and head,
    ``teacher_hidden (..., H_t)`` with ``teacher_weight (V, H_t)`` and ``teacher_bias``
    (then its logits are built chunk by chunk too). The teacher is a constant: no gradient
    flows to it. The divergence is that of :func:`cex_kernels.softmax_kl` (``direction``,
    and ``forward_weight`` for ``"symmetric"``) or, when ``beta`` is given, :func:`cex_kernels.jsd` (same temperature, T² scaling,
    ``reduction`` and NaN rules); ``mask``/``labels``/``ignore_index`` drop rows.

    The loss is ``soft_label_weight * KD + hard_label_weight * CE``, where CE is the
    student's cross-entropy on ``labels`` at temperature 1 over the same kept rows, with
    the same reduction, computed in the same pass. Labels of kept rows must lie in
    ``[0, V)``: anything else is a ``ValueError``, also under ``torch.compile``.
    ``return_parts=True`` returns ``(loss, kd, ce)``, the two parts unweighted and detached
    (for logging; ``ce`` is 0 without labels). Gradients: ``student_hidden``,
    ``student_weight``, ``student_bias``.

    ``algorithm``: ``"chunked"`` processes rows in chunks of about ``chunk_bytes`` of
    temporaries (default 256 MiB) with the backend's softmax-KL kernel between two BLAS
    GEMMs; ``"tiled"`` (Triton backend; teacher given as logits; forward, reverse or
    symmetric KL, not the JSD)
    keeps only per-row statistics and recomputes logit tiles, so its extra memory is O(N)
    at the cost of one more ``2 N V H`` GEMM's worth of FLOPs; ``"auto"`` is ``"chunked"``.

    Dtypes: one floating dtype for all tensors; accumulation in fp32 and the loss in the
    inputs' dtype. Under ``torch.autocast`` the op computes as ``F.linear`` would there:
    every floating input other than float64 is cast to the autocast dtype (the teacher's
    logits included), the divergence accumulates in fp32 and the loss is fp32. fp16
    gradients keep fp16's range under a loss scaler. Higher-order gradients work (a
    ``create_graph=True`` backward recomputes the gradients with the eager formula,
    differentiably; ``torch.func`` transforms that differentiate run that formula).
    """
    op = "linear_kl"
    opts = check_options(op, temperature=temperature, direction=direction, beta=beta,
                         reduction=reduction, ignore_index=ignore_index,
                         hard_label_weight=hard_label_weight,
                         soft_label_weight=soft_label_weight, scale_by_t2=scale_by_t2,
                         chunk_bytes=chunk_bytes, algorithm=algorithm, backend=backend,
                         forward_weight=forward_weight)
    return_parts = _checks.check_bool(op, "return_parts", return_parts)
    temperature, beta_value, symmetric = opts["temperature"], opts["beta"], opts["symmetric"]
    # The symmetric KL with forward weight 1 or 0 is the forward or the reverse KL.
    symmetric = symmetric and 0.0 < beta_value < 1.0
    hard, soft = opts["hard_label_weight"], opts["soft_label_weight"]
    named = {"student_hidden": student_hidden, "student_weight": student_weight,
             "student_bias": student_bias, "teacher_logits": teacher_logits,
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
        (student_hidden, student_weight, student_bias, teacher_logits, teacher_hidden,
         teacher_weight, teacher_bias) = named.values()
    dtype = _checks.check_same_dtype(op, **given)
    _checks.check_row_selectors(op, student_hidden.shape[:-1], mask, labels)
    extra = {k: v for k, v in (("mask", mask), ("labels", labels)) if v is not None}
    device = _checks.check_same_device(op, **given, **extra)

    if student_hidden.dim() < 1 or student_weight.dim() != 2 or student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"cex_kernels.linear_kl: student_weight must be (V, H) with H = "
                         f"student_hidden's last dimension; got student_hidden "
                         f"{tuple(student_hidden.shape)}, student_weight {tuple(student_weight.shape)}")
    vocab = student_weight.shape[0]
    lead = student_hidden.shape[:-1]
    if student_bias is not None and tuple(student_bias.shape) != (vocab,):
        raise ValueError(f"cex_kernels.linear_kl: student_bias must be ({vocab},), got {tuple(student_bias.shape)}")
    if (teacher_logits is None) == (teacher_hidden is None and teacher_weight is None):
        raise ValueError("cex_kernels.linear_kl: give the teacher either as teacher_logits or as "
                         "teacher_hidden + teacher_weight (and optionally teacher_bias), not both")
    if teacher_logits is not None:
        if teacher_logits.shape != (*lead, vocab):
            raise ValueError(f"cex_kernels.linear_kl: teacher_logits must be {(*lead, vocab)} for "
                             f"student_hidden {tuple(student_hidden.shape)} and student_weight "
                             f"{tuple(student_weight.shape)}, got {tuple(teacher_logits.shape)}")
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("cex_kernels.linear_kl: teacher_hidden and teacher_weight go together")
        if teacher_hidden.shape[:-1] != lead:
            raise ValueError(f"cex_kernels.linear_kl: teacher_hidden {tuple(teacher_hidden.shape)} "
                             f"and student_hidden {tuple(student_hidden.shape)} must share leading dims")
        if teacher_weight.dim() != 2 or tuple(teacher_weight.shape) != (vocab, teacher_hidden.shape[-1]):
            raise ValueError(f"cex_kernels.linear_kl: teacher_weight must be ({vocab}, "
                             f"{teacher_hidden.shape[-1]}) (student vocabulary {vocab}, teacher "
                             f"hidden size), got {tuple(teacher_weight.shape)}")
        if teacher_bias is not None and tuple(teacher_bias.shape) != (vocab,):
            raise ValueError(f"cex_kernels.linear_kl: teacher_bias must be ({vocab},), got {tuple(teacher_bias.shape)}")
    if hard > 0 and labels is None:
        raise ValueError("cex_kernels.linear_kl: hard_label_weight > 0 needs labels")
    out_dtype = torch.float32 if autocast and dtype != torch.float64 else dtype

    if under_functorch_differentiation():  # torch.func: the eager formula, differentiable
        loss, kd, ce = reference.linear_kl(
            student_hidden, student_weight, teacher_logits, teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight, student_bias=student_bias, teacher_bias=teacher_bias,
            temperature=temperature, beta=beta_value, symmetric=symmetric,
            reduction=reduction, mask=mask,
            labels=labels, ignore_index=opts["ignore_index"], hard_label_weight=hard,
            soft_label_weight=soft, scale_by_t2=opts["scale_by_t2"], return_parts=True)
        loss = loss.to(out_dtype)
        return (loss, kd.detach().to(out_dtype), ce.detach().to(out_dtype)) if return_parts else loss

    backend = _backends.resolve_backend(op, backend, device, dtype)
    algorithm = opts["algorithm"]
    if algorithm == "tiled":
        why = ("it needs backend='triton'" if backend != "triton" else
               "it needs the teacher as teacher_logits" if teacher_logits is None else
               "it computes forward, reverse or symmetric KL, not the generalized JSD"
               if beta_value not in (0.0, 1.0) and not symmetric else "")
        if why:
            raise ValueError(f"cex_kernels.linear_kl: algorithm='tiled' is not available here: {why}")
    else:
        algorithm = "chunked"
    unit = _divergence.NEEDS_UNIT_INNER_STRIDE[backend] or algorithm == "tiled"
    if algorithm == "tiled":
        student_weight = _checks.as_rows(student_weight, unit_inner_stride=True)
    hidden2 = _checks.as_rows(student_hidden, unit_inner_stride=True)
    t_logits2 = (_checks.as_rows(teacher_logits.detach(), unit_inner_stride=unit)
                 if teacher_logits is not None else None)
    t_hidden2 = (_checks.as_rows(teacher_hidden.detach(), unit_inner_stride=True)
                 if teacher_hidden is not None else None)
    keep = _divergence.kept_rows(lead, device, mask, labels, opts["ignore_index"])
    use_ce = labels is not None and (hard > 0 or return_parts)
    # One storage scale for both terms (fp16): the log-ratio side of reverse (and symmetric)
    # KL and the summing of a row's logit gradients into d hidden get 16x more headroom than
    # the per-logit bound (d hidden sums V gradients against weights of magnitude < 64).
    log_ratio_side = beta_value == 1.0 or symmetric
    grad_bound = 16 * max((128.0 if log_ratio_side else 2.0) * soft / temperature
                          * (temperature ** 2 if opts["scale_by_t2"] else 1.0), 2.0 * hard)
    # reduction="none" stores no gradient (backward recomputes): no fp16 storage scale.
    weights = _divergence.row_weights(
        keep, torch.float32 if reduction == "none" and dtype == torch.float16 else dtype,
        reduction, 1.0, grad_bound)
    kd_weight = weights.kernel * (temperature ** 2 if opts["scale_by_t2"] else 1.0)
    ce_weight = weights.kernel if use_ce else None
    labels2 = labels.reshape(-1).to(torch.int64) if labels is not None else None
    compute_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (student_hidden, student_weight, student_bias))
    chunk = _chunk_rows(hidden2.shape[0], vocab, student_hidden.element_size(),
                        opts["chunk_bytes"])
    loss, kd, ce, _, _, _ = linear_kl_op(
        hidden2, student_weight, student_bias, t_logits2, t_hidden2,
        teacher_weight.detach() if teacher_weight is not None else None,
        teacher_bias.detach() if teacher_bias is not None else None, kd_weight, ce_weight,
        labels2, weights.out_scale, soft, hard, temperature, beta_value, symmetric, reduction,
        backend, chunk, algorithm, compute_grad, return_parts)
    loss, kd, ce = (x.to(out_dtype) for x in (loss, kd, ce))
    if reduction == "none":
        loss, kd, ce = loss.reshape(lead), kd.reshape(lead), ce.reshape(lead)
    return (loss, kd.detach(), ce.detach()) if return_parts else loss
