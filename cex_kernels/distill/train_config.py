"""The trainer's options as one typed, validated dataclass, and the per-phase learning-rate
schedule it describes."""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from cex_kernels.distill._validate import ConfigError, coerce

LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class TrainConfig:
    batch_size: int = 32                 # global samples per micro-step (split over ranks)
    grad_accum_steps: int = 1            # micro-steps per optimizer step
    total_steps: Optional[int] = None    # what fractional budgets are fractions of
    total_samples: Optional[int] = None
    lr: float = 1e-3                     # for the default AdamW factory
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0  # None: no clipping
    lr_schedule: str = "constant"        # per phase: constant, cosine or linear decay
    warmup_steps: int = 0                # per phase: linear warmup from 0
    min_lr_ratio: float = 0.0            # cosine/linear decay down to lr * min_lr_ratio
    amp: bool = False                    # bf16 torch.autocast around the forward passes
    device: str = "auto"                 # "auto": cuda:LOCAL_RANK when available, else cpu
    fsdp: bool = False                   # under torchrun: FSDP2-shard student and teacher (not DDP)
    fsdp_param_dtype: Optional[str] = None  # FSDP2 compute dtype (bfloat16, float16); fp32 grads
    seed: int = 0                        # data order and (seed + rank) the torch RNG
    num_workers: int = 0                 # DataLoader worker processes for the training data
    pad_token_id: Optional[int] = None   # default collator; None: the student's config, else 0
    out_dir: Optional[str] = None        # metrics.jsonl/csv, tb/, checkpoint-*.pt, student/
    overwrite: bool = False              # start over in an out_dir holding a previous run
    checkpoint_every: int = 0            # steps; phase ends and stops always checkpoint
    keep_checkpoints: int = 2            # newest checkpoints kept in out_dir
    resume: Optional[str] = None         # a checkpoint path, or "auto": out_dir's newest
    stop_after_steps: Optional[int] = None  # checkpoint and return after this global step
    save_student: bool = True            # out_dir/student (save_pretrained) after the last phase
    eval_every: int = 0                  # steps; 0 = only at phase ends
    eval_batches: Optional[int] = None   # cap on eval batches (None: the whole eval set)
    log_every: int = 10
    progress_bar: bool = True
    tensorboard: bool = True
    print_schedule: bool = True

    def __post_init__(self):
        if isinstance(self.device, torch.device):
            self.device = str(self.device)
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(getattr(self, f.name), hints[f.name], f"train.{f.name}"))
        positive = ("batch_size", "grad_accum_steps", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "eval_every", "log_every", "warmup_steps", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("total_steps", "total_samples", "stop_after_steps", "eval_batches"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1 or null, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"train.lr must be a finite number > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"train.max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"train.lr_schedule must be one of {LR_SCHEDULES}, got "
                              f"{self.lr_schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.device != "auto":
            try:
                dev = torch.device(self.device)
            except RuntimeError as exc:
                raise ConfigError(f"train.device {self.device!r} is not a device: {exc}") from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ConfigError(f"train.device is {self.device!r} but torch sees no CUDA device")
        if self.fsdp_param_dtype not in (None, "bfloat16", "float16", "float32"):
            raise ConfigError(f"train.fsdp_param_dtype must be bfloat16, float16, float32 or "
                              f"null, got {self.fsdp_param_dtype!r}")
        if self.resume is not None and self.resume != "auto" and not os.path.exists(self.resume):
            raise ConfigError(f"train.resume: checkpoint {self.resume!r} does not exist")
        if self.resume == "auto" and not self.out_dir:
            raise ConfigError("train.resume='auto' needs train.out_dir")


def lr_lambda(cfg: TrainConfig, num_steps: int) -> Callable[[int], float]:
    """The config's per-phase schedule: linear warmup, then constant, cosine or linear decay."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, num_steps - cfg.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" \
            else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape
    return factor
