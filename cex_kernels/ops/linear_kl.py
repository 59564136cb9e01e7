"""``linear_kl``: the student's output layer and the KL/JSD distillation loss, fused.

``logits = hidden @ weight.T + bias`` (N x V, V = 32k-256k) is the largest tensor of
language-model distillation; this op never builds it for all rows at once. Two algorithms:

* ``"chunked"``: the generic fused-linear driver (``ops/_fused_linear.py``, custom op
  ``cex::linear_loss_chunked``) with the KL family's row kernels (``ops/_divergence.py``)
  registered as the row loss "kl". Extra memory O(chunk x V).
* ``"tiled"``: the vocabulary-tiled Triton kernels (``triton/linear_kl.py``, custom op
  ``cex::linear_kl_tiled``), which keep only per-row statistics: extra memory O(N).

Cost: the two output-layer GEMMs of the forward pass (``2 N V H`` FLOPs each for student
and teacher head) plus the two of the backward pass (``4 N V H``), done once; the KL pass
reads each logit chunk once more from cache (the tiled algorithm: one more ``2 N V H``).
"""
# No `from __future__ import annotations` here: torch 2.6 cannot infer a custom op's
# schema from string annotations.
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from cex_kernels import _backends, _checks, reference
from cex_kernels.ops import _divergence, _fused_linear
from cex_kernels.ops._fused_linear import DEFAULT_CHUNK_BYTES, Prepared  # noqa: F401

ALGORITHMS = ("auto", "chunked", "tiled")


def _kl_rows(backend, student, teacher, row_weight, temperature, beta, symmetric, want_grad,
            grad_out=None):
    rows, grad, _ = _divergence.divergence_rows(backend, student, teacher, row_weight,
                                                temperature, beta, symmetric, want_grad, False,
                                                grad_student_out=grad_out)
    return rows, grad


_fused_linear.register_row_loss("kl", _kl_rows, reference.generalized_jsd_rows)


def _tiled_pass(hidden, weight, bias, teacher_logits, kd_weight, ce_weight, labels,
                soft_weight, hard_weight, temperature, beta, symmetric, want_grad, want_parts):
    """The vocabulary-tiled Triton kernels (``triton/linear_kl.py``): O(N) extra memory.
    Returns per-row divergence and cross-entropy and the gradients (fp32)."""
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


@torch.library.custom_op("cex::linear_kl_tiled", mutates_args=())
def linear_kl_tiled_op(
        hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher: List[Tensor],
        kd_weight: Tensor, ce_weight: Optional[Tensor], labels: Optional[Tensor],
        out_scale: Optional[Tensor], soft_weight: float, hard_weight: float, temperature: float,
        beta: float, symmetric: bool, reduction: str, compute_grad: bool, want_parts: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The tiled algorithm; arguments and returns as every fused-linear op's
    (``ops/_fused_linear.py``), ``teacher`` = ``[teacher logits (N, V)]``; beta 0 or 1,
    or symmetric."""
    _fused_linear.check_labels("linear_kl", labels, ce_weight, weight.shape[0])
    want_grad = compute_grad and reduction != "none"
    with _fused_linear.no_autocast(hidden.device):
        rows = _tiled_pass(hidden, weight, bias, teacher[0], kd_weight, ce_weight, labels,
                           soft_weight, hard_weight, temperature, beta, symmetric, want_grad,
                           want_parts)
    return _fused_linear.finish(hidden, weight, rows, out_scale, soft_weight, hard_weight,
                                reduction, want_grad)


@linear_kl_tiled_op.register_fake
def _(hidden, weight, bias, teacher, kd_weight, ce_weight, labels, out_scale, soft_weight,
      hard_weight, temperature, beta, symmetric, reduction, compute_grad, want_parts):
    return _fused_linear.fake_outputs(hidden, weight, bias, reduction, compute_grad)


_fused_linear.register_autograd(linear_kl_tiled_op, "cex::linear_kl_tiled",
                                lambda inputs: (_fused_linear.ROW_LOSSES["kl"], "logits"))


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
    chunk_bytes = _fused_linear.check_chunk_bytes(op, chunk_bytes)
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
              scale_by_t2: bool = True, chunk_bytes: Optional[int] = None,
              algorithm: str = "auto", backend: str = "auto", return_parts: bool = False):
    """Distillation loss of ``student_hidden @ student_weight.T + student_bias`` against a
    teacher, without materializing the student's (N, V) logits.

    The teacher is either ``teacher_logits (..., V)`` or its last hidden states and head,
    ``teacher_hidden (..., H_t)`` with ``teacher_weight (V, H_t)`` and ``teacher_bias``
    (then its logits are built chunk by chunk too), or a top-k pair
    ``teacher_logits=(values (..., k), indices (..., k))`` as :func:`cex_kernels.softmax_kl`
    takes it (offline distillation from stored teacher outputs): the teacher distribution
    is the softmax over those entries; -inf values are padding; an index given twice with
    other values is a ``ValueError``. The chunked algorithm scatters the pair into a dense
    row block one chunk at a time, so neither the student's full logits nor a dense
    teacher ever exist; reverse KL (and the symmetric KL with forward weight < 1) is inf
    wherever the student has mass outside the k. The teacher is a constant: no gradient
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
    temporaries (``None``, the default: 64 MiB for fp32/float64 CPU inputs, 256 MiB
    otherwise) with the backend's softmax-KL kernel between two BLAS GEMMs; ``"tiled"``
    (Triton backend; teacher given as dense logits, not top-k;
    forward, reverse or symmetric KL, not the JSD) keeps only per-row statistics and recomputes logit tiles, so its extra memory is O(N)
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

    def eager(h, w, t, th, tw, b, tb):
        return reference.linear_kl(
            h, w, t, teacher_hidden=th, teacher_weight=tw, student_bias=b, teacher_bias=tb,
            temperature=temperature, beta=beta_value, symmetric=symmetric,
            reduction=reduction, mask=mask, labels=labels, ignore_index=opts["ignore_index"],
            hard_label_weight=hard, soft_label_weight=soft, scale_by_t2=opts["scale_by_t2"],
            return_parts=True)

    # |dL/dz| per logit: 2 for the forward KL and the JSD, while the log-ratio side of
    # reverse (and symmetric) KL is unbounded in principle: 128 leaves room for a log-ratio
    # of 64 (see softmax_kl's _grad_bound).
    grad_bound = 128.0 if beta_value == 1.0 or symmetric else 2.0
    prep = _fused_linear.prepare(
        op, student_hidden, student_weight, student_bias, teacher_logits, teacher_hidden,
        teacher_weight, teacher_bias, mask=mask, labels=labels,
        ignore_index=opts["ignore_index"], temperature=temperature, reduction=reduction,
        scale_by_t2=opts["scale_by_t2"], soft=soft, hard=hard, return_parts=return_parts,
        grad_bound=grad_bound, backend=backend, eager=eager,
        unit_teacher_stride=lambda b: _backends.needs_unit_inner_stride(b)
        or opts["algorithm"] == "tiled")
    if not isinstance(prep, Prepared):
        return prep
    common = (prep.hidden, prep.weight, prep.bias, prep.teacher, prep.kd_weight,
              prep.ce_weight, prep.labels, prep.out_scale, soft, hard, temperature, beta_value,
              symmetric, reduction, prep.compute_grad, return_parts)
    if opts["algorithm"] == "tiled":
        why = ("it needs backend='triton'" if prep.backend != "triton" else
               "it does not take a top-k teacher (teacher_logits=(values, indices)); use "
               "algorithm='chunked', which densifies the teacher one chunk at a time"
               if prep.teacher_kind == "top_k" else
               "it needs the teacher as teacher_logits" if prep.teacher_kind != "logits" else
               "it computes forward, reverse or symmetric KL, not the generalized JSD"
               if beta_value not in (0.0, 1.0) and not symmetric else "")
        if why:
            raise ValueError(f"cex_kernels.linear_kl: algorithm='tiled' is not available here: {why}")
        common = (common[0], _checks.as_rows(prep.weight, unit_inner_stride=True)) + common[2:]
        result = linear_kl_tiled_op(*common)
    else:
        n_chunk = _fused_linear.chunk_rows(prep, opts["chunk_bytes"])
        result = _fused_linear.linear_loss_chunked_op(*common, prep.teacher_kind, "kl",
                                                      prep.backend, n_chunk)
    return _fused_linear.outputs(prep, result, reduction, return_parts)
