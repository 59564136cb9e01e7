"""Runs a person can trust: logs after a resume, out_dir safety, checkpoint rotation and
corruption, save_pretrained / from_pretrained round trips, the config-level schedule, eval,
streaming data and DataLoader workers."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from cex_kernels.distill import CurriculumExtraction, OneShotDistillation, Trainer, TrainConfig
from cex_kernels.distill.checkpoint import CheckpointError
from cex_kernels.distill.registry import MLP, sparse_parity

LAYER_MAP = {"blocks.0": "blocks.0", "blocks.1": "blocks.1"}
DATA = sparse_parity(n=64, d=8, k=2, seed=1)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared machine


def mlp_run(out_dir, *, eval_fn=None, data=DATA, **kw):
    torch.manual_seed(0)
    teacher, student = MLP(8, [32, 32], 2), MLP(8, [6, 6], 2)
    method = CurriculumExtraction(teacher, student, LAYER_MAP, hidden_budget=3, final_budget=4)
    base = dict(batch_size=16, out_dir=str(out_dir) if out_dir else None, log_every=1,
                progress_bar=False, print_schedule=False, tensorboard=False)
    return student, Trainer(method, data, TrainConfig(**{**base, **kw}), eval_fn=eval_fn).fit()


def jsonl(path):
    return [json.loads(line) for line in open(path)]


class Crash(Exception):
    pass


def test_logs_hold_each_step_once_after_a_crash_and_resume(tmp_path):
    def crash_at_7(student, phase, step):  # a kill after step 7's log, checkpoint at 6
        if step == 7:
            raise Crash()
        return {}
    with pytest.raises(Crash):
        mlp_run(tmp_path, eval_fn=crash_at_7, eval_every=1, checkpoint_every=3, resume="auto")
    assert [r["global_step"] for r in jsonl(tmp_path / "metrics.jsonl") if "step" in r][-1] == 7
    full, _ = mlp_run(None)
    resumed, _ = mlp_run(tmp_path, checkpoint_every=3, resume="auto")
    steps = [r["global_step"] for r in jsonl(tmp_path / "metrics.jsonl") if "step" in r]
    assert steps == list(range(1, 11))
    csv_steps = [int(line.split(",")[3]) for line in open(tmp_path / "metrics.csv").readlines()[1:]]
    assert csv_steps == list(range(1, 11))
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_an_old_out_dir_is_refused_unless_resume_or_overwrite(tmp_path):
    mlp_run(tmp_path)
    with pytest.raises(ValueError, match="holds a previous run .*resume='auto'.*overwrite"):
        mlp_run(tmp_path)
    mlp_run(tmp_path, overwrite=True)
    assert [r["global_step"] for r in jsonl(tmp_path / "metrics.jsonl")] == list(range(1, 11))


def test_keeps_the_last_checkpoints_and_names_a_corrupt_one(tmp_path):
    mlp_run(tmp_path, checkpoint_every=1, keep_checkpoints=2, stop_after_steps=5)
    names = sorted(os.listdir(tmp_path))
    assert names == ["checkpoint-00000004.pt", "checkpoint-00000005.pt", "metrics.csv",
                     "metrics.jsonl"]
    newest = tmp_path / "checkpoint-00000005.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated (a disk filled mid-copy)
    (tmp_path / ".tmp-leftover.pt").write_bytes(b"partial")  # a save killed mid-write
    with pytest.raises(CheckpointError, match=r"checkpoint-00000005.pt' is corrupt or truncated"
                                              r".*resume=.*checkpoint-00000004.pt"):
        mlp_run(tmp_path, resume="auto")
    assert not (tmp_path / ".tmp-leftover.pt").exists()
    newest.unlink()
    full, _ = mlp_run(None)
    resumed, result = mlp_run(tmp_path, resume=str(tmp_path / "checkpoint-00000004.pt"))
    assert result.global_step == 10
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_config_schedule_warmup_then_cosine():
    _, result = mlp_run(None, lr=0.01, lr_schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    lrs = [r["lr"] for r in result.records if r["phase_index"] == 2]  # 4 steps
    cos = lambda p: 0.01 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))  # noqa: E731
    assert lrs == pytest.approx([0.005, 0.01, cos(0.0), cos(0.5)])
    assert [r["lr"] for r in result.records if r["phase_index"] == 0] == pytest.approx(
        [0.005, 0.01, cos(0.0)])  # per phase


def test_eval_dataset_logs_the_phase_loss_cross_entropy_and_perplexity():
    torch.manual_seed(0)
    teacher, student = MLP(8, [32, 32], 2), MLP(8, [6, 6], 2)
    method = OneShotDistillation(teacher, student, budget=3, temperature=2.0)
    eval_data = sparse_parity(n=40, d=8, k=2, seed=9)  # 40 rows: batches of 16, 16, 8
    cfg = TrainConfig(batch_size=16, progress_bar=False, print_schedule=False, eval_every=1)
    result = Trainer(method, DATA, cfg, eval_dataset=eval_data).fit()
    evals = [r for r in result.records if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1]["end_of_phase"]
    x, y = eval_data.tensors
    with torch.no_grad():
        s, t = student.double()(x.double()), teacher.double()(x.double())
    kd = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True,
                  reduction="batchmean") * 4
    ce = F.cross_entropy(s, y)
    assert evals[-1]["eval_loss"] == pytest.approx(kd.item(), rel=1e-5, abs=1e-7)
    assert evals[-1]["eval_ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert evals[-1]["eval_ppl"] == pytest.approx(math.exp(ce.item()), rel=1e-5)


class Stream(torch.utils.data.IterableDataset):
    """Streaming rows of Python lists (no len()), as ``datasets`` with streaming=True."""

    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def _token_setup():
    pytest.importorskip("transformers")
    from test_distill_padding import make_pair, rows
    return make_pair, rows("gpt2", n=24)


def _gpt2_run(data, out_dir=None, **kw):
    make_pair, _ = _token_setup()
    teacher, student, layer_map = make_pair("gpt2")
    method = CurriculumExtraction(teacher, student, layer_map, hidden_budget=2, final_budget=3,
                                  hard_label_weight=0.5)
    cfg = TrainConfig(batch_size=8, progress_bar=False, print_schedule=False, seed=1,
                      out_dir=out_dir, tensorboard=False, **kw)
    return student, Trainer(method, data, cfg).fit()


def test_streaming_rows_train_and_resume_exactly(tmp_path):
    _, rows = _token_setup()  # 24 rows: 3 batches per pass, so the 7 steps wrap twice
    full, r_full = _gpt2_run(Stream(rows))
    assert r_full.global_step == 7
    _, partial = _gpt2_run(Stream(rows), str(tmp_path), stop_after_steps=4, resume="auto")
    assert partial.stopped_early
    resumed, _ = _gpt2_run(Stream(rows), str(tmp_path), resume="auto")
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_dataloader_workers_give_the_same_run():
    _, rows = _token_setup()
    a, _ = _gpt2_run(rows)
    b, _ = _gpt2_run(rows, num_workers=1)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


def test_save_pretrained_round_trip_and_models_from_directories(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from test_distill_padding import make_pair, rows
    teacher, student, layer_map = make_pair("gpt2")
    teacher.save_pretrained(tmp_path / "teacher")
    student.save_pretrained(tmp_path / "student-init")
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    # API: teacher and student given as save_pretrained directories.
    method = CurriculumExtraction(str(tmp_path / "teacher"), str(tmp_path / "student-init"),
                                  layer_map, hidden_budget=1, final_budget=2)
    cfg = TrainConfig(batch_size=8, out_dir=str(tmp_path / "run"), progress_bar=False,
                      print_schedule=False, tensorboard=False)
    result = Trainer(method, rows("gpt2"), cfg).fit()
    assert result.student_dir == str(tmp_path / "run" / "student")
    assert os.path.exists(os.path.join(result.student_dir, "model.safetensors"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(result.student_dir)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, method.student.eval()(ids).logits,
                                   rtol=0, atol=0)
    for k, v in method.teacher.state_dict().items():  # the teacher never trained
        assert torch.equal(v, teacher_state[k]), k
    from cex_kernels.distill import ProgressiveDistillation
    progressive = ProgressiveDistillation(teacher, student, [str(tmp_path / "teacher")])
    early = progressive.teacher_for(progressive.build_phases()[0])  # a directory as checkpoint
    assert early is not teacher and torch.equal(early.lm_head.weight, teacher_state["lm_head.weight"])
    # YAML: a directory, and the dotted from_pretrained import path with its kwargs.
    yaml = pytest.importorskip("yaml")
    from cex_kernels import cli
    config = {
        "teacher": {"model": str(tmp_path / "teacher")},
        "student": {"model": "transformers:AutoModelForCausalLM.from_pretrained",
                    "kwargs": {"pretrained_model_name_or_path": str(tmp_path / "student-init")}},
        "data": {"dataset": "token_rows", "kwargs": {"n": 16, "vocab_size": 64, "max_len": 10}},
        "method": {"name": "one_shot", "budget": 1},
        "train": {"batch_size": 8, "out_dir": str(tmp_path / "yaml-run"), "progress_bar": False},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["distill", "--config", str(tmp_path / "run.yaml")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert transformers.AutoModelForCausalLM.from_pretrained(summary["student_dir"]) is not None
