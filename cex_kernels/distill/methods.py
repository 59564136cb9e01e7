"""Distillation methods with one interface, so they compare fairly under one trainer.

A method turns (teacher, student, options) into a list of :class:`Phase` and, per phase,
computes the teacher's targets (under ``inference_mode``) and the student's loss:

- :class:`CurriculumExtraction`: one projected-MSE phase per mapped layer pair, then softmax-KL.
- :class:`OneShotDistillation`: the softmax-KL phase alone.
- :class:`ProgressiveDistillation`: softmax-KL to intermediate teacher checkpoints in turn,
  following the teacher's own timeline or in phases of chosen length, then to the final
  teacher (Panigrahi et al., 2024).

Offline: every method also takes a :class:`~cex_kernels.distill.cache.TeacherCache` (or
its directory) as ``teacher`` and then trains with no teacher model in memory
(:mod:`cex_kernels.distill.offline`): projected-MSE phases compare with the cached
``teacher_hidden @ P``, KL phases with the cached top-k (or sampled) log-probabilities,
through the loss ``top_k_loss`` names (:mod:`cex_kernels.distill.top_k`).

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
from cex_kernels.distill.cache import CacheError, TeacherCache
from cex_kernels.distill.layer_map import LayerMapSpec, resolve_layer_map
from cex_kernels.distill.offline import split_cached, squared_error_sum, strip_cached
from cex_kernels.distill.schedule import (HIDDEN_MSE, LOGIT_KL, Budget, BudgetLike, Phase,
                                          as_budget, timeline_segments)
from cex_kernels.projection import random_projection

PROJECTION_KINDS = ("gaussian", "rademacher", "orthogonal", "identity")


def default_forward(model: nn.Module, batch):
    batch = strip_cached(batch)  # a batch from a teacher cache carries the cached targets
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

    ``teacher`` may be a :class:`~cex_kernels.distill.cache.TeacherCache` (or a cache
    directory): offline training, ``self.offline``. ``top_k_loss`` ("renormalized" or
    "tail", see :mod:`~cex_kernels.distill.top_k`) picks the KL estimator for a top-k cache
    (a model teacher's full logits ignore it, so one config serves caching and training);
    a sampled cache always uses the sampled (unbiased) estimator.
    """

    name = "distillation"

    def __init__(self, teacher: nn.Module, student: nn.Module, *, temperature: float = 1.0,
                 hard_label_weight: float = 0.0, final_budget: BudgetLike = 1.0,
                 vocab_size: Optional[int] = None, shift_labels: Optional[bool] = None,
                 backend: str = "auto", forward_fn: Callable = default_forward,
                 top_k_loss: str = "renormalized"):
        from cex_kernels.distill.cache import INDEX
        from cex_kernels.distill.registry import load_model
        from cex_kernels.distill.top_k import TOP_K_LOSSES
        if isinstance(teacher, (str, os.PathLike)):  # a teacher cache or save_pretrained dir
            teacher = TeacherCache(teacher) if os.path.isfile(os.path.join(teacher, INDEX)) \
                else load_model(teacher)
        if isinstance(student, (str, os.PathLike)):
            student = load_model(student)
        if not isinstance(teacher, (nn.Module, TeacherCache)) or not isinstance(student, nn.Module):
            raise TypeError(f"teacher must be an nn.Module or a TeacherCache and student an "
                            f"nn.Module, got {type(teacher).__name__} and {type(student).__name__}")
        self.offline = isinstance(teacher, TeacherCache)
        if top_k_loss not in TOP_K_LOSSES:
            raise ValueError(f"top_k_loss must be one of {TOP_K_LOSSES}, got {top_k_loss!r}")
        if self.offline:
            kind = teacher.logits_kind
            if kind == "sampled" and top_k_loss != "renormalized":
                raise ValueError(f"top_k_loss={top_k_loss!r}: the cache holds sampled ids, "
                                 "which train with the sampled estimator only")
            self.top_k_loss = "sampled" if kind == "sampled" else top_k_loss
            if self.top_k_loss != "renormalized" and temperature != teacher.temperature:
                raise ValueError(f"top_k_loss={self.top_k_loss!r} needs the cache's "
                                 f"temperature ({teacher.temperature}), got temperature="
                                 f"{temperature}: its log-probabilities are normalized at that "
                                 "temperature only (the renormalized loss can re-temper)")
            if forward_fn is not default_forward:  # the user's forward never sees the cache
                user_forward = forward_fn
                forward_fn = lambda model, batch: user_forward(model, strip_cached(batch))  # noqa: E731
        else:
            self.top_k_loss = top_k_loss
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
            if self.offline:
                self._check_cached_logits(s)
                t = self.teacher_targets(self.phases[-1], batch)["logprobs"]
                t = t.new_empty((*t.shape[:-1], self.teacher.vocab_size))
            else:
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

    def _check_cached_logits(self, student_logits: Tensor) -> None:
        """Offline: the cache's vocabulary, and a stream for every KL phase's teacher."""
        self.teacher.check_vocab(student_logits.shape[-1], self.vocab_size)
        for phase in self.phases:
            if phase.kind == LOGIT_KL:
                self.teacher.check_stream(self.cache_stream(phase),
                                          f"logits for phase {phase.name!r}")
        names = [str(c) for c in getattr(self, "teacher_checkpoints", [])]
        cached = self.teacher.index.get("checkpoints", [])
        if names and all(isinstance(c, (str, os.PathLike)) for c in self.teacher_checkpoints) \
                and names != cached:
            raise CacheError(f"teacher cache {self.teacher.path!r} holds the checkpoints "
                             f"{cached}, this run names {names}")

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

    def cache_stream(self, phase: Phase) -> str:
        """The cache stream a phase reads (offline)."""
        if phase.kind == LOGIT_KL:
            k = getattr(phase, "teacher_index", None)
            return "logits" if k is None else f"logits@{k}"
        return f"hidden.{phase.pair}"

    def _cached_targets(self, phase: Phase, batch):
        _, cached = split_cached(batch)
        if cached is None:
            raise ValueError(f"{self.name}: the teacher is a cache, but this batch carries no "
                             "cached targets: train with cex_kernels.distill.Trainer, which "
                             "reads them for each batch (offline.CacheCollator)")
        stream = self.cache_stream(phase)
        if stream not in cached:
            self.teacher.check_stream(stream, f"targets for phase {phase.name!r}")
        return cached[stream] if phase.kind == LOGIT_KL else cached[stream]["values"]

    @torch.inference_mode()
    def teacher_targets(self, phase: Phase, batch):
        """The teacher's hidden state (projected-MSE phases) or logits (KL phases); from a
        cache: the projected hidden state, or ``{"logprobs", "indices"[, "weights"]}``."""
        if self.offline:
            return self._cached_targets(phase, batch)
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
            kd = self._kd_sum(logits, targets, mask) / rows
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
        if self.offline:  # the cache holds teacher_hidden @ P already
            mse = squared_error_sum(hidden, targets, mask) / (rows * proj.d_student)
        else:
            mse = projected_mse_sum(hidden, targets, proj.projection, mask,
                                    backend=self.backend) / (rows * proj.d_student)
        return mse, {"mse": mse.detach()}

    def _kd_sum(self, logits: Tensor, targets, mask) -> Tensor:
        """``T² Σ KL`` over the kept rows: the full teacher, or a cache's k ids per token."""
        if not self.offline:
            return kd_loss_sum(logits, targets, temperature=self.temperature, mask=mask,
                               vocab_size=self.vocab_size, backend=self.backend)
        from cex_kernels.distill import top_k
        lp, idx, T = targets["logprobs"], targets["indices"], self.temperature
        if self.top_k_loss == "renormalized":
            return top_k.renormalized_kl_sum(logits, lp, idx, temperature=T, mask=mask,
                                             cache_temperature=self.teacher.temperature,
                                             vocab_size=self.vocab_size, backend=self.backend)
        if self.top_k_loss == "tail":
            return top_k.tail_kl_sum(logits, lp, idx, temperature=T, mask=mask,
                                     vocab_size=self.vocab_size)
        return top_k.sampled_kl_sum(logits, lp, idx, targets["weights"], temperature=T,
                                    mask=mask, vocab_size=self.vocab_size)

    def loss_flops(self, phase: Phase, targets: torch.Tensor, rows: Optional[int] = None) -> int:
        """Matmul FLOPs of the loss itself (projected-MSE's ``teacher @ P`` over the real
        rows, all of them when ``rows`` is None; KL has none)."""
        if phase.kind != HIDDEN_MSE or self.offline:  # offline: P was applied at caching
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
        if self.offline:
            teacher.check_layers(self.layer_map, int(projection_seed), projection_kind)
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
            if self.offline:  # the cached projected states stand in for the teacher's
                tcap = self._cached_hidden(sample_batch)
            else:
                with torch.no_grad(), HiddenStateCapture(self.teacher, t_names) as tcap:
                    tcap.run(self.forward_fn, self.teacher, sample_batch)
                tcap.check_calls("teacher")
        reach: List[Set[str]] = []
        self.projections = []
        for i, (s, t) in enumerate(self.layer_map):
            hs, ht = cap.hidden[s], tcap.hidden[t if not self.offline else i]
            if self.offline:
                self.teacher.check_width(i, hs.shape[-1])
            if hs.shape[:-1] != ht.shape[:-1]:
                raise ValueError(f"layer_map pair {i} ({s!r} <- {t!r}): student hidden "
                                 f"{tuple(hs.shape)} and teacher hidden {tuple(ht.shape)} must "
                                 "have the same leading dimensions (..., d_s) / (..., d_t)")
            self._learn_rows(i, sample_batch, hs.shape[:-1])
            grads = torch.autograd.grad(hs.float().sum(), list(params.values()),
                                        allow_unused=True, retain_graph=True) if hs.requires_grad \
                else [None] * len(params)
            reach.append({n for n, g in zip(params, grads) if g is not None})
            d_t = self.teacher.layers[i]["d_teacher"] if self.offline else ht.shape[-1]
            try:
                proj = FixedProjection(d_t, hs.shape[-1], seed=self.projection_seed + i,
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

    def _cached_hidden(self, batch):
        """Offline setup: the cached projected states of ``batch`` as a capture-like object
        (``.hidden[i]``, ``.clear()``)."""
        import types
        hidden = {i: self.teacher_targets(phase, batch)
                  for i, phase in enumerate(p for p in self.phases if p.kind == HIDDEN_MSE)}
        return types.SimpleNamespace(hidden=hidden, clear=hidden.clear)

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
    """Softmax-KL to intermediate teacher checkpoints, then the final teacher (Panigrahi et
    al., 2024). ``teacher_checkpoints``: modules, state dicts (loaded into a copy of
    ``teacher``), paths to ``torch.save``-d state dicts or ``save_pretrained`` directories,
    earliest first. Only the checkpoint in use is kept in memory. Two schedules:

    - ``schedule="timeline"`` (the original's): the student follows the teacher's own
      training run. ``checkpoint_steps[k]`` is the teacher step at which checkpoint ``k`` was
      saved (strictly increasing); student step ``t`` (1-based) distils from the first
      checkpoint with ``checkpoint_steps[k] >= t * multiplier``, and from the final teacher
      once ``t * multiplier`` is past them all; ``total_steps`` is the student's whole budget
      (optimizer steps). One optimizer and learning-rate schedule run across the switches
      (each phase ``continues`` the one before). With checkpoints saved at regular intervals
      this is progressive distillation as in their parity code; with one intermediate
      checkpoint (at the teacher's phase transition) it is their "2-shot" variant.
    - ``schedule="phases"`` (the default, as before): one phase per checkpoint with its own
      budget (``checkpoint_budget``: one for each or a list; ``final_budget``), each with a
      fresh optimizer; which checkpoints to give, and when, is the caller's choice.
    """

    name = "progressive"
    SCHEDULES = ("phases", "timeline")

    def __init__(self, teacher: nn.Module, student: nn.Module, teacher_checkpoints: Sequence, *,
                 schedule: str = "phases", checkpoint_budget=None,
                 final_budget: Optional[BudgetLike] = None,
                 checkpoint_steps: Optional[List[int]] = None,
                 multiplier: Optional[float] = None, total_steps: Optional[int] = None,
                 **kwargs):
        if not teacher_checkpoints:
            raise ValueError("ProgressiveDistillation needs at least one teacher checkpoint")
        if schedule not in self.SCHEDULES:
            raise ValueError(f"schedule must be one of {self.SCHEDULES}, got {schedule!r}")
        if schedule == "timeline":
            self._check_timeline(teacher_checkpoints, checkpoint_budget, final_budget,
                                 checkpoint_steps, multiplier, total_steps)
            final_budget = total_steps  # replaced by the timeline's own phases
        else:
            given = [n for n, v in (("checkpoint_steps", checkpoint_steps),
                                    ("multiplier", multiplier), ("total_steps", total_steps))
                     if v is not None]
            if given:
                raise ValueError(f"{given} belong to schedule='timeline'; schedule='phases' "
                                 "takes checkpoint_budget and final_budget")
            final_budget = 100 if final_budget is None else final_budget
        super().__init__(teacher, student, final_budget=final_budget, **kwargs)
        self.schedule = schedule
        self.teacher_checkpoints = list(teacher_checkpoints)
        self.checkpoint_steps = None if checkpoint_steps is None else list(checkpoint_steps)
        self.multiplier = None if multiplier is None else float(multiplier)
        self.total_steps = total_steps
        if schedule == "phases":
            b = 100 if checkpoint_budget is None else checkpoint_budget
            budgets = b if isinstance(b, (list, tuple)) else [b] * len(self.teacher_checkpoints)
            if len(budgets) != len(self.teacher_checkpoints):
                raise ValueError(f"checkpoint_budget: {len(budgets)} budgets for "
                                 f"{len(self.teacher_checkpoints)} checkpoints")
            self.checkpoint_budgets = [as_budget(x) for x in budgets]
        self._loaded = (None, None)

    @staticmethod
    def _check_timeline(checkpoints, checkpoint_budget, final_budget, steps, multiplier, total):
        if checkpoint_budget is not None or final_budget is not None:
            raise ValueError("schedule='timeline' takes its budgets from checkpoint_steps, "
                             "multiplier and total_steps; do not pass checkpoint_budget or "
                             "final_budget")
        if not isinstance(steps, (list, tuple)) or not steps or any(
                isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in steps):
            raise ValueError("schedule='timeline' needs checkpoint_steps: the teacher step (an "
                             f"int >= 0) of each checkpoint, got {steps!r}")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"checkpoint_steps must be strictly increasing, got {list(steps)}")
        if len(steps) != len(checkpoints):
            raise ValueError(f"checkpoint_steps: {len(steps)} steps for {len(checkpoints)} "
                             "checkpoints")
        if multiplier is None or isinstance(multiplier, bool) or \
                not isinstance(multiplier, (int, float)) or not math.isfinite(multiplier) \
                or multiplier <= 0:
            raise ValueError(f"schedule='timeline' needs multiplier: a finite number > 0 (teacher "
                             f"steps per student step), got {multiplier!r}")
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(f"schedule='timeline' needs total_steps: the student's budget in "
                             f"optimizer steps (an int >= 1), got {total!r}")

    def build_phases(self):
        if self.schedule == "timeline":
            runs = timeline_segments(self.checkpoint_steps, self.multiplier, self.total_steps)
            return [Phase(f"teacher step {self.checkpoint_steps[k]}: softmax-KL" if k is not None
                          else "final teacher: softmax-KL", LOGIT_KL, Budget(steps=n),
                          teacher_index=k, continues=i > 0)
                    for i, (k, n) in enumerate(runs)]
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
