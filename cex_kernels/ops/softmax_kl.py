"""``softmax_kl`` and ``jsd``: divergences between the softmaxes of student and teacher logits.

Layers: ``softmax_kl`` / ``jsd`` (public: checks, row masks, flattening, backend choice) →
the custom op ``cex::softmax_kl`` (schema, fake implementation, autograd) → a backend row
kernel (contract and math in ``ops/_divergence.py``).

Gradient-in-forward: the kernel writes the logits' gradients while it has the rows in
cache, scaled for the reduction; backward only multiplies them by the upstream gradient,
in place when the graph is being freed (rules in ``ops/_autograd.py``).
"""
# No `from __future__ import annotations` here: torch 2.6 cannot infer a custom op's
# schema from string annotations.
from typing import Optional, Tuple

import torch
from torch import Tensor

from cex_kernels import _checks, reference
from cex_kernels.ops import _divergence
from cex_kernels.ops._autograd import (as_constant, create_graph_requested, eager_gradients,
                                       save_tensors, saved_tensors)
from cex_kernels.ops._divergence import DIRECTIONS, REDUCTIONS  # noqa: F401  (re-exported)


@torch.library.custom_op("cex::softmax_kl", mutates_args=())
def softmax_kl_op(student: Tensor, teacher: Tensor, row_weight: Tensor,
                  out_scale: Optional[Tensor], temperature: float, beta: float,
                  symmetric: bool, reduction: str, backend: str, grad_student: bool,
                  grad_teacher: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """2-D logits (N, V), ``row_weight`` (N,), ``beta`` in [0, 1] and ``symmetric`` (the
    divergence, see ``_divergence``), ``out_scale`` None or a
    0-dim fp32 factor on the loss and the stored gradients (fp16, see ``_autograd``).
    Returns ``(loss, grad_student_unit, grad_teacher_unit)``: the loss in the accumulation
    dtype (fp32; float64 for float64); the gradients empty unless asked for, and internal
    (for a unit upstream gradient, before ``out_scale``). ``reduction`` is "none" (per
    row) or anything else (summed: the weights carry the batchmean divisor)."""
    row_loss, grad_s, grad_t = _divergence.divergence_rows(
        backend, student, teacher, row_weight, temperature, beta, symmetric, grad_student,
        grad_teacher)
    return _divergence.reduce_row_loss(row_loss, reduction, out_scale), grad_s, grad_t


@softmax_kl_op.register_fake
def _(student, teacher, row_weight, out_scale, temperature, beta, symmetric, reduction,
      backend, grad_student, grad_teacher):
    return _divergence.fake_row_outputs(student, teacher, reduction, grad_student, grad_teacher)


def _setup_context(ctx, inputs, output):
    (student, teacher, row_weight, out_scale, temperature, beta, symmetric, reduction, _,
     grad_student, grad_teacher) = inputs
    _, grad_s, grad_t = output
    # The gradient outputs are internal: without this, backward would get (and autograd
    # allocate) zero (N, V) tensors as their "gradients", beside the stored ones.
    ctx.set_materialize_grads(False)
    ctx.reduction, ctx.temperature = reduction, temperature
    ctx.beta, ctx.symmetric = beta, symmetric
    ctx.computed = (grad_student, grad_teacher)
    # The inputs only for a create_graph backward (references, not copies).
    save_tensors(ctx, grad_s, grad_t, out_scale, student, teacher, row_weight)


def _eager_loss(ctx, student, teacher, row_weight, out_scale):
    """The op's loss in differentiable eager PyTorch (for double backward)."""
    acc = _checks.accumulation_dtype(student.dtype)
    rows = reference.generalized_jsd_rows(student.to(acc), teacher.to(acc), ctx.temperature,
                                          ctx.beta, ctx.symmetric)
    w = row_weight.to(acc) if out_scale is None else row_weight.to(acc) * out_scale.to(acc)
    rows = torch.where(w != 0, w * rows, torch.zeros((), dtype=acc, device=rows.device))
    return rows if ctx.reduction == "none" else rows.sum()


def _backward(ctx, grad_loss, _gs, _gt):
    if grad_loss is None:  # the loss did not reach what is being differentiated
        return (None,) * 11
    grad_s, grad_t, out_scale, student, teacher, row_weight = saved_tensors(ctx)
    needed = [i for i in (0, 1) if ctx.needs_input_grad[i]]
    out = [None] * 11
    if create_graph_requested():  # differentiable: recompute with the eager formula
        inputs = (student, teacher)
        loss = _eager_loss(ctx, as_constant(student), as_constant(teacher), row_weight, out_scale)
        return eager_gradients(loss, inputs, needed, grad_loss, out)
    return _divergence.scale_stored_gradients("softmax_kl", out, needed, ctx.computed,
                                              (grad_s, grad_t), grad_loss, ctx.reduction,
                                              out_scale)


softmax_kl_op.register_autograd(_backward, setup_context=_setup_context)


def _grad_bound(beta: float, symmetric: bool, grad_student: bool, grad_teacher: bool) -> float:
    """A bound on |dL/dz| for the gradients the kernel writes (sizes fp16's storage scale).
    The student's gradient in forward KL (p - q) and both JSD gradients stay below 2; the
    log-ratio forms (teacher gradient of forward KL, student gradient of reverse KL, both
    gradients of the symmetric KL, ``q (log q - log p - L)``) are unbounded in principle:
    128 leaves room for a log-ratio of 64 (e^-64) before the stored fp16 value would
    overflow (the symmetric KL's other term, ``r (p - q)`` or ``(1-r)(q - p)``, adds at most
    its weight, which the log-ratio term's weight leaves room for)."""
    log_ratio_side = ((beta == 0.0 and grad_teacher) or (beta == 1.0 and grad_student)
                      or (symmetric and (grad_student or grad_teacher)))
    return 128.0 if log_ratio_side else 2.0


def _divergence_loss(op: str, student: Tensor, teacher, beta: float, symmetric: bool,
                     temperature, reduction: str,
                     mask: Optional[Tensor], labels: Optional[Tensor], ignore_index,
                     scale_by_t2, vocab_size, backend: str) -> Tensor:
    rows = _divergence.prepare_rows(
        op, student, teacher, temperature=temperature, reduction=reduction, mask=mask,
        labels=labels, ignore_index=ignore_index, scale_by_t2=scale_by_t2,
        vocab_size=vocab_size, backend=backend,
        eager=lambda s, t, **kw: reference.jsd(s, t, beta=beta, symmetric=symmetric, **kw),
        grad_bound=lambda gs, gt: _grad_bound(beta, symmetric, gs, gt))
    if not isinstance(rows, _divergence.Rows):  # the eager formula's result
        return rows
    loss, _, _ = softmax_kl_op(rows.student, rows.teacher, rows.weights.kernel,
                               rows.weights.out_scale, rows.temperature, beta, symmetric,
                               reduction, rows.backend, rows.grad_student, rows.grad_teacher)
    return rows.output(loss, reduction)


def softmax_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
               direction: str = "forward", forward_weight: Optional[float] = None,
               reduction: str = "batchmean",
               mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
               ignore_index: int = -100, scale_by_t2: bool = True,
               vocab_size: Optional[int] = None, backend: str = "auto") -> Tensor:
    """Fused KL divergence between ``p_s = softmax(student_logits / T)`` and
    ``p_t = softmax(teacher_logits / T)``, row by row over the last dimension (math and
    gradients in ``ops/_divergence.py``).

    Args:
        student_logits, teacher_logits: raw logits ``(..., V)``, one dtype and device.
        temperature: T > 0, finite, with 1/T (and T² when ``scale_by_t2``) finite in fp32.
        direction: ``"forward"``: KL(p_t || p_s) (the classic distillation loss);
            ``"reverse"``: KL(p_s || p_t) (mode seeking, as in MiniLLM);
            ``"symmetric"``: ``r·KL(p_t || p_s) + (1-r)·KL(p_s || p_t)``, both in one
            kernel launch.
        forward_weight: r in [0, 1], the forward KL's weight; only with
            ``direction="symmetric"`` (default 0.5 there; anything else is a ValueError).
            r = 1 and r = 0 are exactly the forward and the reverse KL.
        reduction: ``"batchmean"``: the sum over kept rows divided by the number of kept
            rows, i.e. a mean per row (per token for ``(B, S, V)`` logits; 0, with a zero
            gradient, when no row is kept). Note that ``torch.nn.functional.kl_div`` and
            TRL divide a 3-D input by its first dimension (the batch size) instead.
            ``"sum"``, or ``"none"``: per-row losses of shape ``(...)``, 0 for dropped rows.
        mask: optional bool ``(...)``, True = keep the row.
        labels: optional integer ``(...)``; rows with ``labels == ignore_index`` are dropped.
        scale_by_t2: multiply the loss by T² (Hinton et al.), so gradient magnitudes do not
            shrink as T grows.
        vocab_size: compare only the first ``vocab_size`` entries of both (student and
            teacher vocabularies padded to different sizes); without it the sizes must match.
        teacher_logits may also be a top-k pair ``(values (..., k), indices (..., k))``
            (offline distillation from stored teacher outputs): the teacher distribution
            is the softmax over those entries, the student's over the full vocabulary.
            Entries whose value is -inf are padding (for a variable k) and contribute
            nothing wherever they point; an index given twice with other values is a
            ``ValueError``. The pair is scattered into a -inf-filled ``(..., V)`` tensor
            for the dense kernels, which costs one such tensor; reverse KL (and the
            symmetric KL with r < 1) is then inf wherever the student has mass outside the k.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.

    The probabilities are never materialized: each row is read in streaming passes for the
    softmax statistics and for the loss and gradients. Accumulation is fp32 (float64 for
    float64); the result has the logits' dtype (fp32 under ``torch.autocast``, where logits
    of different dtypes are computed in the wider one). ``-inf`` logits are legal
    (0·log 0 = 0); a student ``-inf`` where the teacher has mass gives ``inf``. A kept row
    with a NaN (or a +inf logit) has a NaN loss and NaN gradients; dropped rows are never
    read. ``reduction="none"`` on inputs that are already log-probabilities renormalizes
    them in fp32, which can move each row's value by about 1e-6 relative.

    Gradients flow to the student, and to the teacher when it requires grad. They are
    computed in the forward pass; fp16 gradients keep fp16's range under a loss scaler
    (``GradScaler``). Higher-order gradients work: a backward with ``create_graph=True``
    (a gradient penalty) recomputes the gradient with the eager formula, differentiably,
    and ``torch.func.grad``/``jacrev``/``hessian`` run that formula throughout.
    """
    beta, symmetric = _divergence.check_direction("softmax_kl", direction, forward_weight)
    return _divergence_loss("softmax_kl", student_logits, teacher_logits, beta, symmetric,
                            temperature, reduction, mask, labels, ignore_index, scale_by_t2,
                            vocab_size, backend)


def jsd(student_logits: Tensor, teacher_logits: Tensor, *, beta: float = 0.5,
        temperature: float = 1.0, reduction: str = "batchmean", mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None, ignore_index: int = -100, scale_by_t2: bool = True,
        vocab_size: Optional[int] = None, backend: str = "auto") -> Tensor:
    """Generalized Jensen-Shannon divergence, TRL GKD's ``generalized_jsd_loss`` convention.

    With ``p_s``, ``p_t`` as in :func:`softmax_kl`:

    * ``beta = 0``: KL(p_t || p_s) (forward KL);  ``beta = 1``: KL(p_s || p_t) (reverse KL);
    * otherwise ``beta·KL(p_t || m) + (1-beta)·KL(p_s || m)`` with the mixture
      ``m = beta·p_t + (1-beta)·p_s`` (beta = 0.5: the symmetric JSD; as in TRL, a tiny
      positive beta gives about beta·KL, not KL). Gradients: ``ops/_divergence.py``.

    Other arguments and behaviour as :func:`softmax_kl`. To match TRL's own function pass
    ``scale_by_t2=False``, and mind the reduction: ``"batchmean"`` here divides by the
    number of kept rows (tokens); TRL divides by the count of tokens whose label is not
    -100 when given labels, and by the batch size (the first dimension) in older versions.
    """
    beta = _divergence.check_beta("jsd", beta)
    return _divergence_loss("jsd", student_logits, teacher_logits, beta, False, temperature,
                            reduction, mask, labels, ignore_index, scale_by_t2, vocab_size,
                            backend)
