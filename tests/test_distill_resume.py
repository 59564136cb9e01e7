"""Checkpoint/resume: an interrupted-and-resumed run ends exactly where an uninterrupted one does."""
import os

import pytest
import torch
import torch.nn.functional as F

from cex_kernels.distill import CurriculumExtraction, Trainer, TrainConfig
from cex_kernels.distill.checkpoint import atomic_save
from cex_kernels.distill.registry import MLP, sparse_parity

DATA = sparse_parity(n=64, d=8, k=2, seed=1)  # 2 optimizer steps per epoch: data wraps around


class DropoutMLP(MLP):
    """Dropout makes the run depend on the RNG state, which the checkpoint must carry."""

    def forward(self, x):
        for block in self.blocks:
            x = F.dropout(block(x), 0.2, self.training)
        return self.head(x)


def run(out_dir, *, init_seed=0, stop_after_steps=None):
    torch.manual_seed(0)
    teacher = MLP(8, [32, 32], 2)
    torch.manual_seed(init_seed)
    student = DropoutMLP(8, [6, 6], 2)
    method = CurriculumExtraction(teacher, student, {"blocks.0": "blocks.0", "blocks.1": "blocks.1"},
                                  hidden_budget=3, final_budget=4, temperature=2.0,
                                  projection_kind="rademacher", projection_seed=7)
    cfg = TrainConfig(batch_size=16, grad_accum_steps=2, seed=3, out_dir=str(out_dir),
                      resume="auto", stop_after_steps=stop_after_steps, checkpoint_every=2,
                      progress_bar=False, print_schedule=False, tensorboard=False)
    sched = lambda opt, n: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)  # noqa: E731
    result = Trainer(method, DATA, cfg, scheduler_factory=sched).fit()
    return student, result


@pytest.mark.parametrize("stop_at", [4, 3])  # mid-phase (phase 1, step 1) and a phase boundary
def test_resume_matches_an_uninterrupted_run_exactly(tmp_path, stop_at):
    full, full_result = run(tmp_path / "full")
    _, partial = run(tmp_path / "resumed", stop_after_steps=stop_at)
    assert partial.stopped_early and partial.global_step == stop_at
    resumed, resumed_result = run(tmp_path / "resumed", init_seed=123)  # other init: must be loaded
    assert resumed_result.global_step == full_result.global_step == 10
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert resumed_result.phase_flops == full_result.phase_flops
    ckpt = torch.load(tmp_path / "resumed" / "checkpoint-00000010.pt", weights_only=False)
    assert ckpt["method"]["projections"][1] == {"seed": 8, "kind": "rademacher", "d_teacher": 32,
                                                "d_student": 6, "learnable": False}


def test_atomic_save_keeps_the_previous_checkpoint_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save({"step": 1}, str(path))

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"step": 2}, str(path))
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]
