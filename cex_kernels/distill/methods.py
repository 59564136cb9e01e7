"""Distillation methods with one interface, so they compare fairly under one trainer.

A method turns (teacher, student, options) into a list of :class:`Phase` and, per phase,
computes the teacher's targets (under ``inference_mode``) and the student's loss:

- :class:`CurriculumExtraction`: one projected-MSE phase per mapped layer pair, then softmax-KL.
- :class:`OneShotDistillation`: the softmax-KL phase alone.
- :class:`ProgressiveDistillation`: softmax-KL to each intermediate teacher checkpoint in
  turn, then to the final teacher (Panigrahi et al., 2024).

Batches: a dict (passed as ``model(**batch)`` without ``"labels"``), a tuple/list
``(inputs, labels?)`` (``model(inputs)``) or a tensor; override with ``forward_fn``.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional, Sequence, Set

import torch
from torch import nn

from cex_kernels.distill._losses import logit_distillation_loss
from cex_kernels.distill.hooks import HiddenStateCapture, first_tensor
from cex_kernels.distill.layer_map import LayerMapSpec, resolve_layer_map
from cex_kernels.distill.schedule import (HIDDEN_MSE, LOGIT_KL, BudgetLike, Phase, as_budget)


def default_forward(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def batch_labels(batch) -> Optional[torch.Tensor]:
    if isinstance(batch, dict):
        return batch.get("labels")
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return batch[1]
    return None


def logits_of(output) -> torch.Tensor:
    """Logits from a model output: a tensor, an HF ``ModelOutput`` (``.logits``) or a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    return first_tensor(output)


class DistillationMethod:
    """Base class. Subclasses implement :meth:`build_phases` (and may override
    :meth:`teacher_for`). ``setup(sample_batch)`` must run before training (the trainer
    calls it): it builds the phases and fills in each phase's ``trainable`` names."""

    name = "distillation"

    def __init__(self, teacher: nn.Module, student: nn.Module, *, temperature: float = 1.0,
                 hard_label_weight: float = 0.0, final_budget: BudgetLike = 1.0,
                 backend: str = "auto", forward_fn: Callable = default_forward):
        if not 0.0 <= hard_label_weight <= 1.0:
            raise ValueError(f"hard_label_weight must be in [0, 1], got {hard_label_weight}")
        self.teacher, self.student = teacher, student
        self.temperature, self.hard_label_weight = float(temperature), float(hard_label_weight)
        self.final_budget = as_budget(final_budget)
        self.backend, self.forward_fn = backend, forward_fn
        self.phases: List[Phase] = []
        # Student parameters the user left trainable: no phase ever trains any other.
        self.trainable_names = [n for n, p in student.named_parameters() if p.requires_grad]

    # -- to implement -------------------------------------------------------------------
    def build_phases(self) -> List[Phase]:
        raise NotImplementedError

    def teacher_for(self, phase: Phase) -> nn.Module:
        return self.teacher

    # -- shared -------------------------------------------------------------------------
    def setup(self, sample_batch) -> List[Phase]:
        self.phases = self.build_phases()
        for phase in self.phases:
            if phase.kind == LOGIT_KL:
                phase.trainable = list(self.trainable_names)
        self._check_logits(sample_batch)
        return self.phases

    def _check_logits(self, batch):
        if not any(p.kind == LOGIT_KL for p in self.phases):
            return
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            s = logits_of(self.forward_fn(self.student, batch))
            t = self.teacher_targets(self.phases[-1], batch)
        if s.shape != t.shape:
            raise ValueError(f"{self.name}: student logits {tuple(s.shape)} and teacher logits "
                             f"{tuple(t.shape)} differ in shape; softmax-KL needs the same "
                             "vocabulary and leading dimensions")

    def set_phase_trainable(self, phase: Phase) -> List[nn.Parameter]:
        """Turn ``requires_grad`` on for exactly the phase's parameters; return them."""
        keep = set(phase.trainable)
        params = []
        for n, p in self.student.named_parameters():
            p.requires_grad_(n in keep)
            if n in keep:
                params.append(p)
        return params

    def restore_trainable(self):
        keep = set(self.trainable_names)
        for n, p in self.student.named_parameters():
            p.requires_grad_(n in keep)

    @torch.inference_mode()
    def teacher_targets(self, phase: Phase, batch) -> torch.Tensor:
        """The teacher's hidden state (projected-MSE phases) or logits (KL phases)."""
        teacher = self.teacher_for(phase)
        if phase.kind == LOGIT_KL:
            return logits_of(self.forward_fn(teacher, batch))
        name = self.layer_map[phase.pair][1]
        with HiddenStateCapture(teacher, [name], stop_after=name) as cap:
            cap.run(self.forward_fn, teacher, batch)
        return cap.hidden[name]

    def student_loss(self, phase: Phase, batch, targets: torch.Tensor) -> torch.Tensor:
        if phase.kind == LOGIT_KL:
            logits = logits_of(self.forward_fn(self.student, batch))
            return logit_distillation_loss(logits, targets, temperature=self.temperature,
                                           hard_label_weight=self.hard_label_weight,
                                           labels=batch_labels(batch), backend=self.backend)
        name = self.layer_map[phase.pair][0]
        with HiddenStateCapture(self.student, [name], stop_after=name) as cap:
            cap.run(self.forward_fn, self.student, batch)
        hidden = cap.hidden[name]
        return self.projections[phase.pair](hidden, targets.to(hidden.dtype))

    def loss_flops(self, phase: Phase, targets: torch.Tensor) -> int:
        """Matmul FLOPs of the loss itself (projected-MSE's ``teacher @ P``; KL has none)."""
        if phase.kind != HIDDEN_MSE:
            return 0
        proj = self.projections[phase.pair]
        return 2 * (targets.numel() // proj.d_teacher) * proj.d_teacher * proj.d_student

    def state_dict(self) -> Dict[str, Any]:
        return {"method": self.name, "phases": [p.name for p in self.phases]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("method") != self.name or state.get("phases") != [p.name for p in self.phases]:
            raise ValueError(f"checkpoint is for {state.get('method')} with phases "
                             f"{state.get('phases')}, this run is {self.name} with phases "
                             f"{[p.name for p in self.phases]}")


class CurriculumExtraction(DistillationMethod):
    """Curriculum extraction (Gupta & Karmalkar, 2025).

    Args:
        layer_map: ``{student_name: teacher_name}``, a list of pairs, or
            ``{"student": [...], "teacher": [...]}`` to space student layers evenly over
            the teacher's. Pairs are trained in the order given (shallow to deep).
        hidden_budget: one budget for every layer phase, or a list of one per pair.
        final_budget: the softmax-KL phase's budget.
        projection_kind / projection_seed: pair i uses ``random_projection(d_t, d_s,
            seed=projection_seed + i, kind=projection_kind)``; checkpoints store seed + kind.
        freeze_earlier: phase i trains only the parameters that reach layer i but not layer
            i-1; otherwise every parameter that reaches layer i.

    "Parameters up to layer i" are found by **autograd reachability** on a sample batch:
    the trainable student parameters whose gradient of ``hidden_i.sum()`` is defined. This
    is exact for any forward (shared embeddings, parameters on the root module such as
    ``pos_embed``) where registration or call order can mislead. ``phase.trainable`` lists them.
    """

    name = "curriculum_extraction"

    def __init__(self, teacher: nn.Module, student: nn.Module, layer_map: LayerMapSpec, *,
                 hidden_budget=100, final_budget: BudgetLike = 100,
                 projection_kind: str = "gaussian", projection_seed: int = 0,
                 freeze_earlier: bool = True, **kwargs):
        super().__init__(teacher, student, final_budget=final_budget, **kwargs)
        self.layer_map = resolve_layer_map(student, teacher, layer_map)
        budgets = hidden_budget if isinstance(hidden_budget, (list, tuple)) else \
            [hidden_budget] * len(self.layer_map)
        if len(budgets) != len(self.layer_map):
            raise ValueError(f"hidden_budget: {len(budgets)} budgets for {len(self.layer_map)} "
                             "layer pairs")
        self.hidden_budgets = [as_budget(b) for b in budgets]
        self.projection_kind, self.projection_seed = projection_kind, int(projection_seed)
        self.freeze_earlier = freeze_earlier
        self.projections: List[nn.Module] = []

    def build_phases(self) -> List[Phase]:
        phases = [Phase(f"layer {i + 1}: {s} <- {t}", HIDDEN_MSE, b, pair=i)
                  for i, ((s, t), b) in enumerate(zip(self.layer_map, self.hidden_budgets))]
        return phases + [Phase("logits: softmax-KL", LOGIT_KL, self.final_budget)]

    def setup(self, sample_batch) -> List[Phase]:
        from cex_kernels import ProjectedMSELoss
        phases = super().setup(sample_batch)
        s_names = [s for s, _ in self.layer_map]
        t_names = [t for _, t in self.layer_map]
        params = {n: p for n, p in self.student.named_parameters() if n in set(self.trainable_names)}
        with torch.random.fork_rng(devices=[]):  # a dropout here must not shift the run's RNG
            with HiddenStateCapture(self.student, s_names) as cap:
                self.forward_fn(self.student, sample_batch)
            with torch.no_grad(), HiddenStateCapture(self.teacher, t_names) as tcap:
                self.forward_fn(self.teacher, sample_batch)
        reach: List[Set[str]] = []
        self.projections = []
        for i, (s, t) in enumerate(self.layer_map):
            hs, ht = cap.hidden[s], tcap.hidden[t]
            if hs.shape[:-1] != ht.shape[:-1]:
                raise ValueError(f"layer_map pair {i} ({s!r} <- {t!r}): student hidden "
                                 f"{tuple(hs.shape)} and teacher hidden {tuple(ht.shape)} must "
                                 "have the same leading dimensions (..., d_s) / (..., d_t)")
            grads = torch.autograd.grad(hs.float().sum(), list(params.values()),
                                        allow_unused=True, retain_graph=True) if hs.requires_grad \
                else [None] * len(params)
            reach.append({n for n, g in zip(params, grads) if g is not None})
            self.projections.append(ProjectedMSELoss(
                ht.shape[-1], hs.shape[-1], seed=self.projection_seed + i,
                kind=self.projection_kind, backend=self.backend).to(hs.device))
        cap.clear()
        tcap.clear()
        order = [n for n, _ in self.student.named_parameters()]
        for i, phase in enumerate(phases[:-1]):
            names = reach[i] - (set().union(*reach[:i]) if self.freeze_earlier else set())
            phase.trainable = [n for n in order if n in names]
            if not phase.trainable:
                raise ValueError(f"phase {phase.name!r} has no parameters to train (none reach "
                                 f"{self.layer_map[i][0]!r}" +
                                 (" that earlier layers did not already" if self.freeze_earlier
                                  else "") + ")")
        return phases

    def state_dict(self):
        return {**super().state_dict(), "layer_map": [list(p) for p in self.layer_map],
                "projections": [p.get_extra_state() for p in self.projections]}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        for proj, extra in zip(self.projections, state["projections"]):
            proj.set_extra_state(extra)


class OneShotDistillation(DistillationMethod):
    """Softmax-KL on the final teacher's logits only (``budget`` = that phase's budget)."""

    name = "one_shot"

    def __init__(self, teacher: nn.Module, student: nn.Module, *, budget: BudgetLike = 1.0,
                 **kwargs):
        super().__init__(teacher, student, final_budget=budget, **kwargs)

    def build_phases(self):
        return [Phase("logits: softmax-KL", LOGIT_KL, self.final_budget)]


class ProgressiveDistillation(DistillationMethod):
    """Softmax-KL to each intermediate teacher checkpoint in turn, then the final teacher.

    ``teacher_checkpoints``: modules, state dicts (loaded into a copy of ``teacher``) or
    paths to ``torch.save``-d state dicts, earliest first. ``checkpoint_budget``: one budget
    for each, or a list. Only the current phase's checkpoint is kept in memory.
    """

    name = "progressive"

    def __init__(self, teacher: nn.Module, student: nn.Module, teacher_checkpoints: Sequence, *,
                 checkpoint_budget=100, final_budget: BudgetLike = 100, **kwargs):
        super().__init__(teacher, student, final_budget=final_budget, **kwargs)
        if not teacher_checkpoints:
            raise ValueError("ProgressiveDistillation needs at least one teacher checkpoint")
        self.teacher_checkpoints = list(teacher_checkpoints)
        b = checkpoint_budget
        budgets = b if isinstance(b, (list, tuple)) else [b] * len(self.teacher_checkpoints)
        if len(budgets) != len(self.teacher_checkpoints):
            raise ValueError(f"checkpoint_budget: {len(budgets)} budgets for "
                             f"{len(self.teacher_checkpoints)} checkpoints")
        self.checkpoint_budgets = [as_budget(x) for x in budgets]
        self._loaded = (None, None)

    def build_phases(self):
        phases = [Phase(f"teacher checkpoint {k}: softmax-KL", LOGIT_KL, b, teacher_index=k)
                  for k, b in enumerate(self.checkpoint_budgets)]
        return phases + [Phase("final teacher: softmax-KL", LOGIT_KL, self.final_budget)]

    def teacher_for(self, phase: Phase) -> nn.Module:
        k = phase.teacher_index
        if k is None:
            return self.teacher
        if self._loaded[0] != k:
            ckpt = self.teacher_checkpoints[k]
            if not isinstance(ckpt, nn.Module):
                if not isinstance(ckpt, dict):
                    ckpt = torch.load(ckpt, map_location="cpu", weights_only=True)
                module = copy.deepcopy(self.teacher)
                module.load_state_dict(ckpt)
                ckpt = module
            ref = next(self.teacher.parameters(), None)
            if ref is not None:
                ckpt.to(ref.device)
            ckpt.eval().requires_grad_(False)
            self._loaded = (k, ckpt)
        return self._loaded[1]
