"""The training loop shared by every distillation method (nanoGPT-style: one screen, top to
bottom). Per phase: set the trainable parameters, make a fresh optimizer (and scheduler),
then steps of ``grad_accum_steps`` micro-batches, each a teacher pass under
``inference_mode`` and a student forward/backward, clipping, logging, eval and checkpoints.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is started here
(gloo on CPU, NCCL on CUDA). Each rank holds a full teacher replica and its slice of every
global batch; the student is wrapped per phase, together with the phase's loss, in
``DistributedDataParallel`` (re-wrapped because the set of trainable parameters changes).

FSDP2 (no code here): shard the student with ``torch.distributed.fsdp.fully_shard`` applied
to each block and then the root, once, before training. Per-phase freezing then works with
``requires_grad`` as here (FSDP2 shards per parameter, so frozen and trainable parameters may
share a block), and the forward hooks see unsharded outputs because FSDP2 hooks the block
itself. The teacher stays replicated (or is sharded the same way, run under inference_mode),
and the optimizer is built over the sharded DTensor parameters; checkpoints then need
``torch.distributed.checkpoint`` (``get_state_dict``) instead of the rank-0 ``torch.save``.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from cex_kernels.distill.checkpoint import atomic_save, load_checkpoint, rng_state, set_rng_state
from cex_kernels.distill.data import ShardedBatches, to_device
from cex_kernels.distill.flops import LinearFlopCounter
from cex_kernels.distill.methods import DistillationMethod
from cex_kernels.distill.metrics import MetricsLogger, PhaseProgress, log
from cex_kernels.distill.schedule import Phase, format_schedule


@dataclass
class TrainConfig:
    batch_size: int = 32                 # global samples per micro-step (split over ranks)
    grad_accum_steps: int = 1
    total_steps: Optional[int] = None    # what fractional budgets are fractions of
    total_samples: Optional[int] = None
    lr: float = 1e-3                     # for the default AdamW factory
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    amp: bool = False                    # bf16 torch.autocast around the forward passes
    device: str = "auto"                 # "auto": cuda:LOCAL_RANK when available, else cpu
    seed: int = 0                        # data order and (seed + rank) the torch RNG
    out_dir: Optional[str] = None        # metrics.jsonl/csv, tb/, checkpoint.pt
    checkpoint_every: int = 0            # steps; phase ends and stops always checkpoint
    resume: Optional[str] = None         # a checkpoint path, or "auto": out_dir's if present
    stop_after_steps: Optional[int] = None  # checkpoint and return after this global step
    eval_every: int = 0                  # steps; 0 = only at phase ends
    log_every: int = 10
    progress_bar: bool = True
    tensorboard: bool = True
    print_schedule: bool = True


@dataclass
class TrainResult:
    phases: List[Phase]
    phase_flops: List[int]               # this process's FLOPs per phase (x world size for all)
    global_step: int
    stopped_early: bool
    records: List[Dict] = field(default_factory=list)


class _PhaseLoss(nn.Module):
    """The student together with the phase's loss, so DDP sees ``forward -> loss``."""

    def __init__(self, method: DistillationMethod, phase: Phase):
        super().__init__()
        self.student, self._method, self._phase = method.student, method, phase

    def forward(self, batch, targets):
        return self._method.student_loss(self._phase, batch, targets)


def _setup_distributed(device: str):
    """(rank, world, device), starting the process group when launched by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available() and device in ("auto", "cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # NCCL and the caching allocator use the current device
    return rank, world, device


class Trainer:
    """``Trainer(method, dataset, config, optimizer_factory=..., scheduler_factory=...,
    eval_fn=...).fit()``.

    ``optimizer_factory(params) -> Optimizer`` (default AdamW(lr, weight_decay));
    ``scheduler_factory(optimizer, num_steps) -> LRScheduler`` (stepped once per optimizer
    step; default none); ``eval_fn(student, phase, global_step) -> dict`` (called under
    ``no_grad`` in eval mode; its numbers are logged). Both are rebuilt for every phase.
    """

    def __init__(self, method: DistillationMethod, dataset, config: TrainConfig = None, *,
                 optimizer_factory: Callable = None, scheduler_factory: Callable = None,
                 eval_fn: Callable = None):
        self.method, self.dataset, self.config = method, dataset, config or TrainConfig()
        cfg = self.config
        self.optimizer_factory = optimizer_factory or (
            lambda params: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
        self.scheduler_factory, self.eval_fn = scheduler_factory, eval_fn

    @property
    def checkpoint_path(self) -> Optional[str]:
        d = self.config.out_dir
        return os.path.join(d, "checkpoint.pt") if d else None

    def _save(self, phase_index, step, global_step, opt, sched, flops):
        if self.checkpoint_path is None:
            return
        rngs = [rng_state()]
        if self.world > 1:  # every rank's dropout stream, so a resume continues each exactly
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng_state())
        if self.rank != 0:
            return
        atomic_save({"student": self.method.student.state_dict(),
                     "method": self.method.state_dict(),
                     "optimizer": opt.state_dict() if opt is not None and step else None,
                     "scheduler": sched.state_dict() if sched is not None and step else None,
                     "phase_index": phase_index, "step": step, "global_step": global_step,
                     "data": self.data.state_dict(), "rng": rngs, "phase_flops": flops,
                     "config": asdict(self.config)}, self.checkpoint_path)

    def _evaluate(self, phase: Phase, global_step: int) -> Dict:
        student = self.method.student
        student.eval()
        with torch.no_grad():
            out = dict(self.eval_fn(student, phase, global_step) or {})
        student.train()
        return out

    def _step(self, model, phase, opt, sched, params, device):
        """One optimizer step over ``grad_accum_steps`` micro-batches: (loss, grad norm, lr, FLOPs)."""
        cfg, method, accum = self.config, self.method, self.config.grad_accum_steps
        loss_sum = 0.0
        with LinearFlopCounter(method.teacher_for(phase), method.student) as counter:
            for micro in range(accum):
                batch = to_device(self.data.next(), device)
                with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp):
                    targets = method.teacher_targets(phase, batch)
                counter.flops += method.loss_flops(phase, targets)
                # Only the last micro-batch all-reduces gradients.
                skip_sync = self.world > 1 and micro < accum - 1
                with model.no_sync() if skip_sync else contextlib.nullcontext():
                    with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp):
                        loss = model(batch, targets)
                    (loss / accum).backward()
                loss_sum += loss.item() / accum
                del batch, targets, loss  # release the teacher's activations now
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
                     if cfg.max_grad_norm else None)
        lr = opt.param_groups[0]["lr"]  # the rate this step used
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        return loss_sum, grad_norm, lr, counter.flops

    def fit(self) -> TrainResult:
        cfg, method = self.config, self.method
        self.rank, self.world, device = _setup_distributed(cfg.device)
        world = self.world
        torch.manual_seed(cfg.seed + self.rank)
        method.teacher.to(device).eval().requires_grad_(False)
        student = method.student.to(device)
        self.data = ShardedBatches(self.dataset, cfg.batch_size, seed=cfg.seed, rank=self.rank,
                                   world=world)
        student.eval()  # setup's probe pass: no dropout, no BatchNorm statistics update
        phases = method.setup(to_device(self.data.peek(), device))
        student.train()
        samples_per_step = cfg.batch_size * cfg.grad_accum_steps
        for p in phases:
            p.steps = p.budget.resolve(samples_per_step, cfg.total_steps, cfg.total_samples)
            if p.steps <= 0:
                raise ValueError(f"phase {p.name!r} is empty: budget {p.budget} gives {p.steps} "
                                 f"steps at {samples_per_step} samples per step")
        if cfg.print_schedule and self.rank == 0:
            print(f"{method.name} schedule ({world} process(es), {samples_per_step} samples/step):\n"
                  + format_schedule(phases, samples_per_step), flush=True)

        ckpt, start_phase, start_step, global_step = None, 0, 0, 0
        flops = [0] * len(phases)
        resume = self.checkpoint_path if cfg.resume == "auto" else cfg.resume
        if resume and os.path.exists(resume):
            ckpt = load_checkpoint(resume)
            student.load_state_dict(ckpt["student"])
            method.load_state_dict(ckpt["method"])
            self.data.load_state_dict(ckpt["data"])
            set_rng_state(ckpt["rng"][self.rank % len(ckpt["rng"])])
            start_phase, start_step = ckpt["phase_index"], ckpt["step"]
            global_step, flops = ckpt["global_step"], list(ckpt["phase_flops"])
        elif cfg.resume and cfg.resume != "auto":
            raise FileNotFoundError(f"resume checkpoint {cfg.resume!r} does not exist")
        self.global_step = global_step
        metrics = MetricsLogger(cfg.out_dir, enabled=self.rank == 0, tensorboard=cfg.tensorboard)

        try:
            stopped = self._run_phases(phases, start_phase, start_step, global_step, flops,
                                       ckpt, metrics, device)
        finally:  # also on errors and early stops: leave the student's flags as they were
            method.restore_trainable()
            metrics.close()
        return TrainResult(phases, flops, self.global_step, stopped, metrics.records)

    def _run_phases(self, phases, start_phase, start_step, global_step, flops, ckpt, metrics,
                    device) -> bool:
        """The phase loop; returns True when stopped by ``stop_after_steps``."""
        cfg, method, world = self.config, self.method, self.world
        samples_per_step = cfg.batch_size * cfg.grad_accum_steps
        t0 = time.perf_counter()
        for pi in range(start_phase, len(phases)):
            phase, step = phases[pi], (start_step if pi == start_phase else 0)
            params = method.set_phase_trainable(phase)
            opt = self.optimizer_factory(params)
            sched = self.scheduler_factory(opt, phase.steps) if self.scheduler_factory else None
            if ckpt is not None and pi == ckpt["phase_index"] and ckpt["optimizer"] is not None:
                opt.load_state_dict(ckpt["optimizer"])
                if sched is not None:
                    sched.load_state_dict(ckpt["scheduler"])
            model = _PhaseLoss(method, phase)
            if world > 1:
                # find_unused_parameters: a phase's loss need not touch all it may train.
                model = nn.parallel.DistributedDataParallel(
                    model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=True)
            progress = PhaseProgress(phase.name, phase.steps, step,
                                     bar=cfg.progress_bar and self.rank == 0,
                                     log_every=cfg.log_every if self.rank == 0 else 0)
            stop = False
            while step < phase.steps:
                loss, grad_norm, lr, step_flops = self._step(model, phase, opt, sched, params, device)
                step, global_step = step + 1, global_step + 1
                self.global_step = global_step
                flops[pi] += step_flops
                progress.update(step, loss)
                if step == phase.steps or (cfg.log_every and step % cfg.log_every == 0):
                    metrics.log({"phase_index": pi, "phase": phase.name, "step": step,
                                 "global_step": global_step, "samples": step * samples_per_step,
                                 "loss": loss, "lr": lr,
                                 "grad_norm": grad_norm, "flops": flops[pi],
                                 "elapsed_s": round(time.perf_counter() - t0, 3)})
                if self.eval_fn and cfg.eval_every and step % cfg.eval_every == 0 and step < phase.steps:
                    metrics.log({"phase_index": pi, "phase": phase.name, "global_step": global_step,
                                 **self._evaluate(phase, global_step)})
                if cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0:
                    self._save(pi, step, global_step, opt, sched, flops)
                stop = cfg.stop_after_steps is not None and global_step >= cfg.stop_after_steps
                if stop and step < phase.steps:
                    self._save(pi, step, global_step, opt, sched, flops)
                    break
            progress.close()
            if stop and step < phase.steps:
                return True
            if self.eval_fn:
                metrics.log({"phase_index": pi, "phase": phase.name, "global_step": global_step,
                             "end_of_phase": True, **self._evaluate(phase, global_step)})
            self._save(pi + 1, 0, global_step, None, None, flops)
            if self.rank == 0:
                log.info("phase %d (%s) done: %d steps, %.3g FLOPs", pi, phase.name, phase.steps,
                         flops[pi])
            if stop and pi + 1 < len(phases):
                return True
        return False


def distill(method: DistillationMethod, dataset, config: TrainConfig = None, **kwargs) -> TrainResult:
    """``Trainer(method, dataset, config, **kwargs).fit()``."""
    return Trainer(method, dataset, config, **kwargs).fit()
