"""Benchmark grid for one whole curriculum-extraction training step (``cex bench --op train_step``).

A step of each phase on a small MLP "language model" pair (embedding, residual GELU
blocks, output head; the teacher wider and deeper):

* ``hidden_phase``: teacher forward to its last block under ``inference_mode``, student
  forward to its last block, ``MSE(student_hidden, teacher_hidden @ P)``, backward, SGD
  step. Ours: :func:`cex_kernels.projected_mse`; eager: ``F.mse_loss(s, t @ P)``.
* ``final_phase``: teacher forward to its logits, student forward to its last hidden
  state, KL between the softmaxes at temperature 2 through the student's head, backward,
  SGD step. Ours: :func:`cex_kernels.linear_kl` (the student's logits never materialized);
  eager: ``head(h)``, ``log_softmax`` twice and ``kl_div``.

``torch.compile`` compiles the eager loss function (the models run eagerly in every
implementation, so the rows differ only in the loss). FLOPs are the step's matrix
products: teacher forward, student forward and backward (x3), and the loss's own product.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cex_kernels.benchmarking.spec import Case, OpSpec, compiled

TEMPERATURE = 2.0


class _MLPLanguageModel(nn.Module):
    def __init__(self, vocab: int, width: int, depth: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, vocab)

    def hidden(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + F.gelu(block(h))
        return h


def _sizes(case: Case):
    z = case.sizes
    return z["N"], z["V"], z["d_t"], z["d_s"], z["L_t"], z["L_s"]


def _inputs(case: Case, device: torch.device) -> dict:
    from cex_kernels import random_projection
    n, vocab, d_t, d_s, l_t, l_s = _sizes(case)
    torch.manual_seed(0)
    teacher = _MLPLanguageModel(vocab, d_t, l_t).to(device=device, dtype=case.dtype).eval()
    student = _MLPLanguageModel(vocab, d_s, l_s).to(device=device, dtype=case.dtype)
    for p in teacher.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    return {"teacher": teacher, "student": student,
            "tokens": torch.randint(0, vocab, (n,), generator=gen).to(device),
            "projection": random_projection(d_t, d_s, seed=0, dtype=case.dtype, device=device),
            "optimizer": torch.optim.SGD(student.parameters(), lr=1e-3)}


def eager_hidden_loss(student_hidden, teacher_hidden, projection):
    return F.mse_loss(student_hidden, teacher_hidden @ projection)


def eager_final_loss(student_hidden, head_weight, head_bias, teacher_logits):
    log_p = F.log_softmax(F.linear(student_hidden, head_weight, head_bias) / TEMPERATURE, -1)
    log_q = F.log_softmax(teacher_logits / TEMPERATURE, -1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * TEMPERATURE ** 2


def _step(impl: str, case: Case, inputs: dict) -> Callable[[], object]:
    import cex_kernels
    teacher, student, tokens = inputs["teacher"], inputs["student"], inputs["tokens"]
    projection, optimizer = inputs["projection"], inputs["optimizer"]
    final = case.variant == "final_phase"
    if impl == "ours":
        def loss_fn(h, t):
            if final:
                return cex_kernels.linear_kl(h, student.head.weight, t,
                                             student_bias=student.head.bias,
                                             temperature=TEMPERATURE)
            return cex_kernels.projected_mse(h, t, projection)
    else:
        eager = eager_final_loss if final else eager_hidden_loss
        fn = eager if impl == "eager" else compiled(eager)

        def loss_fn(h, t):
            if final:
                return fn(h, student.head.weight, student.head.bias, t)
            return fn(h, t, projection)

    def train_step():
        with torch.inference_mode():
            t_hidden = teacher.hidden(tokens)
            target = teacher.head(t_hidden) if final else t_hidden
        target = target.clone()  # leave inference mode: a plain tensor for autograd
        optimizer.zero_grad(set_to_none=True)
        loss_fn(student.hidden(tokens), target).backward()
        optimizer.step()
    return train_step


def _skip(impl: str, device: torch.device) -> Optional[str]:
    return None


def _case_skip(impl: str, case: Case) -> Optional[str]:
    if case.mode == "fwd":
        return "a training step is forward + backward + optimizer step (see fwd+bwd)"
    return None


def _flops(case: Case) -> int:
    n, vocab, d_t, d_s, l_t, l_s = _sizes(case)
    final = case.variant == "final_phase"
    teacher = 2 * n * (l_t * d_t * d_t + (d_t * vocab if final else 0))
    student = 3 * 2 * n * (l_s * d_s * d_s + (d_s * vocab if final else 0))
    projection = 0 if final else 2 * n * d_t * d_s
    return teacher + student + projection


def _min_bytes(case: Case) -> int:
    # Read every weight once and write the student's (SGD); activations are not counted.
    n, vocab, d_t, d_s, l_t, l_s = _sizes(case)
    item = torch.empty((), dtype=case.dtype).element_size()
    weights_t = vocab * d_t * 2 + l_t * d_t * d_t
    weights_s = vocab * d_s * 2 + l_s * d_s * d_s
    return (weights_t + 3 * weights_s) * item


TRAIN_STEP = OpSpec(
    name="train_step",
    shapes={"cpu": [dict(N=1024, V=8000, d_t=512, d_s=128, L_t=4, L_s=2)],
            "cuda": [dict(N=8192, V=32000, d_t=2048, d_s=512, L_t=8, L_s=4)]},
    dtypes={"cpu": (torch.float32,), "cuda": (torch.bfloat16,)},
    impls=("ours", "eager", "torch.compile"),
    variants={"cpu": ("hidden_phase", "final_phase"), "cuda": ("hidden_phase", "final_phase")},
    skip_reason=_skip, case_skip_reason=_case_skip, make_inputs=_inputs, make_step=_step,
    flops=_flops, min_bytes=_min_bytes, repeats={"cpu": (2, 5), "cuda": (5, 20)},
    notes=("One training step per phase on an MLP language-model pair; `ours` uses the "
           "package's fused loss with backend=auto, the other rows the eager loss (compiled "
           "or not); models run eagerly in all rows. FLOPs: the step's matrix products."),
)
