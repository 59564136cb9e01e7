"""``projected_mse``: MSE between the student's hidden states and a projection of the teacher's.

Layers: ``projected_mse`` (public: checks, flattening, backend choice) → the custom op
``cex::projected_mse`` (schema, fake implementation, autograd) → a backend kernel with one
contract: ``fwd(student2d, teacher2d, projection, grad_scale, compute_grad) ->
(row_sq_err, grad)`` where ``grad = grad_scale * (student - teacher @ projection)``.

Gradient-in-forward: when only the student needs a gradient (curriculum extraction), the
kernel writes it during the forward pass, already scaled for the reduction, and backward
scales it in place by the incoming gradient, so the extra memory is that one (N, d_s)
tensor. When the teacher or the projection need gradients too, backward turns the same
tensor into them with two GEMMs: dT = -dS @ Pᵀ and dP = -Tᵀ @ dS.
"""
# No `from __future__ import annotations` here: torch 2.6 cannot infer a custom op's
# schema from string annotations.
from typing import Tuple

import torch
from torch import Tensor

from cex_kernels import _backends, _checks, reference
from cex_kernels.ops._autograd import (as_constant, create_graph_requested, eager_gradients,
                                       save_tensors, saved_tensors, scale_saved,
                                       under_functorch_differentiation)

REDUCTIONS = ("mean", "sum", "none")


def _grad_scale(reduction: str, numel: int, dtype: torch.dtype) -> float:
    # d(loss)/d(student) = grad_scale * (student - teacher @ projection) for a unit upstream
    # gradient ("none": per row, before the upstream gradient's own row factor). fp16 keeps
    # the gradient without the mean's 1/numel, which backward applies (see _autograd).
    if reduction == "mean" and dtype != torch.float16:
        return 2.0 / max(numel, 1)
    return 2.0


@torch.library.custom_op("cex::projected_mse", mutates_args=())
def projected_mse_op(student: Tensor, teacher: Tensor, projection: Tensor, reduction: str,
                     backend: str, compute_grad: bool) -> Tuple[Tensor, Tensor]:
    """2-D inputs. Returns ``(loss, grad_student_unit)``: the loss in the accumulation dtype
    (fp32; float64 for float64); the second output empty unless ``compute_grad``, and
    internal (the gradient for a unit upstream gradient; for fp16 with reduction "mean",
    before the 1/numel that backward applies)."""
    numel = student.numel()
    fwd = _backends.kernel(backend, "projected_mse")
    row_sq_err, grad = fwd(student, teacher, projection,
                           _grad_scale(reduction, numel, student.dtype), compute_grad)
    if reduction == "none":
        loss = row_sq_err
    elif reduction == "sum":
        loss = row_sq_err.sum()
    else:  # as F.mse_loss: NaN for an empty input
        loss = row_sq_err.sum() / numel
    return loss, grad


@projected_mse_op.register_fake
def _(student, teacher, projection, reduction, backend, compute_grad):
    loss_shape = (student.shape[0],) if reduction == "none" else ()
    grad_shape = tuple(student.shape) if compute_grad else (0,)
    acc = _checks.accumulation_dtype(student.dtype)
    return student.new_empty(loss_shape, dtype=acc), student.new_empty(grad_shape)


def _setup_context(ctx, inputs, output):
    student, teacher, projection, reduction, backend, compute_grad = inputs
    _, grad = output
    # The second output is internal: without this, autograd would allocate a zero
    # (N, d_s) gradient for it in backward, next to the stored one.
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.compute_grad = compute_grad
    # fp16 "mean": the stored gradient lacks the 1/numel (see _grad_scale).
    ctx.stored_factor = (1.0 / max(student.numel(), 1)
                         if reduction == "mean" and student.dtype == torch.float16 else None)
    # The inputs are kept (references) for the teacher/projection GEMMs and for a
    # create_graph backward.
    save_tensors(ctx, grad, student, teacher, projection)


def _eager_loss(reduction, student, teacher, projection):
    """The op's loss in differentiable eager PyTorch (for double backward)."""
    acc = _checks.accumulation_dtype(student.dtype)
    diff = student.to(acc) - teacher.to(acc) @ projection.to(acc)
    rows = (diff * diff).sum(-1)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / student.numel()


def _backward(ctx, grad_loss, _grad_of_grad):
    if not ctx.compute_grad:
        raise RuntimeError("cex::projected_mse was called with compute_grad=False, so it kept no "
                           "gradient; call cex_kernels.projected_mse, which sets it")
    grad, student, teacher, projection = saved_tensors(ctx)
    if grad_loss is None:  # the loss did not reach the output being differentiated
        return None, None, None, None, None, None
    inputs = (student, teacher, projection)
    needed = [i for i in range(3) if ctx.needs_input_grad[i]]
    if create_graph_requested():  # differentiable: recompute with the eager formula
        loss = _eager_loss(ctx.reduction, *(as_constant(x) for x in inputs))
        return eager_gradients(loss, inputs, needed, grad_loss, [None] * 6)
    # Scale the stored unit gradient (in place when nobody will read it again, so the
    # student's gradient costs no second (N, d_s) tensor).
    factor = grad_loss[:, None] if ctx.reduction == "none" else grad_loss
    if ctx.stored_factor is not None:
        factor = factor.float() * ctx.stored_factor
    grad_student = scale_saved(grad, factor)
    grad_teacher = grad_projection = None
    if ctx.needs_input_grad[1]:  # d/dT of ||S - T P||^2 terms: -dS @ Pᵀ
        grad_teacher = (grad_student @ projection.T).neg_()
    if ctx.needs_input_grad[2]:  # -Tᵀ @ dS
        grad_projection = (teacher.T @ grad_student).neg_()
    return (grad_student if ctx.needs_input_grad[0] else None, grad_teacher, grad_projection,
            None, None, None)


projected_mse_op.register_autograd(_backward, setup_context=_setup_context)


def projected_mse(student: Tensor, teacher: Tensor, projection: Tensor, *,
                  reduction: str = "mean", backend: str = "auto") -> Tensor:
    """Fused ``F.mse_loss(student, teacher @ projection, reduction=...)``.

    Args:
        student: ``(..., d_s)`` student hidden states.
        teacher: ``(..., d_t)`` teacher hidden states, same leading shape.
        projection: ``(d_t, d_s)``, e.g. from :func:`cex_kernels.random_projection`.
        reduction: ``"mean"`` (over all elements, as ``F.mse_loss``; NaN when there are none),
            ``"sum"``, or ``"none"``: each row's *sum* of squared errors, shape
            ``student.shape[:-1]`` (never an elementwise tensor).
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.

    The product ``teacher @ projection`` is never materialized (except by the ``reference``
    backend). All three inputs share one floating dtype and device; accumulation is fp32
    (float64 for float64) and the result has the inputs' dtype. Under ``torch.autocast``
    it computes as a matmul does there: inputs other than float64 in the autocast dtype,
    the loss in fp32. Any strides are accepted; a view with a non-unit last-dimension
    stride is copied for the compiled backends. NaN or inf in the inputs give NaN/inf in
    the loss; they are never masked.

    Gradients flow to every input that requires them, computed in the forward pass (fp16
    gradients keep fp16's range under a loss scaler). Higher-order gradients work: a
    backward with ``create_graph=True`` recomputes the gradient with the eager formula,
    differentiably, and ``torch.func.grad``/``jacrev``/``hessian`` run that formula.
    """
    op = "projected_mse"
    _checks.check_choice(op, "reduction", reduction, REDUCTIONS)
    _backends.check_backend_name(op, backend)
    for name, t in (("student", student), ("teacher", teacher), ("projection", projection)):
        _checks.check_tensor(op, name, t)
    low = _checks.autocast_dtype(student.device)
    autocast = low is not None
    if autocast:  # a matmul under autocast: inputs other than float64 in the autocast dtype
        student, teacher, projection = (x if x.dtype == torch.float64 else x.to(low)
                                        for x in (student, teacher, projection))
    dtype = _checks.check_same_dtype(op, student=student, teacher=teacher, projection=projection)
    device = _checks.check_same_device(op, student=student, teacher=teacher, projection=projection)
    if student.dim() < 1 or teacher.dim() < 1 or student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(f"cex_kernels.projected_mse: student {tuple(student.shape)} and teacher "
                         f"{tuple(teacher.shape)} must have the same leading dimensions "
                         "(..., d_s) and (..., d_t)")
    d_s, d_t = student.shape[-1], teacher.shape[-1]
    if projection.dim() != 2 or tuple(projection.shape) != (d_t, d_s):
        raise ValueError(f"cex_kernels.projected_mse: projection must be (d_t, d_s) = ({d_t}, {d_s}) "
                         f"for teacher {tuple(teacher.shape)} and student {tuple(student.shape)}, "
                         f"got {tuple(projection.shape)}")
    # The loss in the inputs' dtype; under autocast fp32, as autocast's mse_loss.
    out_dtype = torch.float32 if autocast and dtype != torch.float64 else dtype
    if under_functorch_differentiation():  # torch.func: the eager formula, differentiable
        return reference.projected_mse(student, teacher, projection, reduction).to(out_dtype)
    backend = _backends.resolve_backend(op, backend, device, dtype)
    unit = _backends.needs_unit_inner_stride(backend)
    s2 = _checks.as_rows(student, unit_inner_stride=unit)
    t2 = _checks.as_rows(teacher, unit_inner_stride=unit)
    p2 = _checks.as_rows(projection, unit_inner_stride=unit)
    compute_grad = torch.is_grad_enabled() and (
        student.requires_grad or teacher.requires_grad or projection.requires_grad)
    loss, _ = projected_mse_op(s2, t2, p2, reduction, backend, compute_grad)
    loss = loss.to(out_dtype)
    return loss.reshape(student.shape[:-1]) if reduction == "none" else loss
