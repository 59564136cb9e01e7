"""``linear_kl``: the student's output layer and the KL/JSD distillation loss, fused.

``logits = hidden @ weight.T + bias`` (N x V, V = 32k-256k) is the largest tensor of
language-model distillation; this op never builds it for all rows at once. Rows are taken
in chunks sized from a memory budget; for each chunk the student logits (and the teacher's,
when the teacher is given as hidden states + head) are computed, reduced by the fused
softmax-KL kernel, which also writes the gradient with respect to the logits, and turned
into ``d hidden = d logits @ weight`` and ``d weight += d logitsᵀ @ hidden`` before the
next chunk. Peak extra memory is ``O(chunk x V)`` plus the gradients themselves,
independent of N.

Cost: the two output-layer GEMMs of the forward pass (``2 N V H`` FLOPs each for student
and teacher head) plus the two of the backward pass (``4 N V H``), done once; the KL pass
reads each logit chunk once more from cache. A vocabulary-tiled kernel keeping only per-row
statistics (``O(N)`` extra memory, Cut Cross-Entropy style) is not implemented yet.

Gradient-in-forward as for the other ops: with a reduced loss the forward pass produces
the gradients for a unit upstream gradient and backward scales them. ``reduction="none"``
cannot pre-sum ``d weight`` without the per-row upstream gradient, so there the forward
pass computes only the loss and backward runs the chunks again with the upstream weights.
"""
# No `from __future__ import annotations` here: torch 2.6 cannot infer a custom op's
# schema from string annotations.
from typing import Optional, Tuple

import torch
from torch import Tensor

from cex_kernels import _backends, _checks
from cex_kernels.ops.projected_mse import _may_scale_in_place
from cex_kernels.ops.softmax_kl import _KERNELS as _KL_KERNELS
from cex_kernels.ops.softmax_kl import (_NEEDS_UNIT_INNER_STRIDE, DIRECTIONS, REDUCTIONS,
                                        kept_row_factor)

DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024
ALGORITHMS = ("auto", "chunked", "tiled")


def _chunk_rows(n_rows: int, vocab: int, itemsize: int, chunk_bytes: int) -> int:
    # Per row of a chunk: student logits, their gradient, teacher logits (input dtype) and
    # an fp32 softmax for the hard-label term.
    per_row = vocab * (3 * itemsize + 4)
    return max(1, min(max(n_rows, 1), chunk_bytes // max(per_row, 1)))


def _kl_rows(backend, student_logits, teacher_logits, row_weight, temperature, beta, want_grad):
    """Per-row divergence and d/d(student logits); beta = 1 (reverse KL) swaps the roles."""
    kernel = _KL_KERNELS[backend]
    if beta == 1.0:
        rows, _, grad = kernel(teacher_logits, student_logits, row_weight, 1.0 / temperature,
                               0.0, False, want_grad)
    else:
        rows, grad, _ = kernel(student_logits, teacher_logits, row_weight, 1.0 / temperature,
                               beta, want_grad, False)
    return rows, grad


def _chunked_pass(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight,
                  teacher_bias, kd_weight, ce_weight, labels, temperature, beta, backend,
                  chunk_rows, want_grad):
    """Loss per row and, when ``want_grad``, the gradients of hidden, weight and bias.

    ``kd_weight``/``ce_weight`` (N,) carry the row mask, T², the reduction's divisor, the
    hard-label weight and (in backward for reduction="none") the upstream gradient.
    """
    n_rows, _ = hidden.shape
    acc = _checks.accumulation_dtype(hidden.dtype)
    loss_rows = torch.zeros(n_rows, dtype=acc, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_grad else hidden.new_empty((0,))
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_grad else None
    grad_bias = (torch.zeros(weight.shape[0], dtype=acc, device=weight.device)
                 if want_grad and bias is not None else None)
    use_ce = ce_weight is not None
    for r0 in range(0, n_rows, chunk_rows):
        r1 = min(r0 + chunk_rows, n_rows)
        h = hidden[r0:r1]
        logits = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
        if teacher_logits is not None:
            t_logits = teacher_logits[r0:r1]
        else:
            th = teacher_hidden[r0:r1]
            t_logits = (th @ teacher_weight.T if teacher_bias is None
                        else torch.addmm(teacher_bias, th, teacher_weight.T))
        rows, grad_logits = _kl_rows(backend, logits, t_logits, kd_weight[r0:r1], temperature,
                                     beta, want_grad)
        rows = rows.to(acc)
        if use_ce:  # hard-label cross-entropy at temperature 1, same chunk
            w = ce_weight[r0:r1]
            logits32 = logits.to(acc)
            lse = torch.logsumexp(logits32, dim=-1)
            target = labels[r0:r1].clamp(0, logits.shape[-1] - 1)
            picked = logits32.gather(1, target[:, None]).squeeze(1)
            rows = rows + torch.where(w != 0, w * (lse - picked), torch.zeros_like(lse))
            if want_grad:
                d_ce = torch.softmax(logits32, dim=-1)
                d_ce.scatter_add_(1, target[:, None], -torch.ones_like(picked)[:, None])
                d_ce.mul_(w[:, None])
                grad_logits = (grad_logits.to(acc) + d_ce).to(logits.dtype)
        loss_rows[r0:r1] = rows
        if want_grad:
            grad_hidden[r0:r1] = grad_logits @ weight
            if grad_logits.dtype == acc:
                grad_weight.addmm_(grad_logits.T, h)
            else:  # half types: the chunk's product in the input dtype, summed in fp32
                grad_weight += (grad_logits.T @ h).to(acc)
            if grad_bias is not None:
                grad_bias += grad_logits.to(acc).sum(0)
    if not want_grad:
        return loss_rows, grad_hidden, hidden.new_empty((0,)), hidden.new_empty((0,))
    return (loss_rows, grad_hidden, grad_weight.to(weight.dtype),
            grad_bias.to(weight.dtype) if grad_bias is not None else hidden.new_empty((0,)))


def _tiled_pass(hidden, weight, bias, teacher_logits, kd_weight, ce_weight, labels,
                temperature, beta, want_grad):
    """The vocabulary-tiled Triton kernels (``triton/linear_kl.py``): O(N) extra memory."""
    from cex_kernels.triton.linear_kl import linear_kl_tiled
    rows, g_h, g_w, g_b = linear_kl_tiled(hidden, weight, bias, teacher_logits, labels,
                                          kd_weight.float(), None if ce_weight is None
                                          else ce_weight.float(), temperature, beta == 1.0,
                                          want_grad)
    rows = rows.to(_checks.accumulation_dtype(hidden.dtype))
    if not want_grad:
        return rows, hidden.new_empty((0,)), hidden.new_empty((0,)), hidden.new_empty((0,))
    return (rows, g_h.to(hidden.dtype), g_w.to(weight.dtype),
            g_b.to(weight.dtype) if g_b is not None else hidden.new_empty((0,)))


@torch.library.custom_op("cex::linear_kl", mutates_args=())
def linear_kl_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                 teacher_logits: Optional[Tensor], teacher_hidden: Optional[Tensor],
                 teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
                 kd_weight: Tensor, ce_weight: Optional[Tensor], labels: Optional[Tensor],
                 temperature: float, beta: float, reduction: str, backend: str,
                 chunk_rows: int, algorithm: str,
                 compute_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """2-D inputs. Returns ``(loss, d hidden, d weight, d bias)`` for a unit upstream
    gradient (internal; empty unless ``compute_grad`` and the loss is reduced)."""
    want_grad = compute_grad and reduction != "none"
    if algorithm == "tiled":
        rows, g_h, g_w, g_b = _tiled_pass(hidden, weight, bias, teacher_logits, kd_weight,
                                          ce_weight, labels, temperature, beta, want_grad)
    else:
        rows, g_h, g_w, g_b = _chunked_pass(hidden, weight, bias, teacher_logits,
                                            teacher_hidden, teacher_weight, teacher_bias,
                                            kd_weight, ce_weight, labels, temperature, beta,
                                            backend, chunk_rows, want_grad)
    loss = rows if reduction == "none" else rows.sum()
    return loss.to(hidden.dtype), g_h, g_w, g_b


@linear_kl_op.register_fake
def _(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
      kd_weight, ce_weight, labels, temperature, beta, reduction, backend, chunk_rows,
      algorithm, compute_grad):
    want_grad = compute_grad and reduction != "none"
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else ())
    if not want_grad:
        return loss, hidden.new_empty((0,)), hidden.new_empty((0,)), hidden.new_empty((0,))
    return (loss, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape),
            weight.new_empty((weight.shape[0],)) if bias is not None else hidden.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    (hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
     kd_weight, ce_weight, labels, temperature, beta, reduction, backend, chunk_rows,
     algorithm, compute_grad) = inputs
    ctx.reduction, ctx.compute_grad = reduction, compute_grad
    ctx.has_bias = bias is not None
    if reduction == "none":  # backward recomputes the chunks with the upstream weights
        ctx.args = (temperature, beta, backend, chunk_rows, algorithm)
        ctx.save_for_backward(hidden, weight, bias, teacher_logits, teacher_hidden,
                              teacher_weight, teacher_bias, kd_weight, ce_weight, labels)
    else:
        _, g_h, g_w, g_b = output
        ctx.save_for_backward(g_h, g_w, g_b)


def _backward(ctx, grad_loss, *_internal):
    if grad_loss is None:
        return (None,) * 17
    if not ctx.compute_grad:
        raise RuntimeError("cex::linear_kl was called with compute_grad=False; call "
                           "cex_kernels.linear_kl, which sets it")
    if ctx.reduction == "none":
        (hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, kd_w, ce_w,
         labels) = ctx.saved_tensors
        upstream = grad_loss.to(kd_w.dtype)
        temperature, beta, backend, chunk_rows, algorithm = ctx.args
        # The gradient of sum_r upstream[r] * loss[r] is the op itself, reduced by "sum"
        # with the upstream folded into the row weights (through the op, so it traces).
        _, g_h, g_w, g_b = linear_kl_op(
            hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, kd_w * upstream,
            None if ce_w is None else ce_w * upstream, labels, temperature, beta, "sum",
            backend, chunk_rows, algorithm, True)
    else:
        g_h, g_w, g_b = ctx.saved_tensors
        scaled = []
        for g in (g_h, g_w, g_b):
            up = grad_loss.to(g.dtype)
            scaled.append(g.mul_(up) if _may_scale_in_place(g) else g * up)
        g_h, g_w, g_b = scaled
    needs = ctx.needs_input_grad
    return (g_h if needs[0] else None, g_w if needs[1] else None,
            g_b if ctx.has_bias and needs[2] else None) + (None,) * 14


linear_kl_op.register_autograd(_backward, setup_context=_setup_context)


def linear_kl(student_hidden: Tensor, student_weight: Tensor,
              teacher_logits: Optional[Tensor] = None, *, teacher_hidden: Optional[Tensor] = None,
              teacher_weight: Optional[Tensor] = None, student_bias: Optional[Tensor] = None,
              teacher_bias: Optional[Tensor] = None, temperature: float = 1.0,
              direction: str = "forward", beta: Optional[float] = None,
              reduction: str = "batchmean", mask: Optional[Tensor] = None,
              labels: Optional[Tensor] = None, ignore_index: int = -100,
              hard_label_weight: float = 0.0, scale_by_t2: bool = True,
              chunk_bytes: int = DEFAULT_CHUNK_BYTES, algorithm: str = "auto",
              backend: str = "auto") -> Tensor:
    """Distillation loss of ``student_hidden @ student_weight.T + student_bias`` against a
    teacher, without materializing the student's (N, V) logits.

    The teacher is either ``teacher_logits (..., V)`` or its last hidden states and head,
    ``teacher_hidden (..., H_t)`` with ``teacher_weight (V, H_t)`` and ``teacher_bias``
    (then its logits are built chunk by chunk too). The teacher is a constant: no gradient
    flows to it. Loss semantics are those of :func:`cex_kernels.softmax_kl` (``direction``)
    or, when ``beta`` is given, :func:`cex_kernels.jsd`; ``mask``/``labels``/
    ``ignore_index`` drop rows; ``reduction`` is ``"batchmean"``, ``"sum"`` or ``"none"``.
    ``hard_label_weight > 0`` adds that weight times the student's cross-entropy on
    ``labels`` (at temperature 1, same reduction over the kept rows), computed in the same
    pass. Gradients: ``student_hidden``, ``student_weight``, ``student_bias``.

    ``algorithm``: ``"chunked"`` processes rows in chunks of about ``chunk_bytes`` of
    temporaries (default 256 MiB) with the backend's softmax-KL kernel between two BLAS
    GEMMs; ``"tiled"`` (Triton backend; teacher given as logits; forward or reverse KL)
    keeps only per-row statistics and recomputes logit tiles, so its extra memory is O(N)
    at the cost of one more ``2 N V H`` GEMM's worth of FLOPs; ``"auto"`` is ``"chunked"``
    until the tiled kernels are tuned on a GPU.
    """
    op = "linear_kl"
    named = {"student_hidden": student_hidden, "student_weight": student_weight,
             "student_bias": student_bias, "teacher_logits": teacher_logits,
             "teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight,
             "teacher_bias": teacher_bias}
    given = {k: v for k, v in named.items() if v is not None}
    for name, t in given.items():
        _checks.check_tensor(op, name, t)
    dtype = _checks.check_same_dtype(op, **given)
    extra = {k: v for k, v in (("mask", mask), ("labels", labels)) if v is not None}
    device = _checks.check_same_device(op, **given, **extra)
    _checks.check_choice(op, "reduction", reduction, REDUCTIONS)
    _checks.check_choice(op, "direction", direction, DIRECTIONS)
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"cex_kernels.linear_kl: temperature must be a positive number, got {temperature!r}")
    if beta is not None:
        if direction != "forward":
            raise ValueError("cex_kernels.linear_kl: give either direction= or beta= (JSD), not both")
        if not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
            raise ValueError(f"cex_kernels.linear_kl: beta must be a number in [0, 1], got {beta!r}")
    beta_value = float(beta) if beta is not None else (0.0 if direction == "forward" else 1.0)
    if not isinstance(hard_label_weight, (int, float)) or hard_label_weight < 0:
        raise ValueError(f"cex_kernels.linear_kl: hard_label_weight must be >= 0, got {hard_label_weight!r}")
    _checks.check_choice(op, "algorithm", algorithm, ALGORITHMS)
    if not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError(f"cex_kernels.linear_kl: chunk_bytes must be a positive int, got {chunk_bytes!r}")

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
    if mask is not None and (mask.dtype != torch.bool or mask.shape != lead):
        raise ValueError(f"cex_kernels.linear_kl: mask must be a bool tensor of shape {tuple(lead)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    if labels is not None and (labels.dtype.is_floating_point or labels.dtype == torch.bool
                               or labels.dtype.is_complex or labels.shape != lead):
        raise ValueError(f"cex_kernels.linear_kl: labels must be an integer tensor of shape "
                         f"{tuple(lead)}, got {labels.dtype} {tuple(labels.shape)}")
    if hard_label_weight > 0:
        if labels is None:
            raise ValueError("cex_kernels.linear_kl: hard_label_weight > 0 needs labels")
        if not torch.compiler.is_compiling():  # one check per call; a wrong label is silent otherwise
            bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
            if bool(bad.any()):
                raise ValueError(f"cex_kernels.linear_kl: labels must be in [0, {vocab}) or "
                                 f"ignore_index={ignore_index}; found {labels[bad][:5].tolist()}")

    backend = _backends.resolve_backend(op, backend, device, dtype)
    if algorithm == "tiled":
        why = ("it needs backend='triton'" if backend != "triton" else
               "it needs the teacher as teacher_logits" if teacher_logits is None else
               "it computes forward or reverse KL, not the generalized JSD"
               if beta_value not in (0.0, 1.0) else "")
        if why:
            raise ValueError(f"cex_kernels.linear_kl: algorithm='tiled' is not available here: {why}")
    else:
        algorithm = "chunked"
    unit = _NEEDS_UNIT_INNER_STRIDE[backend] or algorithm == "tiled"
    if algorithm == "tiled":
        student_weight = _checks.as_rows(student_weight, unit_inner_stride=True)
    hidden2 = _checks.as_rows(student_hidden, unit_inner_stride=True)
    t_logits2 = (_checks.as_rows(teacher_logits.detach(), unit_inner_stride=unit)
                 if teacher_logits is not None else None)
    t_hidden2 = (_checks.as_rows(teacher_hidden.detach(), unit_inner_stride=True)
                 if teacher_hidden is not None else None)
    factor = kept_row_factor(lead, device, dtype, mask, labels, ignore_index, reduction)
    kd_weight = factor * float(temperature) ** 2 if scale_by_t2 else factor
    ce_weight = factor * float(hard_label_weight) if hard_label_weight > 0 else None
    labels2 = labels.reshape(-1).to(torch.int64) if labels is not None else None
    compute_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (student_hidden, student_weight, student_bias))
    chunk = _chunk_rows(hidden2.shape[0], vocab, student_hidden.element_size(), chunk_bytes)
    loss, _, _, _ = linear_kl_op(
        hidden2, student_weight, student_bias, t_logits2, t_hidden2,
        teacher_weight.detach() if teacher_weight is not None else None,
        teacher_bias.detach() if teacher_bias is not None else None, kd_weight, ce_weight,
        labels2, float(temperature), beta_value, reduction, backend, chunk, algorithm,
        compute_grad)
    return loss.reshape(lead) if reduction == "none" else loss
