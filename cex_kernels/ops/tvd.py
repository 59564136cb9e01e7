"""``tvd`` and ``linear_tvd``: the total variation distance between the softmaxes of student
and teacher logits.

The math, stated once (``p = softmax(student / T)``, ``q = softmax(teacher / T)``,
``sg = sign(p - q)`` with sign(0) = 0)::

    L       = 1/2 Σ |p - q|                  in [0, 1]
    dL/dz_s = 1/(2T) p (sg - Σ p sg)         (|dL/dz| <= 1/T)
    dL/dz_t = 1/(2T) q (Σ q sg - sg)

i.e. the softmax's Jacobian applied to dL/dp = sg/2; at p = q the subgradient 0 is taken
(as autograd's of ``abs``). Liger-Kernel's ``LigerTVDLoss`` takes probabilities and returns
the gradient with respect to them; here the inputs are logits (as for the other divergences),
so the softmax and temperature are fused in and gradients reach both logits.

No T² factor (and no ``scale_by_t2``): Hinton's T² keeps the KL's gradient, which shrinks like
1/T², at a constant scale; the TVD's shrinks only like 1/T, so T² would make it grow with T.
Multiply the loss by a weight of your choice instead.

Row kernel contract (kernel slot ``tvd`` in the backend registry; cpu: ``csrc/cpu/softmax_kl.cpp``,
triton: ``triton/softmax_kl.py``, reference: ``reference.tvd_row_kernel``; the cuda backend
has none)::

    fwd(student2d, teacher2d, row_weight, inv_temperature, grad_student, grad_teacher)
        -> (row_loss, grad_student, grad_teacher)

``row_loss[r] = w[r]·L_r``, each gradient ``w[r]·dL_r/dz`` (0 for rows with ``w[r] == 0``,
which are never read); the softmax is taken around the raw row max; a kept row whose loss
is NaN gets NaN in every entry of each requested gradient -- all as ``ops/_divergence.py``
states for the KL family.
"""
# No `from __future__ import annotations` here: torch 2.6 cannot infer a custom op's
# schema from string annotations.
from typing import Optional, Tuple

import torch
from torch import Tensor

from cex_kernels import _backends, _checks, reference
from cex_kernels.ops import _divergence, _fused_linear
from cex_kernels.ops._autograd import (as_constant, create_graph_requested, eager_gradients,
                                       save_tensors, saved_tensors)
from cex_kernels.ops._fused_linear import Prepared

# |dL/dz| <= 1 per logit at T = 1 (sizes fp16's storage scale; 2 leaves a factor of room).
_GRAD_BOUND = 2.0


def _rows(backend, student, teacher, row_weight, temperature, grad_student, grad_teacher,
          grad_student_out=None):
    kernel = _backends.kernel(backend, "tvd")
    if grad_student_out is not None and grad_student and _backends.get(backend).grad_into_logits:
        return kernel(student, teacher, row_weight, 1.0 / temperature, grad_student,
                      grad_teacher, grad_student_out=grad_student_out)
    return kernel(student, teacher, row_weight, 1.0 / temperature, grad_student, grad_teacher)


@torch.library.custom_op("cex::tvd", mutates_args=())
def tvd_op(student: Tensor, teacher: Tensor, row_weight: Tensor, out_scale: Optional[Tensor],
           temperature: float, reduction: str, backend: str, grad_student: bool,
           grad_teacher: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """2-D logits (N, V), ``row_weight`` (N,), ``out_scale`` None or a 0-dim fp32 factor on
    the loss and the stored gradients (fp16, see ``_autograd``). Returns ``(loss,
    grad_student_unit, grad_teacher_unit)`` as ``cex::softmax_kl`` does: the loss in the
    accumulation dtype, per row for ``reduction="none"`` else summed; the gradients internal
    (for a unit upstream gradient, before ``out_scale``), empty unless asked for."""
    row_loss, grad_s, grad_t = _rows(backend, student, teacher, row_weight, temperature,
                                     grad_student, grad_teacher)
    return _divergence.reduce_row_loss(row_loss, reduction, out_scale), grad_s, grad_t


@tvd_op.register_fake
def _(student, teacher, row_weight, out_scale, temperature, reduction, backend, grad_student,
      grad_teacher):
    return _divergence.fake_row_outputs(student, teacher, reduction, grad_student, grad_teacher)


def _setup_context(ctx, inputs, output):
    student, teacher, row_weight, out_scale, temperature, reduction, _, gs, gt = inputs
    ctx.set_materialize_grads(False)  # the gradient outputs are internal
    ctx.reduction, ctx.temperature, ctx.computed = reduction, temperature, (gs, gt)
    save_tensors(ctx, output[1], output[2], out_scale, student, teacher, row_weight)


def _backward(ctx, grad_loss, _gs, _gt):
    out = [None] * 9
    if grad_loss is None:
        return tuple(out)
    grad_s, grad_t, out_scale, student, teacher, row_weight = saved_tensors(ctx)
    needed = [i for i in (0, 1) if ctx.needs_input_grad[i]]
    if create_graph_requested():  # differentiable: recompute with the eager formula
        inputs = (as_constant(student), as_constant(teacher))
        acc = _checks.accumulation_dtype(student.dtype)
        w = row_weight.to(acc) * (1.0 if out_scale is None else out_scale.to(acc))
        rows = reference.tvd_rows(inputs[0].to(acc), inputs[1].to(acc), ctx.temperature)
        rows = torch.where(w != 0, w * rows, torch.zeros((), dtype=acc, device=rows.device))
        loss = rows if ctx.reduction == "none" else rows.sum()
        return eager_gradients(loss, inputs, needed, grad_loss, out)
    return _divergence.scale_stored_gradients("tvd", out, needed, ctx.computed,
                                              (grad_s, grad_t), grad_loss, ctx.reduction,
                                              out_scale)


tvd_op.register_autograd(_backward, setup_context=_setup_context)


def tvd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
        reduction: str = "batchmean", mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None, ignore_index: int = -100,
        vocab_size: Optional[int] = None, backend: str = "auto") -> Tensor:
    """Fused total variation distance ``1/2 Σ |p_s - p_t|`` between ``p_s =
    softmax(student_logits / T)`` and ``p_t = softmax(teacher_logits / T)``, row by row over
    the last dimension (math, gradients and the choice of no T² factor in this module's
    docstring). Each row's distance is in [0, 1].

    Arguments as :func:`cex_kernels.softmax_kl` (``temperature``, ``reduction`` "batchmean"
    (a mean over kept rows), "sum" or "none", ``mask``, ``labels``/``ignore_index``,
    ``vocab_size``, a top-k teacher ``(values, indices)``, ``backend``), without direction
    (the distance is symmetric) and without ``scale_by_t2``. Backends: ``"reference"``,
    ``"cpu"`` and ``"triton"``; the cuda backend has no TVD kernel, so ``backend="auto"``
    runs the Triton kernel on CUDA tensors and ``backend="cuda"`` is a ValueError.

    Gradients flow to the student, and to the teacher when it requires grad, computed in
    the forward pass (fp16 keeps its range under a loss scaler); higher-order gradients
    recompute the eager formula. ``-inf`` logits are legal (probability 0); a kept row with
    a NaN (or a +inf logit) has a NaN loss and NaN gradients; dropped rows are never read.
    Accumulation is fp32 (float64 for float64); the result has the logits' dtype (fp32
    under ``torch.autocast``).
    """
    rows = _divergence.prepare_rows(
        "tvd", student_logits, teacher_logits, temperature=temperature, reduction=reduction,
        mask=mask, labels=labels, ignore_index=ignore_index, scale_by_t2=False,
        vocab_size=vocab_size, backend=backend,
        eager=lambda s, t, scale_by_t2, **kw: reference.tvd(s, t, **kw),
        grad_bound=lambda gs, gt: _GRAD_BOUND)
    if not isinstance(rows, _divergence.Rows):  # the eager formula's result
        return rows
    loss, _, _ = tvd_op(rows.student, rows.teacher, rows.weights.kernel, rows.weights.out_scale,
                        rows.temperature, reduction, rows.backend, rows.grad_student,
                        rows.grad_teacher)
    return rows.output(loss, reduction)


# --- fused with the student's output layer ----------------------------------------------------

def _tvd_row_loss(backend, student, teacher, row_weight, temperature, beta, symmetric,
                  want_grad, grad_out=None):
    rows, grad, _ = _rows(backend, student, teacher, row_weight, temperature, want_grad, False,
                          grad_student_out=grad_out)
    return rows, grad


_fused_linear.register_row_loss("tvd", _tvd_row_loss, reference.tvd_rows)


def check_linear_options(op: str, *, temperature, reduction, ignore_index, hard_label_weight,
                         soft_label_weight, chunk_bytes, backend) -> dict:
    """Every non-tensor option of :func:`linear_tvd`, checked and normalized."""
    temperature, ignore_index, _ = _divergence.check_options(
        op, temperature=temperature, reduction=reduction, ignore_index=ignore_index,
        scale_by_t2=False, backend=backend)
    return dict(temperature=temperature, reduction=reduction, ignore_index=ignore_index,
                hard_label_weight=_checks.check_real(op, "hard_label_weight",
                                                     hard_label_weight, low=0.0),
                soft_label_weight=_checks.check_real(op, "soft_label_weight",
                                                     soft_label_weight, low=0.0),
                chunk_bytes=_fused_linear.check_chunk_bytes(op, chunk_bytes),
                backend=backend)


def linear_tvd(student_hidden: Tensor, student_weight: Tensor,
               teacher_logits: Optional[Tensor] = None, *,
               teacher_hidden: Optional[Tensor] = None, teacher_weight: Optional[Tensor] = None,
               student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
               temperature: float = 1.0, reduction: str = "batchmean",
               mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
               ignore_index: int = -100, hard_label_weight: float = 0.0,
               soft_label_weight: float = 1.0, chunk_bytes: Optional[int] = None,
               backend: str = "auto", return_parts: bool = False):
    """:func:`tvd` of ``student_hidden @ student_weight.T + student_bias`` against a teacher,
    without materializing the student's (N, V) logits: the chunked fused-linear driver of
    :func:`cex_kernels.linear_kl` with the TVD row kernel. The teacher (logits, hidden states
    + head, or a top-k pair), ``mask``/``labels``, the hard-label term
    (``soft_label_weight * TVD + hard_label_weight * CE``), ``chunk_bytes``, ``reduction``,
    ``return_parts``, dtypes, autocast and gradients are as there (gradients reach
    ``student_hidden``, ``student_weight`` and ``student_bias``; the teacher is a constant).
    No T² factor, as :func:`tvd`; only the chunked algorithm.
    """
    op = "linear_tvd"
    opts = check_linear_options(op, temperature=temperature, reduction=reduction,
                                ignore_index=ignore_index, hard_label_weight=hard_label_weight,
                                soft_label_weight=soft_label_weight, chunk_bytes=chunk_bytes,
                                backend=backend)
    return_parts = _checks.check_bool(op, "return_parts", return_parts)
    temperature, hard, soft = (opts["temperature"], opts["hard_label_weight"],
                               opts["soft_label_weight"])

    def eager(h, w, t, th, tw, b, tb):
        return reference.linear_tvd(
            h, w, t, teacher_hidden=th, teacher_weight=tw, student_bias=b, teacher_bias=tb,
            temperature=temperature, reduction=reduction, mask=mask, labels=labels,
            ignore_index=opts["ignore_index"], hard_label_weight=hard, soft_label_weight=soft,
            return_parts=True)

    prep = _fused_linear.prepare(
        op, student_hidden, student_weight, student_bias, teacher_logits, teacher_hidden,
        teacher_weight, teacher_bias, mask=mask, labels=labels,
        ignore_index=opts["ignore_index"], temperature=temperature, reduction=reduction,
        scale_by_t2=False, soft=soft, hard=hard, return_parts=return_parts,
        grad_bound=_GRAD_BOUND, backend=backend, eager=eager,
        unit_teacher_stride=_backends.needs_unit_inner_stride)
    if not isinstance(prep, Prepared):
        return prep
    n_chunk = _fused_linear.chunk_rows(prep, opts["chunk_bytes"])
    result = _fused_linear.linear_loss_chunked_op(
        prep.hidden, prep.weight, prep.bias, prep.teacher, prep.kd_weight, prep.ce_weight,
        prep.labels, prep.out_scale, soft, hard, temperature, 0.0, False, reduction,
        prep.compute_grad, return_parts, prep.teacher_kind, "tvd", prep.backend, n_chunk)
    return _fused_linear.outputs(prep, result, reduction, return_parts)
