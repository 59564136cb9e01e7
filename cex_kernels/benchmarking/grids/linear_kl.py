"""Benchmark grid of ``linear_kl``, in ``grids.OPS``.

Baselines: ``eager`` (the output layer materialized, then log-softmaxes + ``F.kl_div``),
``torch.compile`` of the same function, and Liger-Kernel's ``LigerFusedLinearJSD`` (which
takes the teacher as hidden states + head) when it imports and the device is CUDA.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from cex_kernels.benchmarking.spec import (Case, OpSpec, compiled, generator, impl_skip_reason,
                                           itemsize, our_backends, randn)
from cex_kernels.benchmarking.grids.softmax_kl import TEMPERATURE, eager_softmax_kl
from cex_kernels.benchmarking.measure import MiB

# Extra rows of ours with a smaller row-chunk budget: "<backend>/<label>".
CHUNKS = {"64MiB": 64 * MiB}
LIGER_JSD_BETA = 0.5  # LigerFusedLinearJSD's beta is in the open interval (0, 1) in old releases
_LIGER_MODULES = {}


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


def _linear_kl_inputs(case: Case, device: torch.device) -> dict:
    n, h, v = case.sizes["N"], case.sizes["H"], case.sizes["V"]
    gen = generator(device)
    hidden = randn((n, h), gen, device, case.dtype)
    weight = randn((v, h), gen, device, case.dtype, scale=h ** -0.5)  # unit-scale logits
    inputs = {"hidden": hidden, "weight": weight}
    if case.variant == "teacher_hidden":  # the teacher's head has the student's H
        inputs["teacher_hidden"] = randn((n, h), gen, device, case.dtype)
        inputs["teacher_weight"] = randn((v, h), gen, device, case.dtype, scale=2 * h ** -0.5)
    else:
        inputs["teacher_logits"] = randn((n, v), gen, device, case.dtype, scale=2.0)
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
    dtypes={"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.bfloat16,)},
    impls=(*our_backends("softmax_kl"), "cpu/64MiB", "triton/64MiB", "triton/tiled", "eager",
           "torch.compile", "liger"),
    variants={"cpu": ("teacher_logits",), "cuda": ("teacher_logits", "teacher_hidden")},
    skip_reason=impl_skip_reason, case_skip_reason=_linear_kl_case_skip,
    make_inputs=_linear_kl_inputs, make_step=_linear_kl_step, flops=_linear_kl_flops,
    min_bytes=_linear_kl_min_bytes, repeats={"cpu": (1, 3), "cuda": (3, 10)},
    metrics=("peak_memory", "memory_vs_eager", "flops", "gemm_fraction", "speedup",
             "vs_compile"),
    notes=f"Temperature {TEMPERATURE}, forward KL, batchmean; ours with the default chunk "
          "budget (64 MiB for fp32 on the CPU, 256 MiB otherwise) and with "
          "`chunk_bytes=64 MiB` (`<backend>/64MiB`). FLOPs: 2 N H V "
          "per output-layer product, fwd 1 product, fwd+bwd 3 (forward, d hidden, d weight), "
          "+1 for the teacher's head when the teacher is given as hidden states "
          "(`teacher_hidden`, its H = the student's); elementwise work not counted. "
          f"`liger` is LigerFusedLinearJSD (JSD, beta {LIGER_JSD_BETA}). Mem vs eager: this "
          "row's peak extra memory over eager's.")
