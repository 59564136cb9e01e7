"""Distillation methods with one interface, so they compare fairly under one trainer.

A method turns (teacher, student, options) into a list of :class:`Phase` and, per phase,
computes the teacher's targets (under ``inference_mode``) and the student's loss:

- :class:`CurriculumExtraction`: one projected-MSE phase per mapped layer pair, then softmax-KL.
- :class:`OneShotDistillation`: the softmax-KL phase alone.
- :class:`ProgressiveDistillation`: softmax-KL to each intermediate teacher checkpoint in
  turn, then to the final teacher (Panigrahi et al., 2024).

Batches: a dict (passed as ``model(**batch)`` without ``"labels"``), a tuple/list
``(inputs, labels?)`` (``model(inputs)``) or a tensor; override with ``forward_fn``. Losses
read only real tokens (:mod:`cex_kernels.distill.batch`) and are sums divided by the step's
global row counts (``norm``), so accumulation and DDP give the large-batch gradient.
"""
from __future__ import annotations

import copy
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor, nn

from cex_kernels.distill import batch as B
from cex_kernels.distill._losses import ce_loss_sum, kd_loss_sum, projected_mse_sum
from cex_kernels.distill.hooks import HiddenStateCapture, first_tensor
from cex_kernels.distill.layer_map import LayerMapSpec, resolve_layer_map
from cex_kernels.distill.schedule import (HIDDEN_MSE, LOGIT_KL, BudgetLike, Phase, as_budget)
from cex_kernels.projection import random_projection

PROJECTION_KINDS = ("gaussian", "rademacher", "orthogonal", "identity")


def default_forward(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def batch_labels(batch) -> Optional[torch.Tensor]:
    return B.raw_labels(batch)


def logits_of(output) -> torch.Tensor:
    """Logits from a model output: a tensor, an HF ``ModelOutput`` (``.logits``) or a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    return first_tensor(output)


def model_width(model: nn.Module) -> Optional[int]:
    """The hidden width a Hugging Face config states (``hidden_size``/``n_embd``), else None."""
    cfg = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return None


class FixedProjection(nn.Module):
    """The fixed map ``P (d_teacher, d_student)`` of one layer pair: ``random_projection(seed,
    kind)`` or, for ``kind="identity"`` (equal widths), the identity. A non-persistent buffer;
    the method's state stores ``(seed, kind, d_teacher, d_student)``, not the matrix."""

    def __init__(self, d_teacher: int, d_student: int, *, seed: int, kind: str):
        super().__init__()
        if kind == "identity" and d_teacher != d_student:
            raise ValueError(f"projection_kind='identity' needs equal widths, got teacher "
                             f"{d_teacher} and student {d_student}")
        self.d_teacher, self.d_student, self.seed, self.kind = d_teacher, d_student, seed, kind
        self.register_buffer("projection", self._build(), persistent=False)

    def _build(self) -> Tensor:
        if self.kind == "identity":
            return torch.eye(self.d_teacher)
        return random_projection(self.d_teacher, self.d_student, seed=self.seed, kind=self.kind)

    def get_extra_state(self):
        return {"seed": self.seed, "kind": self.kind, "d_teacher": self.d_teacher,
                "d_student": self.d_student, "learnable": False}

    def set_extra_state(self, state):
        if (state["d_teacher"], state["d_student"]) != (self.d_teacher, self.d_student):
            raise ValueError(f"projection: checkpoint is for ({state['d_teacher']}, "
                             f"{state['d_student']}), this run has ({self.d_teacher}, "
                             f"{self.d_student})")
        self.seed, self.kind = int(state["seed"]), state["kind"]
        self.projection = self._build().to(self.projection.device)


class DistillationMethod:
    """Base class. Subclasses implement :meth:`build_phases` (and may override
    :meth:`teacher_for`). ``setup(sample_batch)`` must run before training (the trainer
    calls it): it builds the phases and fills in each phase's ``trainable`` names.

    Common options: ``temperature`` (> 0), ``hard_label_weight`` w in [0, 1] (the KL phases
    train ``(1 - w)·KD + w·CE``), ``vocab_size`` (compare only the first ``vocab_size``
    logits when teacher and student vocabularies differ), ``shift_labels`` (None: shift
    hard labels for Hugging Face causal LMs, as their ``labels = input_ids`` convention).
    """

    name = "distillation"

    def __init__(self, teacher: nn.Module, student: nn.Module, *, temperature: float = 1.0,
                 hard_label_weight: float = 0.0, final_budget: BudgetLike = 1.0,
                 vocab_size: Optional[int] = None, shift_labels: Optional[bool] = None,
                 backend: str = "auto", forward_fn: Callable = default_forward):
        from cex_kernels.distill.registry import load_model
        if isinstance(teacher, (str, os.PathLike)):  # a save_pretrained directory
            teacher = load_model(teacher)
        if isinstance(student, (str, os.PathLike)):
            student = load_model(student)
        if not isinstance(teacher, nn.Module) or not isinstance(student, nn.Module):
            raise TypeError(f"teacher and student must be nn.Modules, got "
                            f"{type(teacher).__name__} and {type(student).__name__}")
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
                or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if not isinstance(hard_label_weight, (int, float)) or not 0.0 <= hard_label_weight <= 1.0:
            raise ValueError(f"hard_label_weight must be in [0, 1], got {hard_label_weight!r}")
        if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size < 1):
            raise ValueError(f"vocab_size must be a positive int or None, got {vocab_size!r}")
        self.teacher, self.student = teacher, student
        self.temperature, self.hard_label_weight = float(temperature), float(hard_label_weight)
        self.final_budget = as_budget(final_budget)
        self.vocab_size = vocab_size
        self.shift_labels = B.is_causal_lm(student) if shift_labels is None else bool(shift_labels)
        self.backend, self.forward_fn = backend, forward_fn
        # A projected-MSE phase stops the student's forward at its layer. Wrappers whose
        # forward must run to the end (DDP, DeepSpeed: their backward is prepared after
        # the forward returns) set this False.
        self.stop_early = True
        self.phases: List[Phase] = []
        self.row_rules: Dict[Any, B.RowRule] = {}
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

    def _learn_rows(self, key, batch, lead) -> None:
        """Fix how the rows of the loss ``key`` ("logits" or a layer pair) are counted."""
        self.row_rules[key] = B.RowRule(batch, lead)

    def _check_logits(self, batch):
        if not any(p.kind == LOGIT_KL for p in self.phases):
            return
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            s = logits_of(self.forward_fn(self.student, batch))
            t = self.teacher_targets(self.phases[-1], batch)
        v = self.vocab_size
        if v is not None and not v <= min(s.shape[-1], t.shape[-1]):
            raise ValueError(f"{self.name}: vocab_size={v} is larger than the student "
                             f"({s.shape[-1]}) or teacher ({t.shape[-1]}) vocabulary")
        if s.shape[:-1] != t.shape[:-1] or (v is None and s.shape[-1] != t.shape[-1]):
            raise ValueError(f"{self.name}: student logits {tuple(s.shape)} and teacher logits "
                             f"{tuple(t.shape)} differ in shape; softmax-KL needs the same "
                             "leading dimensions and vocabulary (pass vocab_size= to compare "
                             "the first vocab_size entries of both)")
        self._learn_rows("logits", batch, s.shape[:-1])
        if self.hard_label_weight > 0:
            labels = B.aligned_labels(batch, self.shift_labels)
            if labels is None:
                raise ValueError(f"{self.name}: hard_label_weight > 0 needs labels in the batch "
                                 "(the collator makes labels = input_ids for causal LMs)")
            if labels.shape != s.shape[:-1]:
                raise ValueError(f"{self.name}: labels {tuple(labels.shape)} do not match the "
                                 f"logits' leading dimensions {tuple(s.shape[:-1])}")

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

    def _rule(self, phase: Phase) -> B.RowRule:
        return self.row_rules["logits" if phase.kind == LOGIT_KL else phase.pair]

    def batch_counts(self, phase: Phase, batch) -> Tuple[int, int]:
        """(real rows, hard-label rows) of a batch in ``phase``: the loss divisors' parts."""
        labels = B.count_labels(batch, self.shift_labels) if phase.kind == LOGIT_KL else 0
        return self._rule(phase).count(batch), labels

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

    def student_loss(self, phase: Phase, batch, targets: torch.Tensor,
                     norm: Optional[Tuple[float, float]] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        """``(loss, parts)``: sums over the batch's real rows divided by ``norm = (rows,
        label_rows)``, the step's global counts (default: this batch's own). ``parts`` holds
        the detached terms: ``mse`` (projected-MSE phases), ``kd`` and ``ce`` (KL phases)."""
        rows, label_rows = norm if norm is not None else self.batch_counts(phase, batch)
        rows, label_rows = max(rows, 1), max(label_rows, 1)
        mask = self._rule(phase).mask(batch)
        if phase.kind == LOGIT_KL:
            logits = logits_of(self.forward_fn(self.student, batch))
            kd = kd_loss_sum(logits, targets, temperature=self.temperature, mask=mask,
                             vocab_size=self.vocab_size, backend=self.backend) / rows
            w = self.hard_label_weight
            if w == 0.0:
                return kd, {"kd": kd.detach()}
            ce = ce_loss_sum(logits, B.aligned_labels(batch, self.shift_labels)) / label_rows
            return (1.0 - w) * kd + w * ce, {"kd": kd.detach(), "ce": ce.detach()}
        name = self.layer_map[phase.pair][0]
        with HiddenStateCapture(self.student, [name],
                                stop_after=name if self.stop_early else None) as cap:
            cap.run(self.forward_fn, self.student, batch)
        hidden, proj = cap.hidden[name], self.projections[phase.pair]
        mse = projected_mse_sum(hidden, targets, proj.projection, mask,
                                backend=self.backend) / (rows * proj.d_student)
        return mse, {"mse": mse.detach()}

    def loss_flops(self, phase: Phase, targets: torch.Tensor, rows: Optional[int] = None) -> int:
        """Matmul FLOPs of the loss itself (projected-MSE's ``teacher @ P`` over the real
        rows, all of them when ``rows`` is None; KL has none)."""
        if phase.kind != HIDDEN_MSE:
            return 0
        proj = self.projections[phase.pair]
        if rows is None:
            rows = targets.numel() // proj.d_teacher
        return 2 * rows * proj.d_teacher * proj.d_student

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
            the teacher's. Pairs are trained in the order given (shallow to deep). A module
            called several times per forward is named with a call index, ``"name@k"``.
        hidden_budget: one budget for every layer phase, or a list of one per pair.
        final_budget: the softmax-KL phase's budget.
        projection_kind / projection_seed: pair i uses ``random_projection(d_t, d_s,
            seed=projection_seed + i, kind=projection_kind)``; ``"identity"`` (equal widths
            only) uses no projection. Checkpoints store seed + kind.
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
        teacher, student = self.teacher, self.student  # loaded when given as directories
        if projection_kind not in PROJECTION_KINDS:
            raise ValueError(f"projection_kind must be one of {PROJECTION_KINDS}, got "
                             f"{projection_kind!r}")
        d_t, d_s = model_width(teacher), model_width(student)
        if projection_kind == "identity" and None not in (d_t, d_s) and d_t != d_s:
            raise ValueError(f"projection_kind='identity' needs equal widths, got teacher "
                             f"{d_t} and student {d_s}")
        self.layer_map = resolve_layer_map(student, teacher, layer_map)
        budgets = hidden_budget if isinstance(hidden_budget, (list, tuple)) else \
            [hidden_budget] * len(self.layer_map)
        if len(budgets) != len(self.layer_map):
            raise ValueError(f"hidden_budget: {len(budgets)} budgets for {len(self.layer_map)} "
                             "layer pairs")
        self.hidden_budgets = [as_budget(b) for b in budgets]
        self.projection_kind, self.projection_seed = projection_kind, int(projection_seed)
        self.freeze_earlier = freeze_earlier
        self.projections: List[FixedProjection] = []

    def build_phases(self) -> List[Phase]:
        phases = [Phase(f"layer {i + 1}: {s} <- {t}", HIDDEN_MSE, b, pair=i)
                  for i, ((s, t), b) in enumerate(zip(self.layer_map, self.hidden_budgets))]
        return phases + [Phase("logits: softmax-KL", LOGIT_KL, self.final_budget)]

    def setup(self, sample_batch) -> List[Phase]:
        phases = super().setup(sample_batch)
        s_names = [s for s, _ in self.layer_map]
        t_names = [t for _, t in self.layer_map]
        params = {n: p for n, p in self.student.named_parameters() if n in set(self.trainable_names)}
        with torch.random.fork_rng(devices=[]):  # a dropout here must not shift the run's RNG
            with HiddenStateCapture(self.student, s_names) as cap:
                cap.run(self.forward_fn, self.student, sample_batch)
            cap.check_calls("student")
            with torch.no_grad(), HiddenStateCapture(self.teacher, t_names) as tcap:
                tcap.run(self.forward_fn, self.teacher, sample_batch)
            tcap.check_calls("teacher")
        reach: List[Set[str]] = []
        self.projections = []
        for i, (s, t) in enumerate(self.layer_map):
            hs, ht = cap.hidden[s], tcap.hidden[t]
            if hs.shape[:-1] != ht.shape[:-1]:
                raise ValueError(f"layer_map pair {i} ({s!r} <- {t!r}): student hidden "
                                 f"{tuple(hs.shape)} and teacher hidden {tuple(ht.shape)} must "
                                 "have the same leading dimensions (..., d_s) / (..., d_t)")
            self._learn_rows(i, sample_batch, hs.shape[:-1])
            grads = torch.autograd.grad(hs.float().sum(), list(params.values()),
                                        allow_unused=True, retain_graph=True) if hs.requires_grad \
                else [None] * len(params)
            reach.append({n for n, g in zip(params, grads) if g is not None})
            try:
                proj = FixedProjection(ht.shape[-1], hs.shape[-1], seed=self.projection_seed + i,
                                       kind=self.projection_kind)
            except ValueError as exc:
                raise ValueError(f"layer_map pair {i} ({s!r} <- {t!r}): {exc}") from None
            self.projections.append(proj.to(hs.device))
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

    ``teacher_checkpoints``: modules, state dicts (loaded into a copy of ``teacher``),
    paths to ``torch.save``-d state dicts or ``save_pretrained`` directories, earliest first. ``checkpoint_budget``: one budget
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
            if isinstance(ckpt, (str, os.PathLike)) and os.path.isdir(ckpt):
                from cex_kernels.distill.registry import load_model
                ckpt = load_model(ckpt)  # a save_pretrained directory
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
