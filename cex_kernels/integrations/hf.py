"""Distillation inside Hugging Face's ``transformers.Trainer``: one-shot KD and every phase of
curriculum extraction with HF's own loop, so accelerate, DeepSpeed, FSDP, logging, callbacks
and checkpointing all come from HF.

    method = CurriculumExtraction(teacher, student, layer_map, hidden_budget=200,
                                  final_budget=400, temperature=2.0)
    trainer = DistillationTrainer(method, args=TrainingArguments("runs/ce", ...),
                                  train_dataset=rows)
    trainer.train()                  # phase i runs as one HF ``train()`` in output_dir/phase-i
    trainer.save_model("runs/ce/student")

The loss is the method's own (:meth:`DistillationMethod.student_loss`): the same sums over
real tokens as :class:`cex_kernels.distill.Trainer`, divided by the optimizer step's global
counts. Those counts travel as HF's ``num_items_in_batch``: :meth:`get_batch_samples` (the
hook HF calls once per optimizer step with all its micro-batches) returns them as the int64
tensor ``(real tokens, hard-label tokens)`` summed over the micro-batches and all-reduced
over processes, and :meth:`compute_loss` divides by it, so gradient accumulation and data
parallelism give the large-batch gradient (``loss_is_scaled_for_ga = True``). HF's own count
(labels only) would be wrong for the KD term, which reads every real token.

The teacher is not part of the model HF wraps: it never enters the optimizer, stays in eval
mode with ``requires_grad`` off, and runs under ``inference_mode`` on each process (a full
replica; shard it yourself for teachers that do not fit). Each phase builds a fresh
optimizer and scheduler over the parameters it trains (``requires_grad``), as the project's
trainer does; ``max_steps`` comes from the phase's budget (fractional budgets are fractions
of ``args.max_steps``). ``train(resume_from_checkpoint=True)`` continues in the newest
phase directory that holds a checkpoint (HF restores weights, optimizer, scheduler, RNG).
"""
from __future__ import annotations

import contextlib
import glob
import itertools
import os
import re
from typing import List, Optional

import torch
import transformers

from cex_kernels.distill.batch import is_causal_lm
from cex_kernels.distill.data import PadCollator, forward_inputs
from cex_kernels.distill.methods import DistillationMethod, default_forward
from cex_kernels.distill.schedule import Phase

_PHASE_DIR = re.compile(r"phase-(\d+)$")


def _default_collator(method: DistillationMethod) -> PadCollator:
    """The project trainer's default: pad right, ``attention_mask``, causal-LM labels."""
    student, teacher = method.student, method.teacher
    pad = getattr(getattr(student, "config", None), "pad_token_id", None) or 0
    columns = forward_inputs(student, teacher) if method.forward_fn is default_forward else None
    return PadCollator(pad, columns=columns, causal_lm=is_causal_lm(student))


class DistillationTrainer(transformers.Trainer):
    """``transformers.Trainer`` over a :class:`~cex_kernels.distill.DistillationMethod`
    (``CurriculumExtraction``, ``OneShotDistillation``, ``ProgressiveDistillation``).

    ``DistillationTrainer(method, args=TrainingArguments(...), train_dataset=...,
    **trainer_kwargs)``: the model is ``method.student``; ``data_collator`` defaults to
    :class:`~cex_kernels.distill.PadCollator` (the project trainer's default), so rows may be
    dicts of Python lists of different lengths. ``trainer.phase`` is the phase being run.
    """

    loss_is_scaled_for_ga = True  # compute_loss divides by the step's global counts

    def __init__(self, method: DistillationMethod, *args, **kwargs):
        if not isinstance(method, DistillationMethod):
            raise TypeError(f"method must be a DistillationMethod, got {type(method).__name__}")
        if method.offline:
            raise ValueError("DistillationTrainer needs a teacher model: training from a teacher "
                             "cache runs in cex_kernels.distill.Trainer (or `cex distill "
                             "--from-cache`)")
        if "model" in kwargs:
            raise TypeError("DistillationTrainer trains method.student; do not pass model=")
        kwargs.setdefault("data_collator", _default_collator(method))
        super().__init__(method.student, *args, **kwargs)
        # compute_loss normalizes by num_items_in_batch itself: HF must neither divide the
        # loss by the accumulation steps nor pass the count into the model's forward.
        self.model_accepts_loss_kwargs = True
        self.method = method
        self.phase: Optional[Phase] = None

    # -- phases -----------------------------------------------------------------------------
    def _sample_batch(self):
        """One collated batch of the first rows (the method's setup probes shapes with it);
        reading rows directly draws no random numbers, so the run's data order is kept."""
        n = self.args.per_device_train_batch_size
        data = self.train_dataset
        rows = [data[i] for i in range(min(n, len(data)))] if hasattr(data, "__getitem__") \
            and hasattr(data, "__len__") else list(itertools.islice(iter(data), n))
        return self._prepare_inputs(self.data_collator(rows))

    def setup_phases(self) -> List[Phase]:
        """Build the method's phases (probing one batch) and size each in optimizer steps."""
        method, args = self.method, self.args
        method.teacher.to(args.device).eval().requires_grad_(False)
        self.model.eval()  # the probe pass: no dropout
        phases = method.setup(self._sample_batch())
        if any(p.continues for p in phases):  # each phase here is its own HF train()
            raise ValueError(f"{method.name}: its phases share one optimizer (e.g. "
                             "ProgressiveDistillation(schedule='timeline')), which "
                             "DistillationTrainer cannot do (a fresh HF train() per phase); "
                             "use cex_kernels.distill.Trainer")
        for proj in getattr(method, "projections", []):
            proj.to(args.device)
        samples_per_step = (args.per_device_train_batch_size * args.gradient_accumulation_steps
                            * max(args.world_size, 1))
        total = args.max_steps if args.max_steps and args.max_steps > 0 else None
        for p in phases:
            p.steps = p.budget.resolve(samples_per_step, total, None)
            if p.steps <= 0:
                raise ValueError(f"phase {p.name!r} is empty: budget {p.budget} gives {p.steps} "
                                 f"steps at {samples_per_step} samples per step")
        return phases

    def _resume_point(self, resume_from_checkpoint, base_dir):
        """(phase index, checkpoint) to resume from; (0, None) for a fresh run."""
        if not resume_from_checkpoint:
            return 0, None
        if resume_from_checkpoint is True:
            found = [(int(_PHASE_DIR.search(d).group(1)), d) for d in
                     glob.glob(os.path.join(glob.escape(base_dir), "phase-*"))
                     if _PHASE_DIR.search(d) and transformers.trainer_utils.get_last_checkpoint(d)]
            if not found:
                raise ValueError(f"resume_from_checkpoint=True: no phase-*/checkpoint-* in "
                                 f"{base_dir!r}")
            index, phase_dir = max(found)
            return index, transformers.trainer_utils.get_last_checkpoint(phase_dir)
        match = _PHASE_DIR.search(os.path.dirname(os.path.abspath(resume_from_checkpoint)))
        if match is None:
            raise ValueError(f"resume_from_checkpoint {resume_from_checkpoint!r} is not inside "
                             "an output_dir/phase-<i> directory")
        return int(match.group(1)), resume_from_checkpoint

    def train(self, resume_from_checkpoint=None, **kwargs):
        """Every phase in turn, each one HF ``train()`` (fresh optimizer and scheduler, its
        ``max_steps``, ``output_dir/phase-<i>``); returns the last phase's ``TrainOutput``."""
        args, method = self.args, self.method
        base_dir, max_steps = args.output_dir, args.max_steps
        phases = self.setup_phases()
        start, checkpoint = self._resume_point(resume_from_checkpoint, base_dir)
        out = None
        try:
            for i in range(start, len(phases)):
                self.phase = phases[i]
                method.set_phase_trainable(self.phase)
                args.output_dir = os.path.join(base_dir, f"phase-{i}")
                args.max_steps = self.phase.steps
                self.optimizer, self.lr_scheduler = None, None
                self.model_wrapped = self.model  # re-wrapped over this phase's parameters
                out = super().train(resume_from_checkpoint=checkpoint if i == start else None,
                                    **kwargs)
        finally:
            args.output_dir, args.max_steps = base_dir, max_steps
            method.restore_trainable()
        return out

    # -- loss -------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device=None):
        """The step's micro-batches and its ``num_items_in_batch``: the int64 tensor
        ``(real tokens, hard-label tokens)`` over all of them, summed over processes."""
        device = self.args.device if device is None else device
        batches = list(itertools.islice(epoch_iterator, num_batches))
        counts = [self.method.batch_counts(self.phase, b) for b in batches]
        total = torch.tensor([sum(c[0] for c in counts), sum(c[1] for c in counts)],
                             dtype=torch.int64, device=device)
        if self.args.world_size > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        return batches, total

    @contextlib.contextmanager
    def _student_through(self, model):
        """Run the method's student forward through HF's wrapper (DDP, FSDP, DeepSpeed), whose
        forward must then run to its end."""
        method = self.method
        if model is method.student:
            yield
            return
        forward, stop_early = method.forward_fn, method.stop_early
        method.forward_fn = lambda m, b: forward(model if m is method.student else m, b)
        method.stop_early = False
        try:
            yield
        finally:
            method.forward_fn, method.stop_early = forward, stop_early

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The phase's loss: sums over real tokens divided by ``num_items_in_batch`` (this
        batch's own counts when HF passes none or its own label count, as in evaluation)."""
        method = self.method
        if self.phase is None:
            raise RuntimeError("DistillationTrainer: call train() (or setup_phases() and set "
                               "trainer.phase) before computing a loss")
        if isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.shape == (2,):
            norm = tuple(float(x) for x in num_items_in_batch.tolist())
        else:
            norm = method.batch_counts(self.phase, inputs)
        targets = method.teacher_targets(self.phase, inputs)
        with self._student_through(model):
            loss, parts = method.student_loss(self.phase, inputs, targets, norm)
        if model.training:  # data-parallel wrappers average gradients: undo it for a global sum
            loss = loss * self.accelerator.num_processes
        return (loss, {}) if return_outputs else loss
