"""Autograd glue shared by the fused ops (the kernels themselves live elsewhere).

Every op computes its gradients in the forward pass, for a unit upstream gradient, and
keeps them for backward, which only scales them. Three rules follow, stated once here:

* **In place when nobody reads it again.** Backward scales the stored gradient in place
  when autograd frees the graph afterwards (no ``retain_graph``, no tracing), so the
  gradient costs no second tensor (:func:`scale_saved`).
* **fp16 keeps its range.** A gradient stored in fp16 after the reduction's divisor
  (1/N) flushes to zero where a loss scaler (``GradScaler``, 2^16) would have kept it:
  eager PyTorch multiplies by the upstream gradient *before* rounding to fp16. So fp16
  gradients are stored without the divisor and multiplied by a power-of-two *storage
  scale* S chosen from a bound on their magnitude (:func:`fp16_storage_scale`); backward
  multiplies by ``upstream * divisor / S`` in fp32 and rounds once, as eager does.
* **Double backward through the eager formula.** The stored gradients are closed forms,
  not graphs, so the gradient of a gradient (``create_graph=True`` followed by a second
  differentiation, e.g. a gradient penalty) cannot be formed from them. Each op therefore
  also keeps references to its inputs (no copies: they are alive during the forward pass
  anyway) and, when backward runs with ``create_graph=True``, recomputes its gradients
  with its eager PyTorch formula, differentiably (:func:`create_graph_requested`).
  ``torch.func`` transforms that differentiate (grad, jacrev, hessian, jvp) cannot run a
  custom op's autograd at all; the public functions run the eager formula there
  (:func:`under_functorch_differentiation`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def may_scale_in_place(grad: Tensor) -> bool:
    """True when autograd frees this graph after the current backward (no retain_graph)
    and nothing is tracing or differentiating the backward itself.

    Only then may backward scale the stored gradient in place: with retain_graph (gradcheck,
    several backward calls) it is needed again. Unknown (older torch, tracing) -> False.
    """
    if (torch.compiler.is_compiling() or torch.is_grad_enabled()  # create_graph=True
            or type(grad) is not torch.Tensor):  # fake/functional tensors: being traced
        return False
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    try:
        return keep_graph is not None and not keep_graph()
    except RuntimeError:  # not inside a graph task
        return False


def is_exactly_one(factor: Tensor) -> bool:
    """True when every entry of ``factor`` is exactly 1, read only where that costs no device
    sync and the tensor has values: a plain CPU tensor outside tracing (a fake or
    functorch-wrapped tensor, or a CUDA one, answers False)."""
    if (torch.compiler.is_compiling() or type(factor) is not torch.Tensor
            or factor.device.type != "cpu"
            or torch._C._functorch.is_functorch_wrapped_tensor(factor)):
        return False
    return bool((factor == 1).all())


def _broadcasts_to(shape, target) -> bool:
    """``torch.broadcast_shapes(shape, target) == target``, without its ~40 us per call."""
    if len(shape) > len(target):
        return False
    return all(s == 1 or s == t for s, t in zip(reversed(shape), reversed(target)))


def scale_saved(grad: Tensor, factor: Tensor) -> Tensor:
    """``grad * factor`` in ``grad``'s dtype, computed in fp32 and rounded once (in place
    when allowed). ``factor`` may be fp32 and broadcast (per-row upstream gradients).

    In place with a factor of exactly 1 (the usual upstream 1 in fp32, CPU), the pass is
    skipped: ``x * 1`` is ``x`` bit for bit (NaN, -0 and inf included), and the tensor
    returned is the same one ``mul_`` would return. With ``retain_graph`` a new tensor is
    returned as before (the saved one is read again and must not be aliased by ``.grad``)."""
    if factor.dtype != grad.dtype and grad.dtype in (torch.float32, torch.float64):
        factor = factor.to(grad.dtype)
    if may_scale_in_place(grad):
        if (grad.device == factor.device and _broadcasts_to(factor.shape, grad.shape)
                and is_exactly_one(factor)):
            return grad
        return grad.mul_(factor)
    return (grad * factor).to(grad.dtype)


# fp16's largest finite value is 65504; stored gradients are kept below 2^14 in magnitude
# so that scaling by a few units in backward cannot overflow before the final rounding.
_FP16_STORED_MAX = 2.0 ** 14


def fp16_storage_scale(bound: float) -> float:
    """The power of two S with ``S * bound <= 2^14`` (and ``2 S * bound > 2^14``): stored
    fp16 gradients whose magnitude is at most ``bound`` then use fp16's range fully.
    Powers of two multiply exactly, so the scale costs no accuracy."""
    if not bound > 0 or not math.isfinite(bound):
        return 1.0
    exponent = math.floor(math.log2(_FP16_STORED_MAX / bound))
    return 2.0 ** max(-126, min(126, exponent))


def create_graph_requested() -> bool:
    """Inside a backward: True when autograd is recording it (``create_graph=True``), so the
    gradients must be differentiable functions of the inputs."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def eager_gradients(loss: torch.Tensor, inputs, wanted, grad_loss, out: list) -> tuple:
    """Backward's outputs: ``out`` (the op's all-None gradient structure) with entry i, for i
    in ``wanted``, the differentiable gradient of an eager ``loss`` built from ``inputs``
    (the double-backward path), in input i's dtype."""
    grads = torch.autograd.grad(loss, [inputs[i] for i in wanted], grad_loss, create_graph=True)
    out = list(out)
    for i, g in zip(wanted, grads):
        out[i] = g.to(inputs[i].dtype)
    return tuple(out)


def under_functorch_differentiation() -> bool:
    """True inside a torch.func transform that differentiates (grad, vjp, jacrev, hessian,
    jvp, jacfwd). The custom ops' gradients are closed forms those transforms cannot use,
    so the public functions run the eager formula there (vmap alone keeps the kernels)."""
    get_stack = getattr(torch._C._functorch, "get_interpreter_stack", None)
    if get_stack is None or torch.compiler.is_compiling():  # dynamo cannot trace the query
        return False
    stack = get_stack() or ()
    kinds = torch._C._functorch.TransformType
    return any(level.key() in (kinds.Grad, kinds.Jvp) for level in stack)


def functorch_vmapped() -> bool:
    """True inside torch.func.vmap (where values cannot be read on the host)."""
    get_stack = getattr(torch._C._functorch, "get_interpreter_stack", None)
    if get_stack is None or torch.compiler.is_compiling():
        return False
    stack = get_stack() or ()
    return any(level.key() == torch._C._functorch.TransformType.Vmap for level in stack)


def save_tensors(ctx, *tensors) -> None:
    """``ctx.save_for_backward`` (with its check that nothing was modified in place), except
    for inference-mode tensors (e.g. a teacher run under ``torch.inference_mode``), which
    autograd refuses to save: those are kept as plain references. See :func:`saved_tensors`."""
    ctx.inference_tensors = {i: t for i, t in enumerate(tensors)
                             if t is not None and t.is_inference()}
    ctx.save_for_backward(*(None if i in ctx.inference_tensors else t
                            for i, t in enumerate(tensors)))


def saved_tensors(ctx) -> list:
    saved = list(ctx.saved_tensors)
    for i, t in ctx.inference_tensors.items():
        saved[i] = t
    return saved


def as_constant(t):
    """An inference-mode tensor cannot take part in a recorded computation (autograd would
    have to save it): use a normal copy of it there, as a constant."""
    return t.clone() if t is not None and t.is_inference() else t
