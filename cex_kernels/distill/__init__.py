"""Knowledge distillation by curriculum extraction, and its baselines, over the fused ops.

    method = CurriculumExtraction(teacher, student, {"student": s_layers, "teacher": t_layers},
                                  hidden_budget=200, final_budget=400, temperature=2.0)
    result = Trainer(method, dataset, TrainConfig(batch_size=64, out_dir="runs/ce")).fit()

Same interface: ``OneShotDistillation(teacher, student, budget=...)`` and
``ProgressiveDistillation(teacher, student, teacher_checkpoints=[...], ...)``. Teacher and
student may be ``save_pretrained`` directories; datasets may be rows of Python lists (padded by
:class:`PadCollator`) or streaming; every loss reads only real tokens and is normalized by
the optimizer step's global token count.
Scaling out under ``torchrun``: DDP, or FSDP2 with ``TrainConfig(fsdp=True)``
(:mod:`cex_kernels.distill.fsdp`).
"""
from cex_kernels.distill.checkpoint import CheckpointError, save_model
from cex_kernels.distill.data import PadCollator
from cex_kernels.distill.hooks import HiddenStateCapture
from cex_kernels.distill.layer_map import LayerMapError, evenly_spaced_layer_map, resolve_layer_map
from cex_kernels.distill.methods import (CurriculumExtraction, DistillationMethod,
                                         OneShotDistillation, ProgressiveDistillation)
from cex_kernels.distill.registry import hf_from_config, hf_pretrained
from cex_kernels.distill.schedule import Budget, Phase, format_schedule
from cex_kernels.distill.trainer import Trainer, TrainConfig, TrainResult, distill

__all__ = ["CurriculumExtraction", "OneShotDistillation", "ProgressiveDistillation",
           "DistillationMethod", "Trainer", "TrainConfig", "TrainResult", "distill", "Budget",
           "Phase", "format_schedule", "HiddenStateCapture", "LayerMapError",
           "evenly_spaced_layer_map", "resolve_layer_map", "PadCollator", "CheckpointError",
           "save_model", "hf_from_config", "hf_pretrained"]
