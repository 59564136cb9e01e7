"""What ``softmax_kl``/``jsd`` and ``linear_kl`` share: the per-row divergence kernel's
contract, the option checks, the row weights, and the top-k teacher.

**The math, stated once** (every other docstring and kernel comment points here). For one
row of student logits ``s`` and teacher logits ``t`` at temperature ``T``: ``z = s/T``,
``z' = t/T``, ``ls = log_softmax(z)``, ``lt = log_softmax(z')``, ``p = exp(ls)`` (student),
``q = exp(lt)`` (teacher), 0·log 0 = 0. Gradients are with respect to ``z`` and ``z'``
(those with respect to the logits are 1/T times them). Two families share a ``beta``, each
with ``beta = 0`` the forward and ``beta = 1`` the reverse KL:

* **KL**, ``beta = 0``: the forward KL of classic distillation, ``KL(q || p)``::

      L = Σ q (lt - ls)
      dL/dz = p - q               dL/dz' = q (lt - ls - L)

  ``beta = 1`` is the reverse KL ``KL(p || q)``, computed as ``beta = 0`` with the roles
  (and the gradients) swapped, so no kernel has a separate reverse mode.
* **Generalized JSD**, ``0 < beta < 1`` (TRL GKD's ``generalized_jsd_loss``): with the
  mixture ``m = beta·q + (1-beta)·p``, ``lm = log m`` (a logaddexp of ``lt + log beta`` and
  ``ls + log(1-beta)``, never -inf early)::

      Kt = Σ q (lt - lm)          Ks = Σ p (ls - lm)
      L = beta Kt + (1-beta) Ks
      dL/dz = (1-beta) p (ls - lm - Ks)       dL/dz' = beta q (lt - lm - Kt)

  beta = 0.5 is the symmetric JSD. As in TRL the value jumps at beta = 0: a tiny positive
  beta gives about beta·KL, not KL.
* **Symmetric KL**, ``symmetric`` and ``0 < beta < 1``: ``r·KL(q || p) + (1-r)·KL(p || q)``
  with the forward weight ``r = 1 - beta`` (``softmax_kl(direction="symmetric",
  forward_weight=r)``). With ``F = Σ q (lt - ls)`` and ``R = Σ p (ls - lt)``::

      L       = r F + (1-r) R = Σ (r q - (1-r) p)(lt - ls)
      dL/dz   = r (p - q) + (1-r) p (ls - lt - R)
      dL/dz'  = r q (lt - ls - F) + (1-r) (q - p)

  Both totals come from one pass over the row, the gradients (which need them) from a
  second. Where ``q = 0 < p``, R is +inf (the student has mass outside the teacher's
  support): the loss is inf, as for the reverse KL, with the same non-finite student
  gradient entries (its gradient's entries there are NaN, -inf elsewhere where p > 0).

Every backend implements one row kernel with the contract::

    fwd(student2d, teacher2d, row_weight, inv_temperature, beta, symmetric, grad_student,
        grad_teacher) -> (row_loss, grad_student, grad_teacher)

with ``beta`` in [0, 1) (``symmetric`` picks the symmetric KL over the JSD for
``beta > 0``; decided on beta in the accumulation dtype, so a weight that rounds to 0 never
multiplies an infinite R). ``row_loss[r] = w[r]·L_r`` and the gradients are
``w[r]/T · dL_r/dz`` and ``w[r]/T · dL_r/dz'`` (0 for rows with ``w[r] == 0``: those rows are
never read). ``w`` carries the row mask, T² and, except in fp16, the reduction's divisor (see ``_autograd``
for why fp16 differs). All backends take the log-softmax around the raw row max,
``(x - max x)/T``, and a kept row whose loss is NaN gets NaN in every entry of each
requested gradient (an inf loss is legal and left as it is).
"""
# No `from __future__ import annotations` here: torch 2.6 cannot infer a custom op's
# schema from string annotations.
from collections.abc import Mapping
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from cex_kernels import _backends, _checks
from cex_kernels.ops._autograd import (fp16_storage_scale, functorch_vmapped, scale_saved,
                                        under_functorch_differentiation)

REDUCTIONS = ("batchmean", "sum", "none")
DIRECTIONS = ("forward", "reverse", "symmetric")


class _UnitInnerStride(Mapping):
    """``{backend: needs a unit inner stride}``, read from the registry (for callers that
    index it by name; new code calls ``_backends.needs_unit_inner_stride``)."""

    def __getitem__(self, name):
        return _backends.needs_unit_inner_stride(name)

    def __iter__(self):
        return iter(_backends.names())

    def __len__(self):
        return len(_backends.names())


NEEDS_UNIT_INNER_STRIDE = _UnitInnerStride()


def divergence_rows(backend: str, student: Tensor, teacher: Tensor, row_weight: Tensor,
                    temperature: float, beta: float, symmetric: bool, grad_student: bool,
                    grad_teacher: bool, grad_student_out: Optional[Tensor] = None):
    """``(row_loss, grad_student, grad_teacher)`` from the backend's row kernel, in one
    launch; beta = 1 (reverse KL, also the symmetric KL with forward weight 0) is beta = 0
    with the roles, and the gradients, swapped. The symmetric KL with beta = 0 is the
    forward KL. ``grad_student_out``: where the student's gradient may go (it may be the
    student itself), taken only by backends with ``grad_into_logits`` and not for beta = 1;
    the gradient returned is the one to use."""
    kernel = _backends.kernel(backend, "softmax_kl")
    if (grad_student_out is not None and grad_student and beta != 1.0
            and _backends.get(backend).grad_into_logits):
        return kernel(student, teacher, row_weight, 1.0 / temperature, beta,
                      symmetric and beta > 0.0, grad_student, grad_teacher,
                      grad_student_out=grad_student_out)
    if beta == 1.0:
        rows, grad_t, grad_s = kernel(teacher, student, row_weight, 1.0 / temperature, 0.0,
                                      False, grad_teacher, grad_student)
    else:
        rows, grad_s, grad_t = kernel(student, teacher, row_weight, 1.0 / temperature, beta,
                                      symmetric and beta > 0.0, grad_student, grad_teacher)
    return rows, grad_s, grad_t


def check_reduction(op: str, reduction) -> str:
    if reduction == "mean":
        raise ValueError(f"cex_kernels.{op}: reduction='mean' is ambiguous for a divergence "
                         "(torch's kl_div averages over all N x V elements, TRL's jsd over "
                         "elements too); use 'batchmean', which here is the sum over kept "
                         "rows divided by the number of kept rows (a per-token mean), 'sum' "
                         "or 'none'")
    _checks.check_choice(op, "reduction", reduction, REDUCTIONS)
    return reduction


def check_options(op: str, *, temperature, reduction, ignore_index, scale_by_t2, backend):
    """The options every divergence takes, checked (at call or module construction).
    Returns ``(temperature, ignore_index, scale_by_t2)`` as Python scalars."""
    scale_by_t2 = _checks.check_bool(op, "scale_by_t2", scale_by_t2)
    temperature = _checks.check_temperature(op, temperature, scale_by_t2=scale_by_t2)
    check_reduction(op, reduction)
    ignore_index = _checks.check_int(op, "ignore_index", ignore_index)
    _backends.check_backend_name(op, backend)
    return temperature, ignore_index, scale_by_t2


def check_beta(op: str, beta) -> float:
    return _checks.check_real(op, "beta", beta, low=0.0, high=1.0)


def check_direction(op: str, direction, forward_weight) -> Tuple[float, bool]:
    """``direction`` (and ``forward_weight``, only with ``"symmetric"``; default 0.5) as the
    kernels' ``(beta, symmetric)``: forward (0, False), reverse (1, False), symmetric
    (1 - forward_weight, True)."""
    _checks.check_choice(op, "direction", direction, DIRECTIONS)
    if forward_weight is not None:
        if direction != "symmetric":
            raise ValueError(f"cex_kernels.{op}: forward_weight is the weight of the forward KL "
                             "in direction='symmetric'; got it with "
                             f"direction={direction!r}")
        forward_weight = _checks.check_real(op, "forward_weight", forward_weight, low=0.0,
                                            high=1.0)
    return direction_beta(direction, forward_weight)


def direction_beta(direction: str, forward_weight=None) -> Tuple[float, bool]:
    """``(beta, symmetric)`` for a checked ``softmax_kl`` direction: forward (0, False),
    reverse (1, False), symmetric (1 - forward_weight, True), forward_weight defaulting to
    0.5."""
    if direction == "symmetric":
        return 1.0 - (0.5 if forward_weight is None else float(forward_weight)), True
    return (0.0 if direction == "forward" else 1.0), False


def check_vocab_size(op: str, vocab_size) -> Optional[int]:
    return None if vocab_size is None else _checks.check_int(op, "vocab_size", vocab_size, low=1)


def kept_rows(lead, device, mask: Optional[Tensor], labels: Optional[Tensor],
              ignore_index: int) -> Tensor:
    """Flat bool (rows,): False for rows dropped by ``mask`` or ``labels == ignore_index``."""
    keep = torch.ones(lead, dtype=torch.bool, device=device)
    if mask is not None:
        keep = keep & mask
    if labels is not None:
        keep = keep & (labels != ignore_index)
    return keep.reshape(-1)


class RowWeights(NamedTuple):
    """``kernel``: the (rows,) weights the row kernel multiplies by; ``out_scale``: None, or
    (fp16) a 0-dim fp32 tensor that multiplies the kernel's loss and its stored gradients
    (the reduction's divisor over the power-of-two storage scale)."""
    kernel: Tensor
    out_scale: Optional[Tensor]


def row_weights(keep: Tensor, dtype: torch.dtype, reduction: str, coefficient: float,
                grad_bound: float) -> RowWeights:
    """Weights for kept rows (``keep``) under ``reduction``, times ``coefficient`` (T², a
    loss weight). ``grad_bound`` bounds the magnitude of the gradients the kernel writes
    for a unit weight; in fp16 it sizes the storage scale. Computed on the device: no host
    sync, and torch.compile traces it."""
    acc = _checks.accumulation_dtype(dtype)
    kept = keep.to(acc)
    count = keep.sum().clamp(min=1).to(acc)
    if dtype != torch.float16:
        factor = kept / count if reduction == "batchmean" else kept
        return RowWeights(factor * coefficient, None)
    scale = fp16_storage_scale(grad_bound * abs(coefficient)) if coefficient else 1.0
    divisor = 1.0 / count if reduction == "batchmean" else torch.ones((), dtype=acc,
                                                                          device=keep.device)
    return RowWeights(kept * (coefficient * scale), divisor / scale)


def reduce_row_loss(row_loss: Tensor, reduction: str, out_scale: Optional[Tensor]) -> Tensor:
    """A row-divergence op's loss from its kernel's row losses (``"none"``: per row)."""
    loss = row_loss if reduction == "none" else row_loss.sum()
    return loss if out_scale is None else loss * out_scale.to(loss.dtype)


def fake_row_outputs(student: Tensor, teacher: Tensor, reduction: str, grad_student: bool,
                     grad_teacher: bool):
    """A row-divergence op's ``(loss, grad_student, grad_teacher)`` shapes, for its fake."""
    acc = _checks.accumulation_dtype(student.dtype)
    return (student.new_empty((student.shape[0],) if reduction == "none" else (), dtype=acc),
            student.new_empty(tuple(student.shape) if grad_student else (0,)),
            teacher.new_empty(tuple(teacher.shape) if grad_teacher else (0,)))


def scale_stored_gradients(op: str, out: list, needed, computed, stored, grad_loss: Tensor,
                           reduction: str, out_scale: Optional[Tensor]) -> tuple:
    """A row-divergence op's backward: each needed input's stored unit gradient times the
    upstream gradient (per row for ``"none"``) and ``out_scale``, written into ``out``."""
    factor = grad_loss[:, None] if reduction == "none" else grad_loss
    if out_scale is not None:
        factor = factor.float() * out_scale
    for i in needed:
        if not computed[i]:
            raise RuntimeError(f"cex::{op} was called without the gradient of input {i} "
                               f"({'student' if i == 0 else 'teacher'}), so it kept none; "
                               f"call cex_kernels.{op}, which sets the flags")
        out[i] = scale_saved(stored[i], factor)
    return tuple(out)


class Rows(NamedTuple):
    """What :func:`prepare_rows` hands a row-divergence op: 2-D logits in the layout the
    backend needs, the row weights, which gradients to compute, and how to shape the result."""
    student: Tensor
    teacher: Tensor
    weights: RowWeights
    temperature: float
    grad_student: bool
    grad_teacher: bool
    backend: str
    lead: tuple
    out_dtype: torch.dtype

    def output(self, loss: Tensor, reduction: str) -> Tensor:
        loss = loss.to(self.out_dtype)
        return loss.reshape(self.lead) if reduction == "none" else loss


def prepare_rows(op: str, student: Tensor, teacher, *, temperature, reduction, mask, labels,
                 ignore_index, scale_by_t2, vocab_size, backend, eager, grad_bound):
    """The checks and preparation every divergence between two logit tensors shares
    (``softmax_kl``, ``jsd``, ``tvd``): options, a top-k teacher, dtypes under autocast,
    shapes and ``vocab_size``, row masks, the backend (resolved for ``op``'s kernel slot) and
    the row weights. ``grad_bound(grad_student, grad_teacher)`` bounds |dL/dz| at T = 1 (sizes
    fp16's storage scale). Returns :class:`Rows`; under a differentiating torch.func
    transform, ``eager(student, teacher, temperature=, reduction=, mask=, labels=,
    ignore_index=, scale_by_t2=)`` (the eager formula, differentiable) in the output dtype."""
    temperature, ignore_index, scale_by_t2 = check_options(
        op, temperature=temperature, reduction=reduction, ignore_index=ignore_index,
        scale_by_t2=scale_by_t2, backend=backend)
    vocab_size = check_vocab_size(op, vocab_size)
    if isinstance(teacher, (tuple, list)):
        teacher = dense_top_k_teacher(op, student, teacher, vocab_size)
    for name, t in (("student_logits", student), ("teacher_logits", teacher)):
        _checks.check_tensor(op, name, t)
    autocast = _checks.autocast_dtype(student.device) is not None
    if autocast and student.dtype != teacher.dtype:
        # Under autocast, as autocast does for its fp32 loss ops: compute in the wider dtype.
        wide = torch.promote_types(student.dtype, teacher.dtype)
        student, teacher = student.to(wide), teacher.to(wide)
    dtype = _checks.check_same_dtype(op, student_logits=student, teacher_logits=teacher)
    extra = {}
    if mask is not None:
        extra["mask"] = mask
    if labels is not None:
        extra["labels"] = labels
    _checks.check_row_selectors(op, student.shape[:-1], mask, labels)
    device = _checks.check_same_device(op, student_logits=student, teacher_logits=teacher,
                                       **extra)
    if student.dim() < 1 or teacher.dim() < 1 or student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(f"cex_kernels.{op}: student_logits {tuple(student.shape)} and "
                         f"teacher_logits {tuple(teacher.shape)} must have the same leading "
                         "dimensions (..., V)")
    v_s, v_t = student.shape[-1], teacher.shape[-1]
    if vocab_size is not None:
        if not vocab_size <= min(v_s, v_t):
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
    out_dtype = torch.float32 if autocast and dtype != torch.float64 else dtype

    if under_functorch_differentiation():  # torch.func: the eager formula, differentiable
        return eager(student, teacher, temperature=temperature, reduction=reduction, mask=mask,
                     labels=labels, ignore_index=ignore_index,
                     scale_by_t2=scale_by_t2).to(out_dtype)

    backend = _backends.resolve_backend(op, backend, device, dtype)
    unit = _backends.needs_unit_inner_stride(backend)
    grad_student = torch.is_grad_enabled() and student.requires_grad
    grad_teacher = torch.is_grad_enabled() and teacher.requires_grad
    keep = kept_rows(lead, device, mask, labels, ignore_index)
    weights = row_weights(keep, dtype, reduction, temperature ** 2 if scale_by_t2 else 1.0,
                          grad_bound=grad_bound(grad_student, grad_teacher) / temperature)
    return Rows(_checks.as_rows(student, unit_inner_stride=unit),
                _checks.as_rows(teacher, unit_inner_stride=unit), weights, temperature,
                grad_student, grad_teacher, backend, lead, out_dtype)


# --- the top-k teacher ----------------------------------------------------------------------

def check_top_k_entries(values: Tensor, indices: Tensor, vocab: int) -> None:
    """Indices in [0, vocab), and no index twice among entries whose value is not -inf.
    Reads the values (a host sync): the custom op runs it, so torch.compile keeps it."""
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"cex_kernels: top-k teacher indices must be in [0, {vocab}), found "
                             f"values in [{lo}, {hi}]")
        padding = values == float("-inf")
        # Padding entries get distinct negative keys, so only real entries can collide.
        slot = torch.arange(indices.shape[-1], device=indices.device).expand(indices.shape)
        keys = torch.where(padding, -1 - slot, indices.long()).sort(dim=-1).values
        repeated = keys[..., 1:] == keys[..., :-1]
        if bool(repeated.any()):
            row = repeated.any(-1).nonzero()[0].tolist()
            where = f"row {tuple(row)}: " if row else ""
            dup = keys[tuple(row)][1:][repeated[tuple(row)]][0].item()
            raise ValueError(f"cex_kernels: top-k teacher index {dup} appears more than once "
                             f"with a value other than -inf ({where}indices "
                             f"{indices[tuple(row)].tolist()}); give each index once, pad "
                             "with value -inf")


def top_k_dense(values: Tensor, indices: Tensor, vocab: int, out: Optional[Tensor] = None
                ) -> Tensor:
    """The scatter itself (unchecked): ``(..., vocab)`` logits, -inf off the support (into
    ``out`` when given)."""
    shape = (*values.shape[:-1], vocab)
    dense = values.new_empty(shape) if out is None else out
    dense.fill_(float("-inf"))
    # amax: a -inf pad pointing at a real entry's index leaves the real value in place.
    return dense.scatter_reduce_(-1, indices.long(), values, "amax", include_self=True)


@torch.library.custom_op("cex::top_k_to_dense", mutates_args=())
def top_k_to_dense(values: Tensor, indices: Tensor, vocab: int) -> Tensor:
    """``(values (..., k), indices (..., k))`` -> ``(..., vocab)`` logits, -inf off the support.

    Entries whose value is -inf contribute nothing wherever they point (the usual padding
    of a variable k); two entries with other values at one index are an error. Checked here,
    inside the op, so the checks also run under torch.compile (which treats the op as
    opaque) instead of being skipped there.
    """
    check_top_k_entries(values, indices, vocab)
    return top_k_dense(values, indices, vocab)


@top_k_to_dense.register_fake
def _(values, indices, vocab):
    return values.new_empty((*values.shape[:-1], vocab))


def _top_k_setup_context(ctx, inputs, output):
    values, indices, _ = inputs
    ctx.save_for_backward(values, indices)


def _top_k_backward(ctx, grad_dense):
    values, indices = ctx.saved_tensors
    grad = grad_dense.gather(-1, indices.long())
    return torch.where(values == float("-inf"), torch.zeros_like(grad), grad), None, None


top_k_to_dense.register_autograd(_top_k_backward, setup_context=_top_k_setup_context)


def dense_top_k_teacher(op: str, student, top_k, vocab_size: Optional[int]) -> Tensor:
    """Teacher logits given as ``(values (..., k), indices (..., k))``: its distribution is
    the softmax over those k entries, every other logit -inf. They are scattered into a
    -inf-filled ``(..., V)`` tensor (differentiable with respect to ``values``) and the dense
    kernels do the rest; -inf entries are exact there (0 log 0 = 0)."""
    if not isinstance(student, Tensor) or student.dim() < 1:
        raise ValueError(f"cex_kernels.{op}: student_logits must be a (..., V) tensor")
    check_top_k_pair(op, student.shape[:-1], top_k, "student_logits")
    values, indices = top_k
    vocab = vocab_size if vocab_size is not None else student.shape[-1]
    _checks.check_same_device(op, student_logits=student, **{"teacher top-k values": values,
                                                             "teacher top-k indices": indices})
    if under_functorch_differentiation():  # torch.func cannot differentiate the custom op
        if not functorch_vmapped():  # vmap cannot read values to check them
            check_top_k_entries(values, indices, vocab)
        return top_k_dense(values, indices, vocab)
    return top_k_to_dense(values, indices, int(vocab))


def check_top_k_pair(op: str, lead, top_k, student_name: str = "student_hidden") -> None:
    """``top_k`` is ``(values (*lead, k), indices (*lead, k))``, integer indices, k >= 1
    (the values' dtype and device are checked with the other inputs; the entries
    themselves by :func:`check_top_k_entries`, inside the ops)."""
    if not all(isinstance(x, Tensor) for x in top_k):
        raise TypeError(f"cex_kernels.{op}: teacher_logits must be a torch.Tensor or a top-k "
                        f"pair of tensors (values, indices), got a {type(top_k).__name__} of "
                        f"{[type(x).__name__ for x in top_k][:4]}")
    if len(top_k) != 2:
        raise ValueError(f"cex_kernels.{op}: a top-k teacher is a pair (values, indices), got "
                         f"{len(top_k)} tensors")
    values, indices = top_k
    _checks.check_tensor(op, "teacher top-k values", values)
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"cex_kernels.{op}: teacher top-k indices must be an int64/int32 tensor, "
                        f"got {indices.dtype}")
    if values.shape != indices.shape or values.shape[:-1] != tuple(lead):
        raise ValueError(f"cex_kernels.{op}: top-k values {tuple(values.shape)} and indices "
                         f"{tuple(indices.shape)} must both be (..., k) with the leading dims "
                         f"{tuple(lead)} of {student_name}")
    if values.shape[-1] < 1:  # (k may exceed V with -inf padding; repeats are checked)
        raise ValueError(f"cex_kernels.{op}: a top-k teacher needs k >= 1 entries per row, got 0")

