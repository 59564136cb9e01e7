"""``softmax_kl`` and ``jsd``: divergences between the softmaxes of student and teacher logits.

Layers: ``softmax_kl`` / ``jsd`` (public: checks, row masks, flattening, backend choice) →
the custom op ``cex::softmax_kl`` (schema, fake implementation, autograd) → a backend kernel
with one contract::

    fwd(student2d, teacher2d, row_weight, inv_temperature, beta, grad_student, grad_teacher)
        -> (row_loss, grad_student, grad_teacher)

with ``p = softmax(student / T)``, ``q = softmax(teacher / T)`` and ``beta`` in [0, 1):
beta = 0 is KL(q || p); 0 < beta < 1 is the generalized JSD beta·KL(q || m) +
(1-beta)·KL(p || m), m = beta·q + (1-beta)·p. beta = 1, KL(p || q), is beta = 0 with the
inputs (and the gradients) swapped, so no kernel has a third mode. ``row_loss[r] = w[r]·L_r``
and each gradient is ``w[r]/T · dL_r/dz`` (0 for rows with ``w[r] == 0``: the dropped rows,
which are never read), where ``w`` already holds the mask, T² and the batchmean divisor.

Gradient-in-forward: the kernel writes the logits' gradients while it has the rows in
cache, scaled for the reduction; backward only multiplies them by the upstream gradient,
in place when the graph is being freed (as ``projected_mse`` does).
"""
# No `from __future__ import annotations` here: torch 2.6 cannot infer a custom op's
# schema from string annotations.
from typing import Optional, Tuple

import torch
from torch import Tensor

from cex_kernels import _backends, _checks, reference
from cex_kernels.ops.projected_mse import _may_scale_in_place

REDUCTIONS = ("batchmean", "sum", "none")
DIRECTIONS = ("forward", "reverse")


def _fwd_triton(*args):
    from cex_kernels.triton import softmax_kl as triton_softmax_kl
    return triton_softmax_kl.softmax_kl_fwd(*args)


def _fwd_cpu(*args):
    return _backends._C.softmax_kl_fwd_cpu(*args)


def _fwd_cuda(student, teacher, row_weight, inv_temperature, beta, grad_student, grad_teacher):
    with torch.cuda.device(student.device):
        stream = torch.cuda.current_stream(student.device).cuda_stream
        return _backends._C.softmax_kl_fwd_cuda(student, teacher, row_weight, inv_temperature,
                                                beta, grad_student, grad_teacher, stream)


_KERNELS = {"triton": _fwd_triton, "cuda": _fwd_cuda, "cpu": _fwd_cpu,
            "reference": reference.softmax_kl_rows}
_NEEDS_UNIT_INNER_STRIDE = {"triton": False, "cuda": True, "cpu": True, "reference": False}


@torch.library.custom_op("cex::softmax_kl", mutates_args=())
def softmax_kl_op(student: Tensor, teacher: Tensor, row_weight: Tensor, temperature: float,
                  beta: float, reduction: str, backend: str, grad_student: bool,
                  grad_teacher: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """2-D logits (N, V), ``row_weight`` (N,). ``beta`` in [0, 1]. Returns ``(loss,
    grad_student_unit, grad_teacher_unit)``; the gradients are empty unless asked for, and
    internal (the gradients for a unit upstream gradient). ``reduction`` is "none" (per
    row) or anything else (summed: the weights carry the batchmean divisor)."""
    swap = beta == 1.0  # KL(p || q) is KL(q || p) with the roles swapped
    a, b = (teacher, student) if swap else (student, teacher)
    ga, gb = (grad_teacher, grad_student) if swap else (grad_student, grad_teacher)
    row_loss, grad_a, grad_b = _KERNELS[backend](a, b, row_weight, 1.0 / temperature,
                                                 0.0 if swap else beta, ga, gb)
    grad_s, grad_t = (grad_b, grad_a) if swap else (grad_a, grad_b)
    loss = row_loss if reduction == "none" else row_loss.sum()
    return loss.to(student.dtype), grad_s, grad_t


@softmax_kl_op.register_fake
def _(student, teacher, row_weight, temperature, beta, reduction, backend, grad_student,
      grad_teacher):
    loss_shape = (student.shape[0],) if reduction == "none" else ()
    return (student.new_empty(loss_shape),
            student.new_empty(tuple(student.shape) if grad_student else (0,)),
            teacher.new_empty(tuple(teacher.shape) if grad_teacher else (0,)))


def _setup_context(ctx, inputs, output):
    reduction, grad_student, grad_teacher = inputs[5], inputs[7], inputs[8]
    _, grad_s, grad_t = output
    # The gradient outputs are internal: without this, backward would get (and autograd
    # allocate) zero (N, V) tensors as their "gradients", beside the stored ones.
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.computed = (grad_student, grad_teacher)
    ctx.save_for_backward(grad_s, grad_t)


def _scaled(grad: Tensor, upstream: Tensor) -> Tensor:
    upstream = upstream.to(grad.dtype)
    return grad.mul_(upstream) if _may_scale_in_place(grad) else grad * upstream


def _backward(ctx, grad_loss, _gs, _gt):
    if grad_loss is None:  # the loss did not reach what is being differentiated
        return (None,) * 9
    grad_s, grad_t = ctx.saved_tensors
    upstream = grad_loss[:, None] if ctx.reduction == "none" else grad_loss
    out = [None] * 9
    for i, (grad, computed) in enumerate(zip((grad_s, grad_t), ctx.computed)):
        if not ctx.needs_input_grad[i]:
            continue
        if not computed:
            raise RuntimeError("cex::softmax_kl was called without the gradient of input "
                               f"{i} ({'student' if i == 0 else 'teacher'}), so it kept none; "
                               "call cex_kernels.softmax_kl, which sets the flags")
        out[i] = _scaled(grad, upstream)
    return tuple(out)


softmax_kl_op.register_autograd(_backward, setup_context=_setup_context)


def kept_row_factor(lead, device, dtype, mask: Optional[Tensor], labels: Optional[Tensor],
                    ignore_index: int, reduction: str) -> Tensor:
    """Per-row factor, flattened: 0 for dropped rows (``mask`` False or ``labels ==
    ignore_index``), else 1, or 1 / (kept rows) for "batchmean". Computed on the device,
    so no host sync (and torch.compile traces it)."""
    keep = torch.ones(lead, dtype=torch.bool, device=device)
    if mask is not None:
        keep = keep & mask
    if labels is not None:
        keep = keep & (labels != ignore_index)
    keep = keep.reshape(-1)
    acc = _checks.accumulation_dtype(dtype)
    factor = keep.to(acc)
    if reduction == "batchmean":
        factor = factor / keep.sum().clamp(min=1).to(acc)
    return factor


def _dense_top_k_teacher(op: str, student: Tensor, top_k, vocab_size: Optional[int]) -> Tensor:
    """Teacher logits given as ``(values (..., k), indices (..., k))``: its distribution is
    the softmax over those k entries, i.e. every other logit is -inf. They are scattered
    into a -inf-filled ``(..., V)`` tensor (differentiable with respect to ``values``) and
    the dense kernels do the rest; -inf entries are exact there (0 log 0 = 0)."""
    if len(top_k) != 2:
        raise ValueError(f"cex_kernels.{op}: a top-k teacher is a pair (values, indices), got "
                         f"{len(top_k)} items")
    values, indices = top_k
    _checks.check_tensor(op, "teacher top-k values", values)
    if not isinstance(indices, Tensor) or indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"cex_kernels.{op}: teacher top-k indices must be an int64/int32 tensor, "
                        f"got {getattr(indices, 'dtype', type(indices).__name__)}")
    if not isinstance(student, Tensor) or student.dim() < 1:
        raise ValueError(f"cex_kernels.{op}: student_logits must be a (..., V) tensor")
    vocab = vocab_size if vocab_size is not None else student.shape[-1]
    if values.shape != indices.shape or values.shape[:-1] != student.shape[:-1]:
        raise ValueError(f"cex_kernels.{op}: top-k values {tuple(values.shape)} and indices "
                         f"{tuple(indices.shape)} must both be (..., k) with the leading dims "
                         f"of student_logits {tuple(student.shape)}")
    if not 1 <= values.shape[-1] <= vocab:
        raise ValueError(f"cex_kernels.{op}: top-k needs 1 <= k <= V={vocab}, got k={values.shape[-1]}")
    if indices.device != values.device:
        raise ValueError(f"cex_kernels.{op}: top-k values on {values.device}, indices on {indices.device}")
    if not torch.compiler.is_compiling() and indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"cex_kernels.{op}: top-k indices must be in [0, {vocab}), found "
                             f"values in [{lo}, {hi}]")
    dense = values.new_full((*values.shape[:-1], vocab), float("-inf"))
    return dense.scatter(-1, indices.long(), values)


def _divergence(op: str, student: Tensor, teacher: Tensor, beta: float, temperature: float,
                reduction: str, mask: Optional[Tensor], labels: Optional[Tensor],
                ignore_index: int, scale_by_t2: bool, vocab_size: Optional[int],
                backend: str) -> Tensor:
    if isinstance(teacher, (tuple, list)):
        teacher = _dense_top_k_teacher(op, student, teacher, vocab_size)
    for name, t in (("student_logits", student), ("teacher_logits", teacher)):
        _checks.check_tensor(op, name, t)
    dtype = _checks.check_same_dtype(op, student_logits=student, teacher_logits=teacher)
    extra = {}
    if mask is not None:
        extra["mask"] = mask
    if labels is not None:
        extra["labels"] = labels
    device = _checks.check_same_device(op, student_logits=student, teacher_logits=teacher,
                                       **extra)
    _checks.check_choice(op, "reduction", reduction, REDUCTIONS)
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"cex_kernels.{op}: temperature must be a positive number, "
                         f"got {temperature!r}")
    if student.dim() < 1 or teacher.dim() < 1 or student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(f"cex_kernels.{op}: student_logits {tuple(student.shape)} and "
                         f"teacher_logits {tuple(teacher.shape)} must have the same leading "
                         "dimensions (..., V)")
    v_s, v_t = student.shape[-1], teacher.shape[-1]
    if vocab_size is not None:
        if not 1 <= vocab_size <= min(v_s, v_t):
            raise ValueError(f"cex_kernels.{op}: vocab_size={vocab_size} must be in [1, "
                             f"min(student V={v_s}, teacher V={v_t})]")
        student, teacher = student[..., :vocab_size], teacher[..., :vocab_size]
    elif v_s != v_t:
        raise ValueError(f"cex_kernels.{op}: student vocabulary size {v_s} differs from teacher "
                         f"vocabulary size {v_t} (shapes {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}); pass vocab_size= to compare the first "
                         "vocab_size entries of both")
    elif v_s == 0:
        raise ValueError(f"cex_kernels.{op}: empty vocabulary, shape {tuple(student.shape)}")
    lead = student.shape[:-1]
    if mask is not None and (mask.dtype != torch.bool or mask.shape != lead):
        raise ValueError(f"cex_kernels.{op}: mask must be a bool tensor of shape {tuple(lead)} "
                         f"(True = keep the row), got {mask.dtype} {tuple(mask.shape)}")
    if labels is not None and (labels.dtype.is_floating_point or labels.dtype.is_complex
                               or labels.dtype == torch.bool or labels.shape != lead):
        raise ValueError(f"cex_kernels.{op}: labels must be an integer tensor of shape "
                         f"{tuple(lead)}, got {labels.dtype} {tuple(labels.shape)}")

    backend = _backends.resolve_backend(op, backend, device, dtype)
    unit = _NEEDS_UNIT_INNER_STRIDE[backend]
    s2 = _checks.as_rows(student, unit_inner_stride=unit)
    t2 = _checks.as_rows(teacher, unit_inner_stride=unit)
    weight = kept_row_factor(lead, device, dtype, mask, labels, ignore_index, reduction)
    if scale_by_t2:
        weight = weight * float(temperature) ** 2
    grad_student = torch.is_grad_enabled() and student.requires_grad
    grad_teacher = torch.is_grad_enabled() and teacher.requires_grad
    loss, _, _ = softmax_kl_op(s2, t2, weight, float(temperature), float(beta), reduction,
                               backend, grad_student, grad_teacher)
    return loss.reshape(lead) if reduction == "none" else loss


def softmax_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
               direction: str = "forward", reduction: str = "batchmean",
               mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
               ignore_index: int = -100, scale_by_t2: bool = True,
               vocab_size: Optional[int] = None, backend: str = "auto") -> Tensor:
    """Fused KL divergence between ``p_s = softmax(student_logits / T)`` and
    ``p_t = softmax(teacher_logits / T)``, row by row over the last dimension.

    Args:
        student_logits, teacher_logits: raw logits ``(..., V)``, one dtype and device.
        temperature: T > 0.
        direction: ``"forward"``: KL(p_t || p_s) (the classic distillation loss);
            ``"reverse"``: KL(p_s || p_t) (mode seeking, as in MiniLLM).
        reduction: ``"batchmean"`` (sum over kept rows / number of kept rows; 0, with a zero
            gradient, when no row is kept), ``"sum"``, or ``"none"`` (per-row losses of
            shape ``(...)``, 0 for dropped rows).
        mask: optional bool ``(...)``, True = keep the row.
        labels: optional integer ``(...)``; rows with ``labels == ignore_index`` are dropped.
        scale_by_t2: multiply the loss by T² (Hinton et al.), so gradient magnitudes do not
            shrink as T grows.
        vocab_size: compare only the first ``vocab_size`` entries of both (student and
            teacher vocabularies padded to different sizes); without it the sizes must match.
        teacher_logits may also be a top-k pair ``(values (..., k), indices (..., k))``
            (offline distillation from stored teacher outputs; indices distinct): the
            teacher distribution is the softmax over those k entries, the student's over
            the full vocabulary. The pair is scattered into a -inf-filled ``(..., V)`` tensor
            for the dense kernels (a sparse kernel that reads only the k entries is future
            work); reverse KL is then inf wherever the student has mass outside the k.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.

    The probabilities are never materialized: each row is read in one streaming pass for
    the softmax statistics and again for the loss and gradients. Accumulation is fp32
    (float64 for float64); the result has the logits' dtype. ``-inf`` logits are legal
    (0·log 0 = 0); a student ``-inf`` where the teacher has mass gives ``inf``; NaN
    propagates to its row. Gradients flow to the student, and to the teacher when it
    requires grad.
    """
    _checks.check_choice("softmax_kl", "direction", direction, DIRECTIONS)
    return _divergence("softmax_kl", student_logits, teacher_logits,
                       0.0 if direction == "forward" else 1.0, temperature, reduction, mask,
                       labels, ignore_index, scale_by_t2, vocab_size, backend)


def jsd(student_logits: Tensor, teacher_logits: Tensor, *, beta: float = 0.5,
        temperature: float = 1.0, reduction: str = "batchmean", mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None, ignore_index: int = -100, scale_by_t2: bool = True,
        vocab_size: Optional[int] = None, backend: str = "auto") -> Tensor:
    """Generalized Jensen-Shannon divergence, TRL GKD's ``generalized_jsd_loss`` convention.

    With ``p_s``, ``p_t`` as in :func:`softmax_kl`:

    * ``beta = 0``: KL(p_t || p_s) (forward KL);  ``beta = 1``: KL(p_s || p_t) (reverse KL);
    * otherwise ``beta·KL(p_t || m) + (1-beta)·KL(p_s || m)`` with the mixture
      ``m = beta·p_t + (1-beta)·p_s`` (TRL builds ``log m`` as
      ``logsumexp([log p_s + log(1-beta), log p_t + log beta])``). beta = 0.5 is the
      symmetric JSD.

    Other arguments as :func:`softmax_kl` (TRL's own function does not scale by T²; pass
    ``scale_by_t2=False`` to match it).
    """
    if not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"cex_kernels.jsd: beta must be a number in [0, 1], got {beta!r}")
    return _divergence("jsd", student_logits, teacher_logits, float(beta), temperature,
                       reduction, mask, labels, ignore_index, scale_by_t2, vocab_size, backend)
