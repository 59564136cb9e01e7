"""Sparse parity: curriculum extraction vs one-shot / progressive distillation vs labels alone.

The experiment of Gupta & Karmalkar (2025) at a size a CPU runs in minutes:

1. Data: ``x`` uniform in ``{±1}^d``; label ``y = 1`` when ``prod_{i in S} x_i = -1`` for a
   secret support ``S`` of ``k`` coordinates (drawn from the seed), else ``0``.
2. Teacher: a wide 2-layer MLP (``hidden`` = Linear + ReLU, then ``head``) trained on labels
   with cross-entropy, saving a state dict every ``checkpoint_every`` steps on the way (what
   progressive distillation needs and curriculum extraction does not).
3. Students (narrow 2-layer MLPs, all from the same initialisation) trained through
   :class:`cex_kernels.distill.Trainer` under the **same sample budget**:

   - ``labels``: cross-entropy on the hard labels (``OneShotDistillation`` with
     ``hard_label_weight=1``, so it runs through the same loop);
   - ``one_shot``: softmax-KL to the final teacher's logits;
   - ``progressive``: softmax-KL along the teacher's own timeline, as in Panigrahi et al.'s
     code: student step ``t`` distils from the first checkpoint saved at or after teacher
     step ``t * multiplier``, then from the final teacher (one optimizer throughout). The
     multiplier is ``progressive_multiplier``, or by default set so that the student has
     walked the teacher's whole run after ``progressive_until`` of its budget;
   - ``progressive_2shot``: the same rule with a single intermediate checkpoint, taken in
     the teacher's phase transition (their "2-shot" variant; our criterion, since their
     scripts take the step by hand: the first saved checkpoint whose test accuracy is at
     least halfway from chance to the final teacher's);
   - ``progressive_thresholds``: this project's earlier baseline: ``n_checkpoints``
     checkpoints where the teacher's accuracy first passes evenly spaced levels between
     chance and ``teacher_target``, then the final teacher, an equal share of the budget
     each, a fresh optimizer per checkpoint. Those checkpoints bunch inside the phase
     transition, so the student gets no early, easy teachers and restarts AdamW each time;
   - ``curriculum_extraction``: projected-MSE of the student's hidden layer to a fixed random
     projection of the teacher's hidden layer, then softmax-KL.

Test accuracy is the fraction correct on fresh samples (0.5 = chance), evaluated every
``eval_every`` steps; each curve point also carries the samples seen and the cumulative
training FLOPs (teacher forward + student forward/backward matmuls, from the trainer's
counter; the ``labels`` baseline's count includes the teacher forward pass that
``OneShotDistillation`` runs even at ``hard_label_weight=1``). :func:`run_comparison` returns
a JSON-ready dict; ``python/sparse_parity.py`` and ``cex demo`` print, save and plot it.

The default :class:`ParityConfig` (d=60, k=5, widths 1024 -> 64, 100k student samples) was
chosen by experiment on a 2-core CPU: about 15 s with one torch thread; curriculum extraction
0.999 / 0.985 / 0.989 test accuracy on seeds 0 / 1 / 2 where one-shot stays at chance
(0.494 / 0.497 / 0.502) and the progressive baselines end between 0.50 and 0.98. See
python/RESULTS.md for every variant, the 200k-sample budget and how robust that is.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from cex_kernels.distill import (Budget, CurriculumExtraction, OneShotDistillation,
                                 ProgressiveDistillation)
from cex_kernels.experiments._curves import fit_with_curve

METHODS = ("labels", "one_shot", "progressive", "progressive_2shot", "progressive_thresholds",
           "curriculum_extraction")
DEFAULT_METHODS = ("labels", "one_shot", "progressive", "curriculum_extraction")


@contextlib.contextmanager
def torch_threads(n: Optional[int]):
    """Run with ``n`` intra-op CPU threads (restored after). These models are small: on a
    CPU one thread is several times faster than many that contend for the cores."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


TEACHER_EVAL_EVERY = 50  # teacher steps per fresh data block and test evaluation


@dataclass
class ParityConfig:
    """One sparse-parity comparison. ``samples`` is every student's budget (fresh samples,
    ``samples / batch_size`` steps); ``hidden_fraction`` of it goes to curriculum
    extraction's projected-MSE phase (the rest to its KL phase)."""
    d: int = 60
    k: int = 5
    teacher_width: int = 1024
    student_width: int = 64
    teacher_samples: int = 4_000_000    # upper bound; training stops early at teacher_target
    teacher_target: float = 0.99       # test accuracy at which the teacher stops
    teacher_lr: float = 1e-3
    teacher_weight_decay: float = 0.0
    samples: int = 100_000             # each student's sample budget
    batch_size: int = 128
    lr: float = 3e-3
    hidden_fraction: float = 0.25
    temperature: float = 1.0
    projection_kind: str = "gaussian"
    checkpoint_every: int = 50         # teacher steps between saved checkpoints (multiple of 50)
    progressive_multiplier: Optional[float] = None  # teacher steps per student step
    progressive_until: float = 0.5     # ... by default: the timeline ends at this budget share
    n_checkpoints: int = 4             # progressive_thresholds only
    eval_every: int = 25               # steps
    test_size: int = 8192
    seed: int = 0
    device: str = "cpu"
    methods: Sequence[str] = field(default_factory=lambda: list(DEFAULT_METHODS))

    def __post_init__(self):
        if self.checkpoint_every < 1 or self.checkpoint_every % TEACHER_EVAL_EVERY:
            raise ValueError(f"checkpoint_every must be a positive multiple of "
                             f"{TEACHER_EVAL_EVERY} (the teacher's evaluation interval), got "
                             f"{self.checkpoint_every}")
        if not 0.0 < self.progressive_until <= 1.0:
            raise ValueError(f"progressive_until must be in (0, 1], got {self.progressive_until}")
        if self.progressive_multiplier is not None and not self.progressive_multiplier > 0:
            raise ValueError(f"progressive_multiplier must be > 0, got "
                             f"{self.progressive_multiplier}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; expected some of {METHODS}")

    @classmethod
    def paper(cls, **overrides) -> "ParityConfig":
        """The paper's setting: d=100, k=6, 2M student samples. The widths and the teacher's
        budget are our choice (not taken from the paper); see python/RESULTS.md for the
        GPU-time estimate."""
        base = dict(d=100, k=6, teacher_width=4096, student_width=100,
                    teacher_samples=200_000_000, samples=2_000_000, batch_size=512,
                    eval_every=200, checkpoint_every=1000)
        base.update(overrides)
        return cls(**base)


class TwoLayerMLP(nn.Module):
    """``hidden`` (Linear + ReLU) then ``head`` (Linear to 2 logits): the layer map of
    curriculum extraction is ``{"hidden": "hidden"}``."""

    def __init__(self, d: int, width: int, n_out: int = 2):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(d, width), nn.ReLU())
        self.head = nn.Linear(width, n_out)

    def forward(self, x):
        return self.head(self.hidden(x))


def parity_support(d: int, k: int, seed: int) -> List[int]:
    g = torch.Generator().manual_seed(10_007 * seed + 17)
    return sorted(torch.randperm(d, generator=g)[:k].tolist())


def parity_data(n: int, d: int, support: Sequence[int], seed: int) -> TensorDataset:
    """``(x, y)``: ``x`` uniform in ``{±1}^d`` (float32), ``y = 1`` where the product over
    ``support`` is -1 (int64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 2, (n, d), generator=g).float().mul_(2).sub_(1)
    y = (x[:, list(support)].prod(dim=1) < 0).long()
    return TensorDataset(x, y)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> float:
    model_was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), chunk):
        correct += (model(x[i:i + chunk]).argmax(-1) == y[i:i + chunk]).sum().item()
    model.train(model_was_training)
    return correct / max(len(x), 1)


def _state(model: nn.Module) -> Dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_teacher(cfg: ParityConfig, support, test, log: Callable[[str], None]) -> Dict:
    """Plain supervised training of the wide teacher on fresh samples (cross-entropy, AdamW);
    stops at ``teacher_target`` test accuracy or ``teacher_samples``. Keeps a state dict
    every ``checkpoint_every`` steps (``saved``: step, test accuracy, state) and the
    ``n_checkpoints`` accuracy-threshold ones (``threshold_checkpoints``)."""
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    teacher = TwoLayerMLP(cfg.d, cfg.teacher_width).to(device)
    opt = torch.optim.AdamW(teacher.parameters(), lr=cfg.teacher_lr,
                            weight_decay=cfg.teacher_weight_decay)
    steps = math.ceil(cfg.teacher_samples / cfg.batch_size)
    chunk = TEACHER_EVAL_EVERY  # steps per freshly drawn block of data
    x_test, y_test = (t.to(device) for t in test.tensors)
    # progressive_thresholds' checkpoints: the first evaluation at which the teacher's test
    # accuracy passes each of n evenly spaced levels between chance and teacher_target.
    levels = [0.5 + (cfg.teacher_target - 0.5) * j / (cfg.n_checkpoints + 1)
              for j in range(1, cfg.n_checkpoints + 1)]
    captured: List = [None] * len(levels)
    saved: List[Dict] = []
    history: List[Dict] = []
    t0, step, acc = time.perf_counter(), 0, 0.0
    while step < steps:
        block = parity_data(chunk * cfg.batch_size, cfg.d, support,
                            seed=1_000_000 + 7919 * cfg.seed + step)
        xb, yb = (t.to(device) for t in block.tensors)
        for j in range(chunk):
            sl = slice(j * cfg.batch_size, (j + 1) * cfg.batch_size)
            loss = F.cross_entropy(teacher(xb[sl]), yb[sl])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        acc = accuracy(teacher, x_test, y_test)
        history.append({"step": step, "samples": step * cfg.batch_size, "loss": loss.item(),
                        "test_acc": acc})
        state = None
        if step % cfg.checkpoint_every == 0:
            state = _state(teacher)
            saved.append({"step": step, "test_acc": acc, "state": state})
        for i, level in enumerate(levels):
            if captured[i] is None and acc >= level:
                captured[i] = (step, state if state is not None else _state(teacher))
        if acc >= cfg.teacher_target:
            break
    final_sd = _state(teacher)
    captured = [c if c is not None else (step, final_sd) for c in captured]
    teacher.eval().requires_grad_(False)
    secs = time.perf_counter() - t0
    log(f"teacher (width {cfg.teacher_width}): {step} steps, {step * cfg.batch_size} samples, "
        f"test acc {acc:.3f}, {secs:.1f}s")
    if acc < cfg.teacher_target:
        log(f"warning: the teacher reached only {acc:.3f} test accuracy (target "
            f"{cfg.teacher_target}) within {cfg.teacher_samples} samples; distilling from it "
            "says little (raise teacher_samples)")
    return {"model": teacher, "saved": saved,
            "threshold_checkpoints": [c[1] for c in captured],
            "threshold_checkpoint_steps": [c[0] for c in captured],
            "saved_checkpoint_steps": [c["step"] for c in saved],
            "reached_target": acc >= cfg.teacher_target,
            "steps": step, "samples": step * cfg.batch_size, "test_acc": acc,
            "seconds": secs, "history": history}


def transition_checkpoint(saved: Sequence[Dict], final_acc: float) -> Dict:
    """The 2-shot variant's intermediate checkpoint: the first saved one whose test accuracy
    is at least halfway from chance (0.5) to the final teacher's (the middle of the phase
    transition); the last saved one when none is."""
    half = 0.5 + (final_acc - 0.5) / 2
    return next((c for c in saved if c["test_acc"] >= half), saved[-1])


def progressive_plan(teacher_run: Dict, *, student_steps: int, until: float,
                     multiplier: Optional[float] = None) -> Dict:
    """The timeline variants' checkpoints (``timeline``: every saved one before the teacher's
    last step; ``two_shot``: the transition one) and their ``multiplier``: the given one, or
    teacher steps / (``until`` x ``student_steps``), so that the student has walked the
    teacher's whole run after ``until`` of its budget. ``teacher_run`` holds ``saved``
    (step, test_acc, state), ``steps`` and ``test_acc``."""
    # The checkpoint at the teacher's last step is the final teacher itself.
    saved = [c for c in teacher_run["saved"] if c["step"] < teacher_run["steps"]]
    m = multiplier or teacher_run["steps"] / (until * student_steps)
    mid = transition_checkpoint(saved, teacher_run["test_acc"]) if saved else None
    return {"multiplier": m, "student_steps": student_steps,
            "timeline": saved, "two_shot": [mid] if mid else [], "timeline_checkpoints": len(saved),
            "two_shot_step": mid["step"] if mid else None,
            "two_shot_test_acc": mid["test_acc"] if mid else None}


def progressive_method(name: str, teacher: nn.Module, student: nn.Module, plan: Dict,
                       temperature: float):
    """``progressive`` (every saved checkpoint) or ``progressive_2shot`` on the teacher's
    timeline, as ``progressive_plan`` laid it out (one-shot when the teacher stopped before
    its first saved checkpoint)."""
    ckpts = plan["timeline" if name == "progressive" else "two_shot"]
    if not ckpts:
        return OneShotDistillation(teacher, student, budget=plan["student_steps"],
                                   temperature=temperature)
    return ProgressiveDistillation(teacher, student, [c["state"] for c in ckpts],
                                   schedule="timeline",
                                   checkpoint_steps=[c["step"] for c in ckpts],
                                   multiplier=plan["multiplier"],
                                   total_steps=plan["student_steps"], temperature=temperature)


def _plan(cfg: ParityConfig, teacher_run: Dict) -> Dict:
    return progressive_plan(teacher_run, student_steps=math.ceil(cfg.samples / cfg.batch_size),
                            until=cfg.progressive_until, multiplier=cfg.progressive_multiplier)


def build_method(name: str, cfg: ParityConfig, teacher: nn.Module, student: nn.Module,
                 teacher_run: Dict):
    """The distillation method for ``name``; every method's budget is ``cfg.samples``."""
    total = cfg.samples
    if name == "labels":
        return OneShotDistillation(teacher, student, budget=Budget(samples=total),
                                   hard_label_weight=1.0)
    if name == "one_shot":
        return OneShotDistillation(teacher, student, budget=Budget(samples=total),
                                   temperature=cfg.temperature)
    if name == "curriculum_extraction":
        hidden = int(round(cfg.hidden_fraction * total))
        return CurriculumExtraction(teacher, student, {"hidden": "hidden"},
                                    hidden_budget=Budget(samples=hidden),
                                    final_budget=Budget(samples=total - hidden),
                                    temperature=cfg.temperature,
                                    projection_kind=cfg.projection_kind,
                                    projection_seed=cfg.seed)
    if name in ("progressive", "progressive_2shot"):
        return progressive_method(name, teacher, student, _plan(cfg, teacher_run),
                                  cfg.temperature)
    if name == "progressive_thresholds":
        checkpoints = teacher_run["threshold_checkpoints"]
        n = len(checkpoints) + 1
        per = total // n
        return ProgressiveDistillation(teacher, student, list(checkpoints),
                                       checkpoint_budget=Budget(samples=per),
                                       final_budget=Budget(samples=total - per * (n - 1)),
                                       temperature=cfg.temperature)
    raise ValueError(f"unknown method {name!r}; expected one of {METHODS}")


def train_student(name: str, cfg: ParityConfig, teacher_run: Dict, support, test,
                  log: Callable[[str], None]) -> Dict:
    """One student through the trainer; returns its curve (test accuracy against steps,
    samples and cumulative FLOPs) and final figures."""
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed + 1)  # every method starts from the same student
    student = TwoLayerMLP(cfg.d, cfg.student_width)
    method = build_method(name, cfg, teacher_run["model"], student, teacher_run)
    n_train = 1 << 14
    while n_train < cfg.samples + cfg.batch_size:
        n_train <<= 1
    # One fresh sample per step (no sample is seen twice within the budget).
    train = parity_data(n_train, cfg.d, support, seed=2_000_000 + 7919 * cfg.seed)
    x_test, y_test = (t.to(device) for t in test.tensors)
    run = fit_with_curve(method, train, batch_size=cfg.batch_size, lr=cfg.lr, device=cfg.device,
                         seed=cfg.seed, eval_every=cfg.eval_every,
                         evaluate=lambda model: {"test_acc": accuracy(model, x_test, y_test)})
    result, secs, points = run["result"], run["seconds"], run["curve"]
    final = points[-1]["test_acc"] if points else float("nan")
    log(f"{name:>22}: test acc {final:.3f}  ({result.global_step} steps, "
        f"{result.global_step * cfg.batch_size} samples, {sum(result.phase_flops):.3g} FLOPs, "
        f"{secs:.1f}s)")
    return {"method": name, "final_test_acc": final,
            "best_test_acc": max((p["test_acc"] for p in points), default=float("nan")),
            "steps": result.global_step, "samples": result.global_step * cfg.batch_size,
            "flops": int(sum(result.phase_flops)), "phase_flops": [int(f) for f in result.phase_flops],
            "phases": [{"name": p.name, "steps": p.steps} for p in result.phases],
            "seconds": secs, "curve": points}


def run_comparison(cfg: ParityConfig, log: Optional[Callable[[str], None]] = None) -> Dict:
    """Train the teacher, then every method in ``cfg.methods``; JSON-ready results."""
    log = log or (lambda msg: None)
    torch.manual_seed(cfg.seed)
    support = parity_support(cfg.d, cfg.k, cfg.seed)
    test = parity_data(cfg.test_size, cfg.d, support, seed=3_000_000 + cfg.seed)
    t0 = time.perf_counter()
    teacher = train_teacher(cfg, support, test, log)
    results = {}
    for name in cfg.methods:
        results[name] = train_student(name, cfg, teacher, support, test, log)
    plan = _plan(cfg, teacher)
    return {"experiment": "sparse_parity", "config": {**asdict(cfg), "methods": list(cfg.methods)},
            "support": support,
            "teacher": {k: v for k, v in teacher.items()
                        if k not in ("model", "saved", "threshold_checkpoints")},
            "progressive": {k: v for k, v in plan.items() if k not in ("timeline", "two_shot")},
            "students": results, "seconds": time.perf_counter() - t0}


def summary_rows(result: Dict) -> List[Dict]:
    """One row per student: method, final/best test accuracy, samples, FLOPs, seconds."""
    rows = []
    for name, r in result["students"].items():
        rows.append({"method": name, "test_acc": round(r["final_test_acc"], 4),
                     "best_acc": round(r["best_test_acc"], 4), "samples": r["samples"],
                     "flops": f"{r['flops']:.3g}", "seconds": round(r["seconds"], 1)})
    return rows
