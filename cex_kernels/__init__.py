"""cex-kernels: fused kernels for knowledge distillation by curriculum extraction.

Public API:
    projected_mse(student, teacher, projection, *, reduction="mean", backend="auto")
    random_projection(d_in, d_out, *, seed, kind="gaussian", dtype, device)
    ProjectedMSELoss(d_teacher, d_student, *, seed=0, kind="gaussian", learnable=False)
    softmax_kl(student_logits, teacher_logits, *, temperature=1.0, direction="forward", ...)
    jsd(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, ...)
    DistillKLLoss(*, temperature=1.0, direction="forward", beta=None, ...)
    linear_kl(student_hidden, student_weight, teacher_logits=None, *, teacher_hidden=None, ...)
    LinearKLLoss(*, temperature=1.0, direction="forward", hard_label_weight=0.0, ...)
    tvd(student_logits, teacher_logits, *, temperature=1.0, reduction="batchmean", ...)
    TVDLoss(*, temperature=1.0, reduction="batchmean", ignore_index=-100, backend="auto")
    linear_tvd(student_hidden, student_weight, teacher_logits=None, *, ...)
    backends()  -> {"triton": bool, "cuda": bool, "cpu": bool, "reference": True}

Training (``cex_kernels.distill``): CurriculumExtraction, OneShotDistillation,
ProgressiveDistillation, Trainer, TrainConfig -- loaded on first use, so that importing the
kernels does not import the trainer (nor Triton, which loads with the first Triton kernel).
"""
import importlib

from cex_kernels._backends import backends
from cex_kernels.losses import DistillKLLoss, LinearKLLoss, ProjectedMSELoss, TVDLoss
from cex_kernels.ops.linear_kl import linear_kl
from cex_kernels.ops.projected_mse import projected_mse
from cex_kernels.ops.softmax_kl import jsd, softmax_kl
from cex_kernels.ops.tvd import linear_tvd, tvd
from cex_kernels.projection import random_projection

__version__ = "0.1.0"
__all__ = ["projected_mse", "random_projection", "ProjectedMSELoss", "backends",
           "softmax_kl", "jsd", "DistillKLLoss", "linear_kl", "LinearKLLoss", "tvd",
           "TVDLoss", "linear_tvd",
           "CurriculumExtraction", "OneShotDistillation", "ProgressiveDistillation", "Trainer",
           "TrainConfig"]

# The trainer and its names load on first access (PEP 562).
_LAZY = {"distill": None, "CurriculumExtraction": "distill", "OneShotDistillation": "distill",
         "ProgressiveDistillation": "distill", "Trainer": "distill", "TrainConfig": "distill"}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'cex_kernels' has no attribute {name!r}")
    module = importlib.import_module("cex_kernels.distill")
    return module if _LAZY[name] is None else getattr(module, name)


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
