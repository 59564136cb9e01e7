"""The training loop: which parameters each phase trains, backend parity, FLOPs, accumulation,
baselines, metrics files and the eval callback."""
import json
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import cex_kernels
from cex_kernels.distill import (CurriculumExtraction, OneShotDistillation,
                                 ProgressiveDistillation, Trainer, TrainConfig)
from cex_kernels.distill._losses import eager_softmax_kl, softmax_kl
from cex_kernels.distill.flops import LinearFlopCounter, register_projected_mse_flops
from cex_kernels.distill.registry import MLP, sparse_parity

LAYER_MAP = {"blocks.0": "blocks.0", "blocks.1": "blocks.1"}


def make_models(seed=0):
    torch.manual_seed(seed)
    return MLP(8, [32, 32], 2), MLP(8, [6, 6], 2)


def config(**kw):
    base = dict(batch_size=16, log_every=1, progress_bar=False, print_schedule=False)
    return TrainConfig(**{**base, **kw})


DATA = sparse_parity(n=256, d=8, k=2, seed=0)


class Snapshots:
    """eval_fn recording the student's parameters at the end of each phase."""

    def __init__(self, student):
        self.states = [{k: v.clone() for k, v in student.state_dict().items()}]

    def __call__(self, student, phase, step):
        self.states.append({k: v.clone() for k, v in student.state_dict().items()})
        return {"probe": 1.0}


@pytest.mark.parametrize("freeze_earlier", [True, False])
def test_each_phase_updates_exactly_its_parameters(freeze_earlier):
    teacher, student = make_models()
    method = CurriculumExtraction(teacher, student, LAYER_MAP, hidden_budget=3, final_budget=3,
                                  freeze_earlier=freeze_earlier)
    snaps = Snapshots(student)
    result = Trainer(method, DATA, config(), eval_fn=snaps).fit()
    expected = [["blocks.0.linear.weight", "blocks.0.linear.bias"],
                ["blocks.1.linear.weight", "blocks.1.linear.bias"],
                [n for n, _ in student.named_parameters()]]
    if not freeze_earlier:
        expected[1] = expected[0] + expected[1]
    assert [p.trainable for p in result.phases] == expected
    for i, phase in enumerate(result.phases):
        changed = [n for n, _ in student.named_parameters()
                   if not torch.equal(snaps.states[i][n], snaps.states[i + 1][n])]
        assert changed == phase.trainable, phase.name
    assert all(p.requires_grad for p in student.parameters())  # restored after training
    assert [r["phase_index"] for r in result.records if r.get("end_of_phase")] == [0, 1, 2]


def run_final_params(backend, seed=0, **cfg):
    teacher, student = make_models(seed)
    method = CurriculumExtraction(teacher, student, LAYER_MAP, hidden_budget=4, final_budget=4,
                                  temperature=2.0, hard_label_weight=0.25, backend=backend)
    result = Trainer(method, DATA, config(**cfg)).fit()
    return student, result


def test_fused_and_reference_backends_give_the_same_trajectory():
    fused, r1 = run_final_params("auto")
    ref, r2 = run_final_params("reference")
    for (n, a), b in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    losses = [[r["loss"] for r in res.records if "loss" in r] for res in (r1, r2)]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_matches_one_big_batch():
    big, _ = run_final_params("auto", batch_size=32, max_grad_norm=None)
    acc, _ = run_final_params("auto", batch_size=16, grad_accum_steps=2, max_grad_norm=None)
    for a, b in zip(big.parameters(), acc.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_eager_kl_fallback_matches_the_package_op():
    s, t = torch.randn(6, 10), torch.randn(6, 10)
    labels = torch.tensor([1, -100, 2, 3, -100, 0])
    if hasattr(cex_kernels, "softmax_kl"):
        for kw in ({}, {"labels": labels}):
            torch.testing.assert_close(softmax_kl(s, t, temperature=2.0, **kw),
                                       eager_softmax_kl(s, t, temperature=2.0, **kw))
    ref = torch.nn.functional.kl_div(torch.log_softmax(s / 2, -1), torch.log_softmax(t / 2, -1),
                                     log_target=True, reduction="batchmean") * 4
    torch.testing.assert_close(eager_softmax_kl(s, t, temperature=2.0), ref)


def test_analytic_flops_match_flop_counter_mode():
    register_projected_mse_flops()
    teacher, student = make_models()
    teacher.eval().requires_grad_(False)
    batch = (DATA.tensors[0][:16],)
    for freeze in (True, False):
        method = CurriculumExtraction(teacher, student, LAYER_MAP, freeze_earlier=freeze)
        for phase in method.setup(batch):
            method.set_phase_trainable(phase)
            with FlopCounterMode(display=False) as reference, LinearFlopCounter(teacher, student) as ours:
                targets = method.teacher_targets(phase, batch)
                ours.flops += method.loss_flops(phase, targets)
                method.student_loss(phase, batch, targets)[0].backward()
            assert ours.flops == reference.get_total_flops() > 0, phase.name
        method.restore_trainable()


def test_baselines_share_the_interface(tmp_path):
    teacher, student = make_models()
    result = Trainer(OneShotDistillation(teacher, student, budget=3, temperature=2.0), DATA,
                     config()).fit()
    assert [p.kind for p in result.phases] == ["softmax_kl"] and result.global_step == 3
    early = MLP(8, [32, 32], 2).state_dict()
    torch.save(early, tmp_path / "early.pt")
    mid = MLP(8, [32, 32], 2)
    method = ProgressiveDistillation(teacher, student, [str(tmp_path / "early.pt"), mid],
                                     checkpoint_budget=[2, 2], final_budget=0.5)
    result = Trainer(method, DATA, config(total_steps=8)).fit()
    assert [p.steps for p in result.phases] == [2, 2, 4]
    assert [p.teacher_index for p in result.phases] == [0, 1, None]
    assert method.teacher_for(result.phases[0]).blocks[0].linear.weight.equal(early["blocks.0.linear.weight"])


def test_metrics_files_schedule_amp_and_scheduler(tmp_path, capsys):
    teacher, student = make_models()
    method = CurriculumExtraction(teacher, student, LAYER_MAP, hidden_budget={"samples": 32},
                                  final_budget=0.5)
    cfg = config(out_dir=str(tmp_path), amp=True, total_steps=4, print_schedule=True,
                 tensorboard=False)
    sched = lambda opt, n: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / n)  # noqa: E731
    result = Trainer(method, DATA, cfg, scheduler_factory=sched).fit()
    out = capsys.readouterr().out
    assert "curriculum_extraction schedule" in out and "total: 6 steps" in out
    assert [p.steps for p in result.phases] == [2, 2, 2]
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert len(lines) == 6 and all(x["loss"] == x["loss"] for x in lines)  # no NaN under bf16
    assert lines[0]["lr"] == 1e-3 and lines[1]["lr"] == 0.5e-3  # scheduler stepped per step
    csv_lines = open(tmp_path / "metrics.csv").read().splitlines()
    assert csv_lines[0].startswith("phase_index,phase,step") and len(csv_lines) == 7
    assert all(f > 0 for f in result.phase_flops)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-00000004.pt", "checkpoint-00000006.pt",
                                            "metrics.csv", "metrics.jsonl", "student"]


def test_trainer_falls_back_to_eager_kl_without_the_package_op(monkeypatch):
    fused, _ = run_final_params("auto")
    if hasattr(cex_kernels, "softmax_kl"):
        monkeypatch.delattr(cex_kernels, "softmax_kl")
    eager, _ = run_final_params("auto")
    for a, b in zip(fused.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_tqdm", [True, False])
def test_progress_bar_with_and_without_tqdm(monkeypatch, caplog, with_tqdm):
    import logging
    import sys

    from cex_kernels.distill.metrics import PhaseProgress
    if with_tqdm:
        pytest.importorskip("tqdm")
    else:
        monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails: plain logging
    caplog.set_level(logging.INFO, logger="cex_kernels.distill")
    bar = PhaseProgress("phase", 4, log_every=2)
    for step in range(1, 5):
        bar.update(step, 0.5)
    bar.close()
    assert (bar._bar is not None) == with_tqdm
    assert len([r for r in caplog.records if "step" in r.getMessage()]) == (0 if with_tqdm else 2)
