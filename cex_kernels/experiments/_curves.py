"""Run one distillation method through the trainer and turn its records into a curve."""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

import torch

from cex_kernels.distill import Trainer, TrainConfig


def fit_with_curve(method, dataset, *, batch_size: int, lr: float, device: str, seed: int,
                   eval_every: int, evaluate: Callable[[torch.nn.Module], Dict[str, float]],
                   optimizer_factory: Optional[Callable] = None,
                   max_grad_norm: Optional[float] = None,
                   train_options: Optional[Dict] = None) -> Dict:
    """Train with :class:`Trainer`, calling ``evaluate(student)`` every ``eval_every`` steps
    and at each phase end. Returns ``{"curve": [...], "result": TrainResult, "seconds"}``;
    each curve point has ``step``, ``samples``, ``flops`` (cumulative training matmul FLOPs:
    earlier phases' totals plus the current phase's so far), ``phase`` and the metrics.
    ``train_options``: further :class:`TrainConfig` fields (e.g. ``lr_schedule``)."""
    evals: List[Dict] = []

    def eval_fn(model, phase, global_step):
        metrics = dict(evaluate(model))
        evals.append({"global_step": global_step, "phase": phase.name, **metrics})
        return metrics

    config = TrainConfig(batch_size=batch_size, lr=lr, device=device, seed=seed,
                         eval_every=eval_every, log_every=eval_every, progress_bar=False,
                         tensorboard=False, print_schedule=False, max_grad_norm=max_grad_norm,
                         **(train_options or {}))
    t0 = time.perf_counter()
    result = Trainer(method, dataset, config, eval_fn=eval_fn,
                     optimizer_factory=optimizer_factory).fit()
    seconds = time.perf_counter() - t0
    flops_at, offset = {0: 0}, 0
    for rec in result.records:
        if "flops" in rec:
            flops_at[rec["global_step"]] = offset + rec["flops"]
            if rec["step"] == result.phases[rec["phase_index"]].steps:
                offset += rec["flops"]
    curve, seen = [], set()
    for e in evals:
        g = e.pop("global_step")
        if g in seen:  # an eval at a phase's last step is followed by its end-of-phase eval
            curve = [c for c in curve if c["step"] != g]
        seen.add(g)
        flops = flops_at.get(g, max(v for s, v in flops_at.items() if s <= g))
        curve.append({"step": g, "samples": g * batch_size, "flops": flops, **e})
    return {"curve": curve, "result": result, "seconds": seconds}
