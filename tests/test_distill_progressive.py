"""Progressive distillation's timeline schedule (Panigrahi et al., 2024): student step t
distils from the first teacher checkpoint saved at or after teacher step t * multiplier, with
one optimizer across the switches; the config path; bad arguments."""
import itertools
import json

import pytest
import torch
from torch import nn

from cex_kernels import cli
from cex_kernels.distill import OneShotDistillation, ProgressiveDistillation, Trainer, TrainConfig
from cex_kernels.distill.registry import MLP, sparse_parity
from cex_kernels.distill.schedule import timeline_segments

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = sparse_parity(n=256, d=8, k=2, seed=0)


def expected_teachers(steps, multiplier, total):
    """The oracle, step by step: the index of the first checkpoint at or after t * m (None:
    the final teacher) for t = 1..total."""
    out = []
    for t in range(1, total + 1):
        out.append(next((k for k, c in enumerate(steps) if c >= t * multiplier), None))
    return out


@pytest.mark.parametrize("steps, multiplier, total", [
    ([100, 200, 300], 100, 5), ([100, 200, 300], 1, 150), ([0, 10, 20], 3, 10),
    ([5], 0.1, 100), ([7, 8, 9, 50], 2.5, 30), ([3, 6, 9], 3, 2), ([1, 2, 3, 4], 0.5, 9),
    ([10, 20, 30, 40], 0.7, 80)])
def test_timeline_segments_match_the_per_step_rule(steps, multiplier, total):
    runs = timeline_segments(steps, multiplier, total)
    flat = list(itertools.chain.from_iterable([k] * n for k, n in runs))
    assert flat == expected_teachers(steps, multiplier, total)
    assert all(n > 0 for _, n in runs)
    assert all(a[0] != b[0] for a, b in zip(runs, runs[1:]))  # maximal runs


class Tagged(nn.Module):
    """A teacher that records its tag in ``calls`` on every forward (logits: a fixed map)."""

    def __init__(self, tag, calls, seed):
        super().__init__()
        self.tag, self.calls = tag, calls
        torch.manual_seed(seed)
        self.net = MLP(8, [16], 2)

    def forward(self, x):
        self.calls.append(self.tag)
        return self.net(x)


def config(**kw):
    return TrainConfig(**{**dict(batch_size=16, log_every=1, progress_bar=False,
                                 print_schedule=False, tensorboard=False), **kw})


def test_trainer_uses_the_checkpoint_of_each_step():
    calls = []
    ckpts = [Tagged(k, calls, seed=k) for k in range(4)]
    final = Tagged("final", calls, seed=9)
    steps, m, total = [40, 80, 120, 160], 30.0, 8
    torch.manual_seed(0)
    method = ProgressiveDistillation(final, MLP(8, [6], 2), ckpts, schedule="timeline",
                                     checkpoint_steps=steps, multiplier=m, total_steps=total)
    result = Trainer(method, DATA, config()).fit()
    assert result.global_step == total
    per_step = calls[1:]  # the first call is setup's shape check on the last phase's teacher
    want = [("final" if k is None else k) for k in expected_teachers(steps, m, total)]
    assert per_step == want
    assert [p.continues for p in result.phases] == [False] + [True] * (len(result.phases) - 1)


@pytest.mark.parametrize("lr_schedule", ["constant", "cosine"])
def test_one_optimizer_runs_across_the_switches(lr_schedule):
    """Checkpoints equal to the final teacher: the timeline must then train exactly as
    one-shot distillation does (same AdamW state and one lr schedule over all steps); a
    fresh optimizer at each switch (schedule='phases') does not."""
    def run(kind):
        torch.manual_seed(0)
        teacher = MLP(8, [32], 2)
        torch.manual_seed(1)
        student = MLP(8, [6], 2)
        same = [teacher.state_dict()] * 3
        if kind == "one_shot":
            method = OneShotDistillation(teacher, student, budget=9)
        elif kind == "timeline":
            method = ProgressiveDistillation(teacher, student, same, schedule="timeline",
                                             checkpoint_steps=[2, 4, 6], multiplier=1,
                                             total_steps=9)
        else:
            method = ProgressiveDistillation(teacher, student, same, checkpoint_budget=2,
                                             final_budget=3)
        result = Trainer(method, DATA, config(lr=1e-2, lr_schedule=lr_schedule)).fit()
        assert result.global_step == 9
        return [p.detach().clone() for p in student.parameters()]

    one_shot, timeline, phases = run("one_shot"), run("timeline"), run("phases")
    assert all(torch.equal(a, b) for a, b in zip(one_shot, timeline))
    assert not all(torch.equal(a, b) for a, b in zip(one_shot, phases))


def _resumable(out_dir, stop=None):
    torch.manual_seed(0)
    teacher = MLP(8, [32], 2)
    ckpts = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        ckpts.append(MLP(8, [32], 2).state_dict())
    torch.manual_seed(1)
    student = MLP(8, [6], 2)
    method = ProgressiveDistillation(teacher, student, ckpts, schedule="timeline",
                                     checkpoint_steps=[6, 12], multiplier=2, total_steps=8)
    cfg = config(out_dir=str(out_dir), resume="auto", stop_after_steps=stop,
                 lr_schedule="cosine")
    return student, Trainer(method, DATA, cfg).fit()


def test_resume_at_a_switch_keeps_the_optimizer(tmp_path):
    full, result = _resumable(tmp_path / "full")
    assert [p.steps for p in result.phases] == [3, 3, 2]
    _, partial = _resumable(tmp_path / "resumed", stop=3)  # at the first switch
    assert partial.stopped_early
    resumed, _ = _resumable(tmp_path / "resumed")
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, message", [
    (dict(schedule="linear"), r"schedule must be one of \('phases', 'timeline'\)"),
    (dict(schedule="timeline", multiplier=1, total_steps=4), r"needs checkpoint_steps"),
    (dict(schedule="timeline", checkpoint_steps=[2, 2], multiplier=1, total_steps=4),
     r"strictly increasing"),
    (dict(schedule="timeline", checkpoint_steps=[2], multiplier=1, total_steps=4),
     r"checkpoint_steps: 1 steps for 2 checkpoints"),
    (dict(schedule="timeline", checkpoint_steps=[2, 4], multiplier=0, total_steps=4),
     r"needs multiplier: a finite number > 0"),
    (dict(schedule="timeline", checkpoint_steps=[2, 4], multiplier=1), r"needs total_steps"),
    (dict(schedule="timeline", checkpoint_steps=[2, 4], multiplier=1, total_steps=4,
          final_budget=3), r"do not pass checkpoint_budget or final_budget"),
    (dict(checkpoint_steps=[2, 4]), r"\['checkpoint_steps'\] belong to schedule='timeline'"),
])
def test_bad_arguments_name_themselves(kwargs, message):
    teacher = MLP(8, [16], 2)
    with pytest.raises(ValueError, match=message):
        ProgressiveDistillation(teacher, MLP(8, [6], 2), [teacher.state_dict()] * 2, **kwargs)


def test_config_file_runs_the_timeline(tmp_path, capsys):
    torch.manual_seed(5)
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"ckpt{i}.pt"))
        torch.save(MLP(8, [32, 32], 2).state_dict(), paths[-1])
    cfg = {
        "teacher": {"model": "mlp", "kwargs": {"d_in": 8, "widths": [32, 32], "n_out": 2}},
        "student": {"model": "mlp", "kwargs": {"d_in": 8, "widths": [6, 6], "n_out": 2}},
        "data": {"dataset": "sparse_parity", "kwargs": {"n": 64, "d": 8, "k": 2}},
        "method": {"name": "progressive", "teacher_checkpoints": paths, "schedule": "timeline",
                   "checkpoint_steps": [2, 4], "multiplier": "2.0", "total_steps": 3},
        "train": {"batch_size": 16, "out_dir": str(tmp_path / "out"), "progress_bar": False,
                  "tensorboard": False, "print_schedule": False, "log_every": 1},
    }
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    assert cli.main(["distill", "--config", str(path)]) == 0
    lines = [json.loads(x) for x in open(tmp_path / "out" / "metrics.jsonl")]
    assert [x["phase"] for x in lines] == ["teacher step 2: softmax-KL",
                                           "teacher step 4: softmax-KL",
                                           "final teacher: softmax-KL"]
    cfg["method"]["multipler"] = 2
    path.write_text(json.dumps(cfg))
    assert cli.main(["distill", "--config", str(path)]) == 2
    assert "did you mean ['multiplier']" in capsys.readouterr().err


def test_switches_inside_the_timeline_do_not_write_checkpoints(tmp_path):
    _, result = _resumable(tmp_path / "run")
    assert [p.steps for p in result.phases] == [3, 3, 2]
    names = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint"))
    assert names == ["checkpoint-00000008.pt"]  # the end of the run only (keep_checkpoints=2)
