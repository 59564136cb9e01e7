"""Benchmark grids of ``softmax_kl``, ``tvd`` and ``linear_kl`` (registered in ``bench_specs.OPS``).

Baselines: ``eager`` (log-softmaxes + ``F.kl_div``, the output layer materialized for
``linear_kl``), ``torch.compile`` of the same function, and Liger-Kernel when it imports
and the device is CUDA (``LigerKLDIVLoss`` with its log-softmaxes counted in,
``LigerTVDLoss`` with its softmaxes;
``LigerFusedLinearJSD``, which takes the teacher as hidden states + head).
"""
from __future__ import annotations

import math

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from cex_kernels.bench_core import Case, OpSpec, backend_skip_reason, compiled, itemsize
from cex_kernels.bench_utils import MiB

TEMPERATURE = 1.0
# Extra rows of ours with a smaller row-chunk budget: "<backend>/<label>".
CHUNKS = {"64MiB": 64 * MiB}
LIGER_JSD_BETA = 0.5  # LigerFusedLinearJSD's beta is in the open interval (0, 1) in old releases


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


def eager_linear_kl(hidden, weight, teacher_logits):
    """Eager: the whole (N, V) logits ``hidden @ weight.T``, then :func:`eager_softmax_kl`."""
    return eager_softmax_kl(hidden @ weight.T, teacher_logits)


def eager_linear_kl_teacher_hidden(hidden, weight, teacher_hidden, teacher_weight):
    """Eager with the teacher as hidden states + head (no gradient reaches the teacher)."""
    return eager_softmax_kl(hidden @ weight.T, teacher_hidden @ teacher_weight.T)


def _split_impl(impl: str):
    """``"cpu/64MiB"`` -> ("cpu", 64 MiB); ``"cpu"`` -> ("cpu", None); ``"triton/tiled"`` ->
    ("triton", "tiled") (linear_kl's vocabulary-tiled algorithm)."""
    backend, _, chunk = impl.partition("/")
    if chunk == "tiled":
        return backend, "tiled"
    return backend, (CHUNKS[chunk] if chunk else None)


def _liger_skip_reason(device: torch.device) -> Optional[str]:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return "liger_kernel is not installed (`pip install liger-kernel`; it needs CUDA)"
    if device.type != "cuda":
        return "Liger-Kernel's Triton kernels need a CUDA device"
    return None


def _skip_reason(impl: str, device: torch.device) -> Optional[str]:
    backend, _ = _split_impl(impl)
    if backend in ("eager", "torch.compile", "reference"):
        return None
    if backend == "liger":
        return _liger_skip_reason(device)
    return backend_skip_reason(backend, device)


def _randn(shape, gen, device, dtype, scale=1.0):
    out = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    return (out * scale if scale != 1.0 else out).to(dtype)


def _generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)


# --------------------------------------------------------------------------- softmax_kl

def _softmax_kl_inputs(case: Case, device: torch.device) -> dict:
    n, v = case.sizes["N"], case.sizes["V"]
    gen = _generator(device)
    student = _randn((n, v), gen, device, case.dtype)
    teacher = _randn((n, v), gen, device, case.dtype, scale=2.0)
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


def _softmax_kl_min_bytes(case: Case) -> int:
    # Read both logits once; fwd+bwd also writes the student's gradient (N x V).
    elems = case.sizes["N"] * case.sizes["V"] * (3 if case.mode == "fwd+bwd" else 2)
    return elems * itemsize(case.dtype)


# What the grids of the memory-bound losses of two logit tensors share.
_LOGITS_SPEC = dict(
    dtypes={"cpu": (torch.float32,), "cuda": (torch.bfloat16, torch.float32)},
    impls=("cpu", "triton", "cuda", "reference", "eager", "torch.compile", "liger"),
    repeats={"cpu": (1, 3), "cuda": (5, 20)}, roofline="bandwidth",
    metrics=("bandwidth", "bandwidth_fraction", "peak_memory", "memory_vs_eager", "speedup"))

SOFTMAX_KL = OpSpec(
    name="softmax_kl",
    shapes={"cpu": [dict(N=4096, V=32000), dict(N=1024, V=50257), dict(N=2048, V=128256)],
            "cuda": [dict(N=8192, V=131072), dict(N=16384, V=32000), dict(N=4096, V=256000)]},
    **_LOGITS_SPEC,
    # The JSD is timed on the GPU grid (the CPU grid keeps to forward KL: its reference
    # rows alone take minutes); `cex bench --op softmax_kl` on a CUDA machine runs both.
    variants={"cpu": ("kl",), "cuda": ("kl", "jsd")},
    skip_reason=_skip_reason, make_inputs=_softmax_kl_inputs, make_step=_softmax_kl_step,
    flops=_softmax_kl_flops, min_bytes=_softmax_kl_min_bytes,
    notes=f"Temperature {TEMPERATURE}, forward KL (variant kl) or JSD beta 0.5 (variant jsd), batchmean. GB/s: minimal bytes (read both "
          "logits once; fwd+bwd also writes the student's N x V gradient) over the median "
          "time; % copy BW: that over the measured copy bandwidth (read + write), the "
          "roofline of this memory-bound op. FLOPs (JSON only) are nominal: 10 per logit "
          "fwd, 12 fwd+bwd.")


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


def _tvd_skip_reason(impl: str, device: torch.device) -> Optional[str]:
    if impl in ("eager", "torch.compile", "reference", "liger"):
        return _skip_reason(impl, device)
    return backend_skip_reason(impl, device, kernel="tvd")  # cuda has no TVD kernel


def _tvd_step(impl: str, case: Case, inputs: dict) -> Callable[[], object]:
    """One timed call (fwd+bwd clears ``student.grad`` first, as for softmax_kl)."""
    import cex_kernels
    s, t = inputs["student"], inputs["teacher"]
    if impl == "eager":
        loss_fn = eager_tvd
    elif impl == "torch.compile":
        loss_fn = compiled(eager_tvd)
    elif impl == "liger":
        loss_fn = _liger_tvd
    else:
        def loss_fn(s, t):
            return cex_kernels.tvd(s, t, temperature=TEMPERATURE, backend=impl)
    return _logits_step(loss_fn, case, s, t)


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
    **_LOGITS_SPEC,
    skip_reason=_tvd_skip_reason, make_inputs=_softmax_kl_inputs, make_step=_tvd_step,
    flops=_tvd_flops, min_bytes=_softmax_kl_min_bytes,
    notes=f"Temperature {TEMPERATURE}, total variation distance of the softmaxes, mean over "
          "rows. GB/s: minimal bytes (read both logits once; fwd+bwd also writes the "
          "student's N x V gradient) over the median time; % copy BW: that over the measured "
          "copy bandwidth, the roofline of this memory-bound op. FLOPs (JSON only) are "
          "nominal: 16 per logit fwd, 24 fwd+bwd. The cuda backend has no TVD kernel "
          "(skipped); Liger's TVD takes probabilities, so its row counts the softmaxes.")


# --------------------------------------------------------------------------- linear_kl

def _linear_kl_inputs(case: Case, device: torch.device) -> dict:
    n, h, v = case.sizes["N"], case.sizes["H"], case.sizes["V"]
    gen = _generator(device)
    hidden = _randn((n, h), gen, device, case.dtype)
    weight = _randn((v, h), gen, device, case.dtype, scale=h ** -0.5)  # unit-scale logits
    inputs = {"hidden": hidden, "weight": weight}
    if case.variant == "teacher_hidden":  # the teacher's head has the student's H
        inputs["teacher_hidden"] = _randn((n, h), gen, device, case.dtype)
        inputs["teacher_weight"] = _randn((v, h), gen, device, case.dtype, scale=2 * h ** -0.5)
    else:
        inputs["teacher_logits"] = _randn((n, v), gen, device, case.dtype, scale=2.0)
    for name in ("hidden", "weight"):
        inputs[name].requires_grad_(case.mode == "fwd+bwd")
    return inputs


def _liger_fused_linear_jsd(hidden, weight, teacher_hidden, teacher_weight):
    if "linear_jsd" not in _LIGER_MODULES:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
        _LIGER_MODULES["linear_jsd"] = LigerFusedLinearJSD(jsd_beta=LIGER_JSD_BETA,
                                                           temperature=TEMPERATURE)
    return _LIGER_MODULES["linear_jsd"](hidden, weight, teacher_hidden, teacher_weight)


def _linear_kl_step(impl: str, case: Case, inputs: dict) -> Callable[[], object]:
    """One timed call; fwd+bwd clears both gradients first (each call allocates them)."""
    import cex_kernels
    h, w = inputs["hidden"], inputs["weight"]
    hidden_teacher = case.variant == "teacher_hidden"
    teacher = ((inputs["teacher_hidden"], inputs["teacher_weight"]) if hidden_teacher
               else (inputs["teacher_logits"],))
    if impl in ("eager", "torch.compile"):
        fn = eager_linear_kl_teacher_hidden if hidden_teacher else eager_linear_kl
        loss_fn = fn if impl == "eager" else compiled(fn)
    elif impl == "liger":
        loss_fn = _liger_fused_linear_jsd
    else:
        backend, chunk = _split_impl(impl)
        kwargs = {"backend": backend, "temperature": TEMPERATURE}
        if chunk == "tiled":
            kwargs["algorithm"] = "tiled"
        elif chunk is not None:
            kwargs["chunk_bytes"] = chunk

        def loss_fn(h, w, *teacher):
            if hidden_teacher:
                return cex_kernels.linear_kl(h, w, teacher_hidden=teacher[0],
                                             teacher_weight=teacher[1], **kwargs)
            return cex_kernels.linear_kl(h, w, teacher[0], **kwargs)
    if case.mode == "fwd":
        return lambda: loss_fn(h, w, *teacher)

    def fwd_bwd():
        h.grad = w.grad = None
        loss_fn(h, w, *teacher).backward()
    return fwd_bwd


def _linear_kl_case_skip(impl: str, case: Case) -> Optional[str]:
    if impl == "liger" and case.variant != "teacher_hidden":
        return "LigerFusedLinearJSD takes the teacher as hidden states + head, not logits"
    if impl == "triton/tiled" and case.variant == "teacher_hidden":
        return "the tiled algorithm takes the teacher as logits"
    return None


def _linear_kl_flops(case: Case) -> int:
    # 2 N H V per output-layer product: fwd 1 (logits), fwd+bwd 3 (+ d hidden, d weight);
    # the teacher's head adds one product when the teacher is given as hidden states.
    # The softmax/KL elementwise work is not counted.
    z = case.sizes
    products = (1 if case.mode == "fwd" else 3) + (case.variant == "teacher_hidden")
    return products * 2 * z["N"] * z["H"] * z["V"]


def _linear_kl_min_bytes(case: Case) -> int:
    # Read hidden (N H), weight (V H) and the teacher (logits N V, or hidden N H + head V H)
    # once; fwd+bwd also writes d hidden (N H) and d weight (V H).
    n, h, v = (case.sizes[k] for k in ("N", "H", "V"))
    elems = n * h + v * h + ((n * h + v * h) if case.variant == "teacher_hidden" else n * v)
    if case.mode == "fwd+bwd":
        elems += n * h + v * h
    return elems * itemsize(case.dtype)


LINEAR_KL = OpSpec(
    name="linear_kl",
    shapes={"cpu": [dict(N=2048, H=256, V=32000), dict(N=1024, H=512, V=50257)],
            "cuda": [dict(N=8192, H=4096, V=131072), dict(N=4096, H=2048, V=32000)]},
    dtypes={"cpu": (torch.float32,), "cuda": (torch.bfloat16,)},
    impls=("cpu", "cpu/64MiB", "triton", "triton/64MiB", "triton/tiled", "cuda", "reference",
           "eager", "torch.compile", "liger"),
    variants={"cpu": ("teacher_logits",), "cuda": ("teacher_logits", "teacher_hidden")},
    skip_reason=_skip_reason, case_skip_reason=_linear_kl_case_skip,
    make_inputs=_linear_kl_inputs, make_step=_linear_kl_step, flops=_linear_kl_flops,
    min_bytes=_linear_kl_min_bytes, repeats={"cpu": (1, 3), "cuda": (3, 10)},
    metrics=("peak_memory", "memory_vs_eager", "flops", "gemm_fraction", "speedup"),
    notes=f"Temperature {TEMPERATURE}, forward KL, batchmean; ours with the default chunk "
          "budget (256 MiB) and with `chunk_bytes=64 MiB` (`<backend>/64MiB`). FLOPs: 2 N H V "
          "per output-layer product, fwd 1 product, fwd+bwd 3 (forward, d hidden, d weight), "
          "+1 for the teacher's head when the teacher is given as hidden states "
          "(`teacher_hidden`, its H = the student's); elementwise work not counted. "
          f"`liger` is LigerFusedLinearJSD (JSD, beta {LIGER_JSD_BETA}). Mem vs eager: this "
          "row's peak extra memory over eager's.")

__all__ = ["SOFTMAX_KL", "LINEAR_KL", "eager_softmax_kl", "eager_linear_kl",
           "eager_linear_kl_teacher_hidden", "TEMPERATURE"]
