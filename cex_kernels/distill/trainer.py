"""The training loop shared by every distillation method (nanoGPT-style: one screen, top to
bottom). Per phase: set the trainable parameters, make a fresh optimizer (and scheduler)
unless the phase ``continues`` the previous one's, then steps of ``grad_accum_steps`` micro-batches, each a teacher pass under
``inference_mode`` and a student forward/backward, clipping, logging, eval and checkpoints.

Normalization: every loss is a sum over the real tokens of a micro-batch divided by the
number of real tokens of the whole optimizer step (all micro-batches, all ranks; counted
before the first forward and all-reduced), as Hugging Face's ``num_items_in_batch``. So k
micro-batches equal one batch k times larger and W ranks equal one process, padding or not.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is started here
(gloo on CPU, NCCL on CUDA). Each rank holds its slice of every global batch. DDP (the
default): a full teacher replica per rank, and the student wrapped per phase, together with
the phase's loss, in ``DistributedDataParallel`` (re-wrapped because the set of trainable
parameters changes). FSDP2 (``TrainConfig(fsdp=True)``): student and teacher sharded with
``fully_shard`` once, after the method's setup, and sharded checkpoints
(:mod:`cex_kernels.distill.fsdp`).

Offline (the method's teacher is a :class:`~cex_kernels.distill.cache.TeacherCache`): no
teacher model exists; the dataset is wrapped so every batch carries its rows' cached
targets (:mod:`cex_kernels.distill.offline`), read in the collator.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from cex_kernels.distill import checkpoint as ckpt_io
from cex_kernels.distill import fsdp, offline
from cex_kernels.distill._validate import ConfigError
from cex_kernels.distill.batch import is_causal_lm
from cex_kernels.distill.data import PadCollator, forward_inputs, make_batches, to_device
from cex_kernels.distill.flops import LinearFlopCounter
from cex_kernels.distill.methods import DistillationMethod, default_forward
from cex_kernels.distill.metrics import (METRICS_FILES, MetricsLogger, PhaseProgress, log,
                                         truncate_metrics)
from cex_kernels.distill.schedule import Phase, format_schedule
from cex_kernels.distill.train_config import TrainConfig, lr_lambda


_NO_TEACHER = nn.Module()  # stands in for the teacher model when training from a cache


@dataclass
class TrainResult:
    phases: List[Phase]
    phase_flops: List[int]               # this process's FLOPs per phase (x world size for all)
    global_step: int
    stopped_early: bool
    records: List[Dict] = field(default_factory=list)
    student_dir: Optional[str] = None    # where the distilled student was saved


def default_collator(method: DistillationMethod, pad_token_id: Optional[int] = None) -> PadCollator:
    """The trainer's (and ``cache_teacher``'s) collator: pad on the right with the student
    config's pad id (or 0), keep the columns every model's forward takes, causal-LM labels."""
    student, teacher = method.student, method.teacher
    pad = pad_token_id
    if pad is None:
        pad = getattr(getattr(student, "config", None), "pad_token_id", None) or 0
    models = (student,) if method.offline else (student, teacher)
    columns = forward_inputs(*models) if method.forward_fn is default_forward else None
    return PadCollator(pad, columns=columns, causal_lm=is_causal_lm(student))


class _PhaseLoss(nn.Module):
    """The student together with the phase's loss, so DDP sees ``forward -> loss``."""

    def __init__(self, method: DistillationMethod, phase: Phase):
        super().__init__()
        self.student, self._method, self._phase = method.student, method, phase

    def forward(self, batch, targets, norm):
        return self._method.student_loss(self._phase, batch, targets, norm)


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
    """``Trainer(method, dataset, config, eval_dataset=..., collate_fn=...,
    optimizer_factory=..., scheduler_factory=..., eval_fn=...).fit()``.

    ``dataset``: map-style (``len``/``__getitem__``) or streaming (``IterableDataset``);
    rows are tensors, tuples or dicts of lists (padded by :class:`PadCollator` unless
    ``collate_fn`` is given). ``optimizer_factory(params) -> Optimizer`` (default
    AdamW(lr, weight_decay)); ``scheduler_factory(optimizer, num_steps) -> LRScheduler``
    (stepped once per optimizer step; default: the config's ``lr_schedule``/``warmup_steps``);
    ``eval_dataset``: the phase loss, and the student's cross-entropy and perplexity when
    the rows have labels, logged as ``eval_*``; ``eval_fn(student, phase, global_step) ->
    dict`` (called under ``no_grad`` in eval mode; its numbers are logged). Optimizer and
    scheduler are rebuilt for every phase, except in a phase that ``continues`` the one before
    (progressive distillation's timeline, where only the teacher changes).
    """

    def __init__(self, method: DistillationMethod, dataset, config: TrainConfig = None, *,
                 eval_dataset=None, collate_fn: Callable = None,
                 optimizer_factory: Callable = None, scheduler_factory: Callable = None,
                 eval_fn: Callable = None):
        if not isinstance(method, DistillationMethod):
            raise TypeError(f"method must be a DistillationMethod, got {type(method).__name__}")
        self.method, self.dataset, self.config = method, dataset, config or TrainConfig()
        self.eval_dataset = eval_dataset
        cfg = self.config
        self.optimizer_factory = optimizer_factory or (
            lambda params: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
        if scheduler_factory is None and (cfg.lr_schedule != "constant" or cfg.warmup_steps):
            scheduler_factory = lambda opt, n: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
                opt, lr_lambda(cfg, n))
        self.scheduler_factory, self.eval_fn = scheduler_factory, eval_fn
        self.collate_fn = collate_fn or default_collator(method, cfg.pad_token_id)
        if method.offline:
            if eval_dataset is not None:
                raise ConfigError("eval_dataset: a teacher cache holds the training rows only; "
                                  "evaluate with eval_fn (the student alone) instead")
            self.dataset = offline.CachedRows(dataset, method.teacher)
            self.collate_fn = offline.CacheCollator(self.collate_fn, method.teacher)

    def _teacher_module(self, phase: Phase) -> nn.Module:
        """The phase's teacher model (an empty module when training from a cache)."""
        return _NO_TEACHER if self.method.offline else self.method.teacher_for(phase)

    @property
    def checkpoint_path(self) -> Optional[str]:
        """The newest checkpoint in ``out_dir`` (None without one)."""
        d = self.config.out_dir
        found = ckpt_io.list_checkpoints(d) if d else []
        return found[-1] if found else None

    def _save(self, phase_index, step, global_step, opt, sched, flops):
        if not self.config.out_dir:
            return
        rngs = [ckpt_io.rng_state()]
        if self.world > 1:  # every rank's dropout stream, so a resume continues each exactly
            rngs = [None] * self.world
            dist.all_gather_object(rngs, ckpt_io.rng_state())
        state = {"method": self.method.state_dict(),
                 "optimizer": opt.state_dict() if opt is not None and not self.fsdp else None,
                 "sharded_optimizer": opt is not None and self.fsdp,
                 "scheduler": sched.state_dict() if sched is not None else None,
                 "phase_index": phase_index, "step": step, "global_step": global_step,
                 "data": self.data.state_dict(), "rng": rngs, "phase_flops": flops,
                 "config": asdict(self.config)}
        path = ckpt_io.checkpoint_name(self.config.out_dir, global_step, sharded=self.fsdp)
        if self.fsdp:  # every rank writes its shards
            fsdp.save(path, self.method.student, opt, state, self.rank)
        elif self.rank == 0:
            ckpt_io.atomic_save({"student": self.method.student.state_dict(), **state}, path)
        if self.rank == 0:
            ckpt_io.prune_checkpoints(self.config.out_dir, self.config.keep_checkpoints)

    def _evaluate(self, phase: Phase, global_step: int) -> Dict:
        student, method = self.method.student, self.method
        student.eval()
        # FSDP2: a forward with no backward must run to its end (its post-forward hooks
        # return the root to its idle state); the gathered roots are then freed.
        method.stop_early = not self.fsdp
        try:
            with torch.no_grad():
                out = dict(self.eval_fn(student, phase, global_step) or {}) if self.eval_fn else {}
                if self.eval_dataset is not None:
                    out.update(self._eval_loss(phase))
        finally:
            method.stop_early = True
        student.train()
        if self.fsdp:
            fsdp.reshard(student)
            fsdp.reshard(self._teacher_module(phase))
        return out

    def _eval_loss(self, phase: Phase) -> Dict[str, float]:
        """The phase loss over the eval set (sums over real tokens / their count), and the
        student's hard-label cross-entropy and perplexity when the rows have labels."""
        from torch.utils.data import DataLoader

        from cex_kernels.distill import batch as B
        from cex_kernels.distill._losses import ce_loss_sum
        from cex_kernels.distill.methods import logits_of
        method, cfg, device = self.method, self.config, self.device
        loader = DataLoader(self.eval_dataset, batch_size=cfg.batch_size,
                            collate_fn=self.collate_fn)
        sums: Dict[str, float] = {}
        rows = labels = 0
        for i, batch in enumerate(loader):
            if cfg.eval_batches is not None and i >= cfg.eval_batches:
                break
            n, n_lab = method.batch_counts(phase, batch)
            rows, labels = rows + n, labels + n_lab
            batch = to_device(batch, device)
            with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp):
                targets = method.teacher_targets(phase, batch)
                _, parts = method.student_loss(phase, batch, targets, (1, 1))
                if n_lab and "ce" not in parts:
                    logits = logits_of(method.forward_fn(method.student, batch))
                    parts["ce"] = ce_loss_sum(logits, B.aligned_labels(batch, method.shift_labels))
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        out = {}
        if "mse" in sums:
            out["eval_loss"] = out["eval_mse"] = sums["mse"] / max(rows, 1)
        if "kd" in sums:
            out["eval_kd"] = sums["kd"] / max(rows, 1)
        if "ce" in sums and labels:
            out["eval_ce"] = sums["ce"] / labels
            out["eval_ppl"] = math.exp(min(out["eval_ce"], 50.0))
        if "kd" in sums:
            w = method.hard_label_weight
            out["eval_loss"] = (1 - w) * out["eval_kd"] + (w * out["eval_ce"] if w else 0.0)
        return out

    def _step(self, model, phase, opt, sched, params, device):
        """One optimizer step over ``grad_accum_steps`` micro-batches: (logged values, FLOPs).

        The step's micro-batches are drawn first, to count its real tokens (and hard labels)
        over all micro-batches and ranks; each micro-batch's loss is its sum over real
        tokens divided by those counts, so the gradients add up to the large batch's."""
        cfg, method, world = self.config, self.method, self.world
        t0 = time.perf_counter()
        batches = [self.data.next() for _ in range(cfg.grad_accum_steps)]
        local = [method.batch_counts(phase, b) for b in batches]
        counts = torch.tensor([sum(c[0] for c in local), sum(c[1] for c in local)],
                              dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(counts)
        norm = (float(counts[0]), float(counts[1]))
        totals: Dict[str, torch.Tensor] = {}
        with LinearFlopCounter(self._teacher_module(phase), method.student) as counter:
            for micro, (batch, (rows, _)) in enumerate(zip(batches, local)):
                batch = to_device(batch, device)
                with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp):
                    targets = method.teacher_targets(phase, batch)
                if self.fsdp and not method.offline:  # FSDP2 leaves a root unsharded
                    fsdp.reshard(method.teacher_for(phase))
                counter.flops += method.loss_flops(phase, targets, rows)
                # Only the last micro-batch all-reduces (reduce-scatters) gradients.
                skip_sync = world > 1 and micro < cfg.grad_accum_steps - 1
                no_sync = contextlib.nullcontext() if not skip_sync else \
                    fsdp.no_gradient_sync(method.student) if self.fsdp else model.no_sync()
                with no_sync:
                    with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp):
                        loss, parts = model(batch, targets, norm)
                    # DDP/FSDP average gradients over ranks; the loss is a share of a global sum.
                    (loss * world).backward()
                for k, v in {"loss": loss.detach(), **parts}.items():
                    totals[k] = totals.get(k, 0.0) + v.double()
                del batch, targets, loss, parts  # release the teacher's activations now
        grad_norm = (fsdp.grad_norm_value(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                     if cfg.max_grad_norm else None)
        lr = opt.param_groups[0]["lr"]  # the rate this step used
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        names = sorted(totals)
        values = torch.stack([totals[k] for k in names])
        if world > 1:  # the logged loss is the global one, not this rank's share
            dist.all_reduce(values)
        logged = dict(zip(names, values.tolist()))
        logged.update(lr=lr, grad_norm=grad_norm, tokens=int(norm[0]),
                      tokens_per_s=round(norm[0] / max(time.perf_counter() - t0, 1e-9), 1))
        return logged, counter.flops

    def _prepare_out_dir(self) -> Optional[str]:
        """The checkpoint to resume from, after refusing to mix a new run into an old one."""
        cfg = self.config
        if cfg.resume and cfg.resume != "auto":
            return cfg.resume
        if not cfg.out_dir:
            return None
        newest = self.checkpoint_path if cfg.resume == "auto" else None
        if newest:
            return newest
        old = [f for f in METRICS_FILES if os.path.exists(os.path.join(cfg.out_dir, f))]
        old += [os.path.basename(p) for p in ckpt_io.list_checkpoints(cfg.out_dir)]
        if old and not (cfg.overwrite or cfg.resume == "auto"):
            raise ConfigError(f"out_dir {cfg.out_dir!r} holds a previous run ({', '.join(old)}): "
                              "set train.resume='auto' (cex distill --resume) to continue it or "
                              "train.overwrite=true (--overwrite) "
                              "to start over")
        if old:  # overwrite, or resume='auto' before any checkpoint: the old logs go
            if self.world > 1:
                dist.barrier()  # every rank has looked before rank 0 removes
            if self.rank == 0:
                for name in old:
                    ckpt_io.remove(os.path.join(cfg.out_dir, name))
                shutil.rmtree(os.path.join(cfg.out_dir, "tb"), ignore_errors=True)
            if self.world > 1:
                dist.barrier()
        return None

    def fit(self) -> TrainResult:
        cfg, method = self.config, self.method
        self.rank, self.world, device = _setup_distributed(cfg.device)
        self.device, world = device, self.world
        self.fsdp = cfg.fsdp and world > 1
        if cfg.fsdp and world == 1:
            log.info("train.fsdp: one process, so the models are not sharded")
        torch.manual_seed(cfg.seed + self.rank)
        teacher = method.teacher if not method.offline else _NO_TEACHER
        teacher_flags = ([m.training for m in teacher.modules()],
                         [p.requires_grad for p in teacher.parameters()])
        try:
            return self._fit(cfg, method, device, world)
        finally:  # the teacher as the caller gave it
            for m, training in zip(teacher.modules(), teacher_flags[0]):
                m.training = training
            for p, flag in zip(teacher.parameters(), teacher_flags[1]):
                p.requires_grad_(flag)

    def _fit(self, cfg, method, device, world) -> TrainResult:
        if not method.offline:
            method.teacher.to(device).eval().requires_grad_(False)
        student = method.student.to(device)
        if cfg.out_dir and self.rank == 0:
            os.makedirs(cfg.out_dir, exist_ok=True)
            ckpt_io.clean_temporary(cfg.out_dir)
        resume = self._prepare_out_dir()
        if self.world > 1:
            dist.barrier()  # every rank has inspected out_dir before rank 0 writes to it
        self.data = make_batches(self.dataset, cfg.batch_size, seed=cfg.seed, rank=self.rank,
                                 world=world, collate_fn=self.collate_fn,
                                 num_workers=cfg.num_workers)
        if method.offline:  # setup checks every phase's cached targets
            self.collate_fn.streams = list(method.teacher.streams)
        student.eval()  # setup's probe pass: no dropout, no BatchNorm statistics update
        sample = to_device(self.data.peek(), device)
        phases = method.setup(sample)
        student.train()
        if self.fsdp:  # after setup, which probes the whole models
            fsdp.shard(student, cfg.fsdp_param_dtype, sample=sample, forward_fn=method.forward_fn)
            if not method.offline:
                fsdp.shard(method.teacher, cfg.fsdp_param_dtype, sample=sample,
                           forward_fn=method.forward_fn)
        del sample
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
        if resume:
            ckpt = ckpt_io.load_checkpoint(resume)
            if ckpt["sharded"]:
                fsdp.load_model(ckpt["sharded"], student)
            else:
                student.load_state_dict(ckpt["student"])
            method.load_state_dict(ckpt["method"])
            self.data.load_state_dict(ckpt["data"])
            ckpt_io.set_rng_state(ckpt["rng"][self.rank % len(ckpt["rng"])])
            start_phase, start_step = ckpt["phase_index"], ckpt["step"]
            global_step, flops = ckpt["global_step"], list(ckpt["phase_flops"])
            if cfg.out_dir and self.rank == 0:
                truncate_metrics(cfg.out_dir, global_step)
        self.global_step = global_step
        metrics = MetricsLogger(cfg.out_dir, enabled=self.rank == 0, tensorboard=cfg.tensorboard)

        try:
            stopped = self._run_phases(phases, start_phase, start_step, global_step, flops,
                                       ckpt, metrics, device)
        finally:  # also on errors and early stops: leave the student's flags as they were
            method.restore_trainable()
            metrics.close()
        student_dir = None
        if not stopped and cfg.out_dir and cfg.save_student:
            weights = fsdp.full_state_dict(student) if self.fsdp else None  # every rank gathers
            if self.rank == 0:
                student_dir = ckpt_io.save_model(student, os.path.join(cfg.out_dir, "student"),
                                                 weights)
        return TrainResult(phases, flops, self.global_step, stopped, metrics.records, student_dir)

    def _run_phases(self, phases, start_phase, start_step, global_step, flops, ckpt, metrics,
                    device) -> bool:
        """The phase loop; returns True when stopped by ``stop_after_steps``."""
        cfg, method, world = self.config, self.method, self.world
        samples_per_step = cfg.batch_size * cfg.grad_accum_steps
        t0 = time.perf_counter()
        for pi in range(start_phase, len(phases)):
            phase, step = phases[pi], (start_step if pi == start_phase else 0)
            if phase.continues and pi > 0 and phase.trainable != phases[pi - 1].trainable:
                raise ValueError(f"phase {phase.name!r} continues the previous phase's optimizer "
                                 "but trains other parameters")
            params = method.set_phase_trainable(phase)
            if method.offline and not cfg.num_workers:  # read only this phase's targets
                # (DataLoader workers hold their own copy of the collator: they read all)
                self.collate_fn.streams = [method.cache_stream(phase)]
            if not phase.continues or pi == start_phase:
                opt = self.optimizer_factory(params)
                sched = self.scheduler_factory(opt, _chain_steps(phases, pi)) \
                    if self.scheduler_factory else None
            if ckpt is not None and pi == ckpt["phase_index"] and (
                    ckpt["optimizer"] is not None or ckpt.get("sharded_optimizer")):
                if ckpt.get("sharded_optimizer"):
                    fsdp.load_optimizer(ckpt["sharded"], method.student, opt)
                else:
                    opt.load_state_dict(ckpt["optimizer"])
                if sched is not None:
                    sched.load_state_dict(ckpt["scheduler"])
            model = _PhaseLoss(method, phase)
            if world > 1 and not self.fsdp:
                # find_unused_parameters: a phase's loss need not touch all it may train.
                model = nn.parallel.DistributedDataParallel(
                    model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=True)
            progress = PhaseProgress(phase.name, phase.steps, step,
                                     bar=cfg.progress_bar and self.rank == 0,
                                     log_every=cfg.log_every if self.rank == 0 else 0)
            stop = False
            evaluate = self.eval_fn is not None or self.eval_dataset is not None
            while step < phase.steps:
                logged, step_flops = self._step(model, phase, opt, sched, params, device)
                step, global_step = step + 1, global_step + 1
                self.global_step = global_step
                flops[pi] += step_flops
                progress.update(step, logged["loss"])
                if step == phase.steps or (cfg.log_every and step % cfg.log_every == 0):
                    metrics.log({"phase_index": pi, "phase": phase.name, "step": step,
                                 "global_step": global_step, "samples": step * samples_per_step,
                                 **logged, "flops": flops[pi],
                                 "elapsed_s": round(time.perf_counter() - t0, 3)})
                if evaluate and cfg.eval_every and step % cfg.eval_every == 0 and step < phase.steps:
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
            if evaluate:
                metrics.log({"phase_index": pi, "phase": phase.name, "global_step": global_step,
                             "end_of_phase": True, **self._evaluate(phase, global_step)})
            # A phase end checkpoints, except inside a run of phases sharing one optimizer
            # (a progressive timeline switches teacher every few steps; checkpoint_every
            # still applies there) unless the run stops here, with the optimizer then.
            keep = pi + 1 < len(phases) and phases[pi + 1].continues
            if not keep or stop:
                self._save(pi + 1, 0, global_step, opt if keep else None,
                           sched if keep else None, flops)
            if self.rank == 0:
                log.info("phase %d (%s) done: %d steps, %.3g FLOPs", pi, phase.name, phase.steps,
                         flops[pi])
            if stop and pi + 1 < len(phases):
                return True
        return False


def _chain_steps(phases: List[Phase], pi: int) -> int:
    """Steps of the run of phases that share phase ``pi``'s optimizer (``Phase.continues``)."""
    first = pi
    while first > 0 and phases[first].continues:
        first -= 1
    last = pi
    while last + 1 < len(phases) and phases[last + 1].continues:
        last += 1
    return sum(p.steps for p in phases[first:last + 1])


def distill(method: DistillationMethod, dataset, config: TrainConfig = None, **kwargs) -> TrainResult:
    """``Trainer(method, dataset, config, **kwargs).fit()``."""
    return Trainer(method, dataset, config, **kwargs).fit()
