"""``cex_kernels.integrations.DistillationTrainer`` (a ``transformers.Trainer``) ends where the
project's own trainer does: tiny random-init GPT-2, curriculum extraction (2 projected-MSE
phases, then softmax-KL with hard labels), rows of different lengths, gradient accumulation,
the same data in the same order and the same optimizer schedule."""
import math
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate "
                                         "(pip install cex-kernels[hf])")

from torch.utils.data import IterableDataset  # noqa: E402

from cex_kernels.distill import (CurriculumExtraction, OneShotDistillation, Trainer,  # noqa: E402
                                 TrainConfig)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models, shared machine

V, BATCH, ACCUM, STEPS = 64, 4, 2, 2     # STEPS optimizer steps per phase
N_ROWS = STEPS * BATCH * ACCUM           # one phase's rows: every phase reads them all


def gpt2(n_layer, width):
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=width, n_layer=n_layer,
                                  n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def rows(n=N_ROWS, seed=1):
    """Token rows of lengths 3..10 (so every batch is padded), the ``datasets`` format."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 11, (n,), generator=g)
    return [{"input_ids": torch.randint(0, V, (int(k),), generator=g).tolist()} for k in lengths]


class InOrder(IterableDataset):
    """The rows in order. The project trainer streams an IterableDataset in its order and
    starts it again when it ends; each HF phase is one ``train()`` that reads the training
    set from its start. With one phase's worth of rows both read them all in every phase."""

    def __init__(self, data):
        self.data = data

    def __iter__(self):
        return iter(self.data)


def make_method(kind="ce"):
    torch.manual_seed(0)
    teacher, student = gpt2(4, 32), gpt2(2, 16)
    if kind == "one_shot":
        return OneShotDistillation(teacher, student, budget=STEPS, temperature=2.0,
                                   hard_label_weight=0.25)
    layer_map = {"student": ["transformer.h.0", "transformer.h.1"],
                 "teacher": [f"transformer.h.{i}" for i in range(4)]}
    return CurriculumExtraction(teacher, student, layer_map, hidden_budget=STEPS,
                                final_budget=STEPS, temperature=2.0, hard_label_weight=0.25)


def hf_args(out_dir, **kw):
    """The project trainer's schedule: AdamW(1e-3), constant rate, clipping at 1.0."""
    return transformers.TrainingArguments(**{
        "output_dir": str(out_dir), "per_device_train_batch_size": BATCH,
        "gradient_accumulation_steps": ACCUM, "learning_rate": 1e-3, "weight_decay": 0.0,
        "max_grad_norm": 1.0, "lr_scheduler_type": "constant", "warmup_steps": 0,
        "optim": "adamw_torch", "train_sampling_strategy": "sequential", "logging_steps": 1,
        "save_strategy": "no", "report_to": [], "use_cpu": True, "seed": 0,
        "dataloader_num_workers": 0, "disable_tqdm": True, **kw})


def project_run(data, kind="ce"):
    method = make_method(kind)
    cfg = TrainConfig(batch_size=BATCH, grad_accum_steps=ACCUM, lr=1e-3, weight_decay=0.0,
                      max_grad_norm=1.0, device="cpu", progress_bar=False,
                      print_schedule=False, tensorboard=False, log_every=1)
    result = Trainer(method, InOrder(data), cfg).fit()
    return method, result


def hf_run(data, out_dir, kind="ce", **kw):
    from cex_kernels.integrations import DistillationTrainer
    method = make_method(kind)
    trainer = DistillationTrainer(method, args=hf_args(out_dir, **kw), train_dataset=data)
    trainer.train()
    return method, trainer


def max_diff(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def test_curriculum_extraction_in_hf_trainer_matches_project_trainer(tmp_path):
    data = rows()
    ours, result = project_run(data)
    hf, trainer = hf_run(data, tmp_path / "hf")
    torch.manual_seed(0)
    start = gpt2(2, 16)  # the students' initial weights (same seed, same construction)
    moved = max_diff(ours.student, start)
    assert moved > 1e-3  # every phase trained something
    diff = max_diff(ours.student, hf.student)
    assert diff <= 1e-6, f"HF Trainer vs project trainer: max |Δθ| = {diff:.3g}"
    # The same phases and trainable sets, and the same losses, step by step.
    assert [p.name for p in hf.phases] == [p.name for p in result.phases]
    assert [p.trainable for p in hf.phases] == [p.trainable for p in result.phases]
    hf_losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    ours_losses = [r["loss"] for r in result.records if "loss" in r]
    assert len(hf_losses) == STEPS  # the last phase's train() log
    assert hf_losses == pytest.approx(ours_losses[-STEPS:], rel=1e-5, abs=1e-6)
    # The teacher never trained, stays in eval mode and out of every optimizer.
    teacher_params = {id(p) for p in hf.teacher.parameters()}
    assert not hf.teacher.training and not any(p.requires_grad for p in hf.teacher.parameters())
    assert not teacher_params & {id(p) for g in trainer.optimizer.param_groups
                                 for p in g["params"]}
    # Every student parameter trainable again after train(); save_pretrained round trip.
    assert all(p.requires_grad for p in hf.student.parameters())
    trainer.save_model(str(tmp_path / "student"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "student"))
    assert max_diff(loaded, hf.student) == 0.0


def test_num_items_in_batch_makes_accumulation_equal_a_large_batch(tmp_path):
    """One-shot KD + CE: 2 micro-batches of 4 padded rows = 1 batch of 8 (HF's own
    per-micro-batch mean would weigh the rows of the shorter micro-batch more)."""
    from cex_kernels.integrations import DistillationTrainer
    data = rows(n=2 * BATCH * ACCUM, seed=3)
    accum, _ = hf_run(data, tmp_path / "accum", kind="one_shot")
    method = make_method("one_shot")
    args = hf_args(tmp_path / "big")
    args.per_device_train_batch_size, args.gradient_accumulation_steps = BATCH * ACCUM, 1
    trainer = DistillationTrainer(method, args=args, train_dataset=data)
    trainer.train()
    diff = max_diff(accum.student, method.student)
    assert diff < 2e-5, f"accumulated vs large batch: max |Δθ| = {diff:.3g}"
    # evaluate(): HF's loop, the phase loss over one eval batch's own real tokens
    batch = trainer.data_collator(data[:BATCH])
    phase = trainer.phase
    with torch.no_grad():
        want, _ = method.student_loss(phase, batch, method.teacher_targets(phase, batch))
    metrics = trainer.evaluate(eval_dataset=data[:BATCH])
    assert metrics["eval_loss"] == pytest.approx(want.item(), rel=1e-5)


def test_resume_continues_in_the_newest_phase_exactly(tmp_path):
    """Stopped in phase 1 (a checkpoint every step), resumed with resume_from_checkpoint=True:
    the same student as one uninterrupted run."""
    from cex_kernels.integrations import DistillationTrainer
    data = rows()
    full, _ = hf_run(data, tmp_path / "full")

    class CrashAfterSave(transformers.TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if args.output_dir.endswith("phase-1") and state.global_step == 1:
                raise KeyboardInterrupt  # a crash right after phase 1's first checkpoint

    out = tmp_path / "resumed"
    method = make_method()
    trainer = DistillationTrainer(method, args=hf_args(out, save_strategy="steps", save_steps=1),
                                  train_dataset=data, callbacks=[CrashAfterSave()])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert sorted(os.listdir(out / "phase-1")) == ["checkpoint-1"]
    method = make_method()  # a fresh process: new models, weights from the checkpoint
    trainer = DistillationTrainer(method, args=hf_args(out, save_strategy="steps", save_steps=1),
                                  train_dataset=data)
    trainer.train(resume_from_checkpoint=True)
    diff = max_diff(full.student, method.student)
    assert diff < 1e-6, f"resumed vs uninterrupted: max |Δθ| = {diff:.3g}"


def test_import_cex_kernels_does_not_import_transformers():
    code = ("import sys, cex_kernels, cex_kernels.integrations; "
            "bad = [m for m in ('transformers', 'trl', 'accelerate', 'torchtune') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from cex_kernels.integrations import DistillationTrainer
    method = make_method()
    args = hf_args(os.path.join(out_dir, "ddp"), ddp_backend="gloo")
    args.per_device_train_batch_size = BATCH // world  # the same global batch
    trainer = DistillationTrainer(method, args=args, train_dataset=rows())
    trainer.train()
    if rank == 0:
        torch.save({"params": method.student.state_dict(),
                    "wrapped": trainer.model_wrapped is not trainer.model,
                    "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r]},
                   os.path.join(out_dir, "ddp.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_two_processes_under_ddp_match_one(tmp_path):
    """accelerate's DDP on 2 CPU processes (gloo), each with half of every batch: the same
    student and logged losses as one process (the counts are summed over processes, the
    student's forward runs through the DDP wrapper, to its end)."""
    import socket

    import torch.distributed as dist
    import torch.multiprocessing as mp
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=False)
    single, trainer = hf_run(rows(), tmp_path / "single")
    assert ddp["wrapped"]
    diff = max((ddp["params"][k] - v).abs().max().item()
               for k, v in single.student.state_dict().items())
    assert diff <= 1e-6, f"HF DDP (2 processes) vs one: max |Δθ| = {diff:.3g}"
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert ddp["losses"] == pytest.approx(losses, rel=1e-5)


def test_a_timeline_progressive_run_is_refused_with_the_reason(tmp_path):
    """Its phases share one optimizer; a fresh HF train() per phase would reset it."""
    from cex_kernels.distill import ProgressiveDistillation
    from cex_kernels.integrations import DistillationTrainer
    torch.manual_seed(0)
    teacher, student = gpt2(2, 16), gpt2(1, 16)
    method = ProgressiveDistillation(teacher, student, [teacher.state_dict()],
                                     schedule="timeline", checkpoint_steps=[2], multiplier=1,
                                     total_steps=4)
    trainer = DistillationTrainer(method, args=hf_args(tmp_path), train_dataset=rows())
    with pytest.raises(ValueError, match="share one optimizer.*use cex_kernels.distill.Trainer"):
        trainer.train()
