"""Phases and their budgets: what each phase trains, on which loss, for how long."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union


@dataclass
class Budget:
    """How long a phase runs: exactly one of ``steps`` (optimizer steps), ``samples``
    (rounded up to whole steps) or ``fraction`` (of the run's ``total_steps``/``total_samples``)."""
    steps: Optional[int] = None
    samples: Optional[int] = None
    fraction: Optional[float] = None

    def __post_init__(self):
        given = [k for k in ("steps", "samples", "fraction") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"Budget: give exactly one of steps, samples, fraction; got {given or 'none'}")

    def resolve(self, samples_per_step: int, total_steps: Optional[int] = None,
                total_samples: Optional[int] = None) -> int:
        """Number of optimizer steps."""
        if self.steps is not None:
            return int(self.steps)
        if self.samples is not None:
            return math.ceil(self.samples / samples_per_step)
        if total_steps is None and total_samples is None:
            raise ValueError(f"Budget(fraction={self.fraction}) needs total_steps or total_samples "
                             "in the training config")
        total = total_steps if total_steps is not None else math.ceil(total_samples / samples_per_step)
        return int(round(self.fraction * total))

    def __str__(self):
        if self.steps is not None:
            return f"{self.steps} steps"
        if self.samples is not None:
            return f"{self.samples} samples"
        return f"{self.fraction:g} of total"


BudgetLike = Union[Budget, int, float, dict]


def as_budget(x: BudgetLike) -> Budget:
    """int → steps; float in (0, 1] → fraction; dict → ``Budget(**x)``."""
    if isinstance(x, Budget):
        return x
    if isinstance(x, bool):
        raise TypeError(f"budget must be a Budget, int (steps), float (fraction) or dict, got {x!r}")
    if isinstance(x, int):
        return Budget(steps=x)
    if isinstance(x, float):
        if not 0.0 < x <= 1.0:
            raise ValueError(f"a float budget is a fraction of the total, in (0, 1]; got {x}")
        return Budget(fraction=x)
    if isinstance(x, dict):
        unknown = set(x) - {"steps", "samples", "fraction"}
        if unknown:
            raise ValueError(f"budget {x}: unknown key(s) {sorted(unknown)}; use exactly one of "
                             "steps, samples, fraction")
        return Budget(**x)
    raise TypeError(f"budget must be a Budget, int (steps), float (fraction) or dict, got {x!r}")


HIDDEN_MSE = "projected_mse"
LOGIT_KL = "softmax_kl"


@dataclass
class Phase:
    """One phase. ``kind`` is ``"projected_mse"`` (match pair ``pair`` of the layer map) or
    ``"softmax_kl"`` (match the logits of teacher ``teacher_index``; None = the final teacher).
    ``continues``: keep the previous phase's optimizer and learning-rate schedule (same
    parameters, only the teacher changes; the schedule spans the whole run of continuing
    phases) instead of starting fresh ones. ``steps`` and ``trainable`` (names of the student
    parameters it updates) are filled in by the method's ``setup``/the trainer."""
    name: str
    kind: str
    budget: Budget
    pair: Optional[int] = None
    teacher_index: Optional[int] = None
    continues: bool = False
    steps: int = 0
    trainable: List[str] = field(default_factory=list)


def timeline_segments(checkpoint_steps: Sequence[int], multiplier: float,
                      total_steps: int) -> List[Tuple[Optional[int], int]]:
    """Progressive distillation's timeline (Panigrahi et al., 2024): student step ``t`` (1, 2,
    ... ``total_steps``) distils from the first checkpoint ``k`` whose teacher step
    ``checkpoint_steps[k] >= t * multiplier``, and from the final teacher (``None``) once
    ``t * multiplier`` is past them all. Returns the runs ``(k or None, steps)`` in order,
    covering exactly ``total_steps`` steps; checkpoints no student step selects (several
    within one student step, or beyond ``total_steps``) are left out."""
    runs: List[Tuple[Optional[int], int]] = []
    done = 0  # student steps assigned so far
    for k, c in enumerate(checkpoint_steps):
        last = int(c // multiplier)  # the largest t with t * multiplier <= c, exactly as compared
        while (last + 1) * multiplier <= c:
            last += 1
        while last > 0 and last * multiplier > c:
            last -= 1
        last = min(last, total_steps)
        if last > done:
            runs.append((k, last - done))
            done = last
    if done < total_steps:
        runs.append((None, total_steps - done))
    return runs


def format_schedule(phases: List[Phase], samples_per_step: int) -> str:
    """The schedule as a small table (printed before training)."""
    lines = [f"{'#':>2}  {'phase':<28} {'loss':<14} {'budget':<16} {'steps':>7} "
             f"{'samples':>9} {'params':>7}"]
    for i, p in enumerate(phases):
        lines.append(f"{i:>2}  {p.name:<28} {p.kind:<14} {str(p.budget):<16} {p.steps:>7} "
                     f"{p.steps * samples_per_step:>9} {len(p.trainable):>7}")
    total = sum(p.steps for p in phases)
    lines.append(f"    total: {total} steps, {total * samples_per_step} samples")
    return "\n".join(lines)
