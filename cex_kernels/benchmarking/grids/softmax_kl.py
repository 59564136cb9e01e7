"""Benchmark grids of the losses of two logit tensors: ``softmax_kl`` (with its ``jsd``
variant) and ``tvd``, in ``grids.OPS``.

Baselines: ``eager`` (log-softmaxes + ``F.kl_div``; softmaxes + ``abs`` for the TVD),
``torch.compile`` of the same function, and Liger-Kernel when it imports and the device is
CUDA (``LigerKLDIVLoss`` with its log-softmaxes counted in; ``LigerJSD``; ``LigerTVDLoss``,
which takes probabilities, with its softmaxes counted in).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from cex_kernels.benchmarking.spec import (Case, OpSpec, compiled, generator, impl_skip_reason,
                                           itemsize, our_backends, randn)

TEMPERATURE = 1.0


def eager_softmax_kl(student_logits, teacher_logits, temperature: float = TEMPERATURE):
    """The eager baseline: KL(softmax(t/T) || softmax(s/T)), batchmean, times T²."""
    t2 = temperature * temperature
    return F.kl_div(F.log_softmax(student_logits / temperature, -1),
                    F.log_softmax(teacher_logits / temperature, -1), log_target=True,
                    reduction="batchmean") * t2


def eager_jsd(student_logits, teacher_logits, beta: float = 0.5,
              temperature: float = TEMPERATURE):
    """The eager generalized JSD (TRL GKD's generalized_jsd_loss), batchmean, times T²:
    beta KL(q || m) + (1 - beta) KL(p || m), log m = logsumexp of the weighted log-probs."""
    log_p = F.log_softmax(student_logits / temperature, -1)
    log_q = F.log_softmax(teacher_logits / temperature, -1)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(1 - beta), log_q + math.log(beta)]), 0)
    kl_q = F.kl_div(log_m, log_q, reduction="batchmean", log_target=True)
    kl_p = F.kl_div(log_m, log_p, reduction="batchmean", log_target=True)
    return (beta * kl_q + (1 - beta) * kl_p) * temperature * temperature


def _softmax_kl_inputs(case: Case, device: torch.device) -> dict:
    n, v = case.sizes["N"], case.sizes["V"]
    gen = generator(device)
    student = randn((n, v), gen, device, case.dtype)
    teacher = randn((n, v), gen, device, case.dtype, scale=2.0)
    student.requires_grad_(case.mode == "fwd+bwd")  # the teacher never needs a gradient
    return {"student": student, "teacher": teacher}


_LIGER_MODULES = {}


def _liger_kl_div(student_logits, teacher_logits, temperature: float = TEMPERATURE):
    """``LigerKLDIVLoss`` (batchmean, log targets) on the two log-softmaxes, times T²."""
    if "kl" not in _LIGER_MODULES:
        from liger_kernel.transformers.kl_div import LigerKLDIVLoss
        _LIGER_MODULES["kl"] = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    t2 = temperature * temperature
    return _LIGER_MODULES["kl"](F.log_softmax(student_logits / temperature, -1),
                                F.log_softmax(teacher_logits / temperature, -1)) * t2


def _liger_jsd(student_logits, teacher_logits):
    """``LigerJSD`` (beta 0.5) on the two log-softmaxes, times T²."""
    if "jsd" not in _LIGER_MODULES:
        from liger_kernel.transformers.jsd import LigerJSD
        _LIGER_MODULES["jsd"] = LigerJSD(beta=0.5)
    return _LIGER_MODULES["jsd"](F.log_softmax(student_logits / TEMPERATURE, -1),
                                 F.log_softmax(teacher_logits / TEMPERATURE, -1)) * TEMPERATURE ** 2


def _softmax_kl_step(impl: str, case: Case, inputs: dict) -> Callable[[], object]:
    """One timed call. fwd+bwd clears ``student.grad`` first, so every call allocates it.
    The ``jsd`` variant times the generalized JSD (beta 0.5) instead of forward KL."""
    import cex_kernels
    s, t = inputs["student"], inputs["teacher"]
    jsd = case.variant == "jsd"
    if impl == "eager":
        loss_fn = eager_jsd if jsd else eager_softmax_kl
    elif impl == "torch.compile":
        loss_fn = compiled(eager_jsd if jsd else eager_softmax_kl)
    elif impl == "liger":
        loss_fn = _liger_jsd if jsd else _liger_kl_div
    elif jsd:
        def loss_fn(s, t):
            return cex_kernels.jsd(s, t, beta=0.5, temperature=TEMPERATURE, backend=impl)
    else:
        def loss_fn(s, t):
            return cex_kernels.softmax_kl(s, t, temperature=TEMPERATURE, backend=impl)
    return _logits_step(loss_fn, case, s, t)


def _logits_step(loss_fn, case: Case, s, t) -> Callable[[], object]:
    """The timed call of a loss of two logit tensors: forward, or forward and backward
    with ``s.grad`` cleared first (so every call allocates it)."""
    if case.mode == "fwd":
        return lambda: loss_fn(s, t)

    def fwd_bwd():
        s.grad = None
        loss_fn(s, t).backward()
    return fwd_bwd


SOFTMAX_KL_FLOPS_PER_ELEMENT = {"fwd": 10, "fwd+bwd": 12}


def _softmax_kl_flops(case: Case) -> int:
    # A nominal count, for completeness (the op is memory-bound): per logit, 4 for each of
    # the two log-softmaxes (max, subtract, exp, sum) and 2 for the KL term; fwd+bwd +2 for
    # the gradient (p - q) * w.
    return SOFTMAX_KL_FLOPS_PER_ELEMENT[case.mode] * case.sizes["N"] * case.sizes["V"]


# Exponentials per logit element, as our CPU kernel evaluates them (csrc/cpu/softmax_kl.cpp):
# one per element of each of the two softmaxes, kept between the passes; the JSD adds the
# mixture's exp and log1p (counted as an exp) per mixture pass: 1 pass fwd, 2 with the
# gradient. The TVD: the two softmaxes' exponentials, kept the same way.
SOFTMAX_KL_EXPS_PER_ELEMENT = {("kl", "fwd"): 2, ("kl", "fwd+bwd"): 2,
                               ("jsd", "fwd"): 4, ("jsd", "fwd+bwd"): 6}
TVD_EXPS_PER_ELEMENT = 2


def _softmax_kl_exps(case: Case) -> int:
    per_element = SOFTMAX_KL_EXPS_PER_ELEMENT[(case.variant or "kl", case.mode)]
    return per_element * case.sizes["N"] * case.sizes["V"]


def _tvd_exps(case: Case) -> int:
    return TVD_EXPS_PER_ELEMENT * case.sizes["N"] * case.sizes["V"]


def _softmax_kl_min_bytes(case: Case) -> int:
    # Read both logits once; fwd+bwd also writes the student's gradient (N x V).
    elems = case.sizes["N"] * case.sizes["V"] * (3 if case.mode == "fwd+bwd" else 2)
    return elems * itemsize(case.dtype)


# What the grids of these memory-bound losses share.
_LOGITS_SPEC = dict(
    dtypes={"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.bfloat16, torch.float32)},
    repeats={"cpu": (1, 3), "cuda": (5, 20)}, roofline="bandwidth",
    metrics=("bandwidth", "bandwidth_fraction", "exp_fraction", "peak_memory",
             "memory_vs_eager", "speedup", "vs_compile"))

# Under the tables of both ops: what "% exp limit" counts.
_EXP_NOTE = ("% exp limit (CPU): the exponentials of one call (as our CPU kernel "
             "evaluates them: {count}) per second, over the measured fp32 exp rate (the "
             "C++ kernels' own Sleef routine on an L1-resident row, every thread at once); "
             "the op's other limit besides the copy bandwidth.")

SOFTMAX_KL = OpSpec(
    name="softmax_kl",
    shapes={"cpu": [dict(N=4096, V=32000), dict(N=1024, V=50257), dict(N=2048, V=128256)],
            "cuda": [dict(N=8192, V=131072), dict(N=16384, V=32000), dict(N=4096, V=256000)]},
    impls=(*our_backends("softmax_kl"), "eager", "torch.compile", "liger"),
    **_LOGITS_SPEC,
    # The JSD is timed on the GPU grid (the CPU grid keeps to forward KL: its reference
    # rows alone take minutes); `cex bench --op softmax_kl` on a CUDA machine runs both.
    variants={"cpu": ("kl",), "cuda": ("kl", "jsd")},
    skip_reason=impl_skip_reason, make_inputs=_softmax_kl_inputs, make_step=_softmax_kl_step,
    flops=_softmax_kl_flops, min_bytes=_softmax_kl_min_bytes, exps=_softmax_kl_exps,
    notes=f"Temperature {TEMPERATURE}, forward KL (variant kl) or JSD beta 0.5 (variant jsd), batchmean. GB/s: minimal bytes (read both "
          "logits once; fwd+bwd also writes the student's N x V gradient) over the median "
          "time; % copy BW: that over the measured copy bandwidth (read + write), the "
          "roofline of this memory-bound op. FLOPs (JSON only) are nominal: 10 per logit "
          "fwd, 12 fwd+bwd. " + _EXP_NOTE.format(
              count="2 per logit for the KL, 4 fwd and 6 fwd+bwd for the JSD, a log1p "
                    "counted as an exp"))


# --------------------------------------------------------------------------- tvd

def eager_tvd(student_logits, teacher_logits, temperature: float = TEMPERATURE):
    """The eager baseline: 1/2 sum |softmax(s/T) - softmax(t/T)|, mean over rows."""
    p = F.softmax(student_logits / temperature, -1)
    q = F.softmax(teacher_logits / temperature, -1)
    return 0.5 * (p - q).abs().sum(-1).mean()


def _liger_tvd(student_logits, teacher_logits):
    """``LigerTVDLoss`` (batchmean) on the two softmaxes (it takes probabilities)."""
    if "tvd" not in _LIGER_MODULES:
        from liger_kernel.transformers.tvd import LigerTVDLoss
        _LIGER_MODULES["tvd"] = LigerTVDLoss(reduction="batchmean")
    return _LIGER_MODULES["tvd"](F.softmax(student_logits / TEMPERATURE, -1),
                                 F.softmax(teacher_logits / TEMPERATURE, -1))


def _tvd_step(impl: str, case: Case, inputs: dict) -> Callable[[], object]:
    """One timed call (fwd+bwd clears ``student.grad`` first, as for softmax_kl)."""
    import cex_kernels
    if impl == "eager":
        loss_fn = eager_tvd
    elif impl == "torch.compile":
        loss_fn = compiled(eager_tvd)
    elif impl == "liger":
        loss_fn = _liger_tvd
    else:
        def loss_fn(s, t):
            return cex_kernels.tvd(s, t, temperature=TEMPERATURE, backend=impl)
    return _logits_step(loss_fn, case, inputs["student"], inputs["teacher"])


TVD_FLOPS_PER_ELEMENT = {"fwd": 16, "fwd+bwd": 24}


def _tvd_flops(case: Case) -> int:
    # Nominal (memory-bound op): per logit, 4 for each of the two softmax statistics (max,
    # subtract, exp, sum), 8 for the three sums of the distance pass (2 exp, |p - q|, the
    # sign, two products); fwd+bwd +8 for the gradient pass. The kernels' docstrings count
    # the same way (triton/softmax_kl.py tvd_fwd_kernel, csrc/cpu/softmax_kl.cpp).
    return TVD_FLOPS_PER_ELEMENT[case.mode] * case.sizes["N"] * case.sizes["V"]


TVD = OpSpec(
    name="tvd",
    shapes={"cpu": [dict(N=1024, V=32000), dict(N=512, V=128256)],
            "cuda": [dict(N=8192, V=131072), dict(N=4096, V=256000)]},
    # our_backends: the registry's backends with a TVD kernel (cuda has none)
    impls=(*our_backends("tvd"), "eager", "torch.compile", "liger"),
    **_LOGITS_SPEC,
    skip_reason=impl_skip_reason, make_inputs=_softmax_kl_inputs, make_step=_tvd_step,
    flops=_tvd_flops, min_bytes=_softmax_kl_min_bytes, exps=_tvd_exps,
    notes=f"Temperature {TEMPERATURE}, total variation distance of the softmaxes, mean over "
          "rows. GB/s: minimal bytes (read both logits once; fwd+bwd also writes the "
          "student's N x V gradient) over the median time; % copy BW: that over the measured "
          "copy bandwidth, the roofline of this memory-bound op. FLOPs (JSON only) are "
          "nominal: 16 per logit fwd, 24 fwd+bwd. The cuda backend has no TVD kernel; "
          "Liger's TVD takes probabilities, so its row counts the softmaxes. "
          + _EXP_NOTE.format(count="2 per logit"))
