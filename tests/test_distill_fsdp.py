"""FSDP2 (``fully_shard``) on 2 CPU processes (gloo): curriculum extraction on tiny GPT-2 with
student and teacher sharded ends where one process does; a run stopped mid-phase and resumed
from its sharded (``torch.distributed.checkpoint``) checkpoint ends exactly where the
uninterrupted one does; bf16 parameters (``MixedPrecisionPolicy``) train. One spawn runs all."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")
pytestmark = [pytest.mark.usefixtures("one_thread"),  # tiny models, shared machine
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]

from cex_kernels.distill import CurriculumExtraction, Trainer, TrainConfig  # noqa: E402
from cex_kernels.distill.registry import tiny_gpt2  # noqa: E402
from conftest import free_port  # noqa: E402

V = 64



def rows(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 11, (n,), generator=g)
    return [{"input_ids": torch.randint(0, V, (int(k),), generator=g).tolist()} for k in lengths]


def train(**cfg):
    """Curriculum extraction, 2 projected-MSE phases + softmax-KL with hard labels, 2 steps
    each, 2 micro-batches of 8 rows (4 per rank) per step; an eval set at phase ends."""
    torch.manual_seed(0)
    teacher, student = tiny_gpt2(vocab_size=V, n_embd=32, n_layer=4), tiny_gpt2(vocab_size=V,
                                                                                 n_embd=16)
    method = CurriculumExtraction(teacher, student,
                                  {"student": ["transformer.h.0", "transformer.h.1"],
                                   "teacher": [f"transformer.h.{i}" for i in range(4)]},
                                  hidden_budget=2, final_budget=2, temperature=2.0,
                                  hard_label_weight=0.25)
    config = TrainConfig(batch_size=8, grad_accum_steps=2, lr=1e-3, seed=3, progress_bar=False,
                         print_schedule=False, tensorboard=False, log_every=1, **cfg)
    result = Trainer(method, rows(), config, eval_dataset=rows(8, seed=9)).fit()
    return method, result


def _worker(rank, world, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from torch.distributed.tensor import DTensor

    from cex_kernels.distill.fsdp import full_state_dict
    try:
        out = {}
        method, result = train(fsdp=True)
        block = method.student.transformer.h[0].attn.c_attn.weight
        t_block = method.teacher.transformer.h[0].attn.c_attn.weight
        out["sharded"] = (isinstance(block, DTensor), isinstance(t_block, DTensor),
                          tuple(block.to_local().shape), tuple(block.shape))
        # gathered on rank 0 (the others get an empty dict)
        out["fsdp"] = {"params": full_state_dict(method.student), "records": result.records}

        run = os.path.join(tmp, "run")  # stopped after global step 3 (phase 1, step 1)
        _, stopped = train(fsdp=True, out_dir=run, stop_after_steps=3)
        out["stopped"] = stopped.stopped_early
        out["files"] = sorted(os.listdir(run))
        out["ckpt_files"] = sorted(os.listdir(os.path.join(run, "checkpoint-00000003")))
        method, result = train(fsdp=True, out_dir=run, resume="auto")
        out["resumed"] = {"params": full_state_dict(method.student), "records": result.records,
                          "student_dir": result.student_dir}

        method, result = train(fsdp=True, fsdp_param_dtype="bfloat16")
        out["bf16"] = {"params": full_state_dict(method.student), "records": result.records}
        torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.barrier()  # leave together (rank 0 hosts the store)
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("fsdp"))
    mp.spawn(_worker, args=(2, free_port(), tmp), nprocs=2, join=True)
    return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(2)]


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_fsdp_two_processes_match_one(fsdp_runs):
    """Student and teacher sharded (each rank holds half of a block's weight); the same
    parameters and logged losses as one process on the same global batches."""
    single, result = train()
    diff = max_diff(fsdp_runs[0]["fsdp"]["params"], single.student.state_dict())  # gathered
    print(f"max |param diff| FSDP2 (2 ranks) vs single process = {diff:.2e}")
    assert diff <= 1e-6, f"FSDP2 vs single process: max |Δθ| = {diff:.2e}"
    for rank in fsdp_runs:
        assert rank["sharded"] == (True, True, (8, 48), (16, 48))
        for key in ("loss", "mse", "kd", "ce", "tokens", "eval_loss", "eval_ppl"):
            want = [r[key] for r in result.records if key in r]
            got = [r[key] for r in rank["fsdp"]["records"] if key in r]
            assert want and got == pytest.approx(want, rel=1e-6, abs=1e-7), key


def test_fsdp_resume_from_sharded_checkpoint_is_exact(fsdp_runs):
    rank0 = fsdp_runs[0]
    assert rank0["stopped"]
    assert "checkpoint-00000003" in rank0["files"] and "checkpoint-00000002" in rank0["files"]
    assert "trainer.pt" in rank0["ckpt_files"] and ".metadata" in rank0["ckpt_files"]
    assert any(f.endswith(".distcp") for f in rank0["ckpt_files"])  # every rank's shards
    diff = max_diff(rank0["resumed"]["params"], rank0["fsdp"]["params"])
    assert diff == 0.0, f"resumed vs uninterrupted FSDP2 run: max |Δθ| = {diff:.2e}"
    # the resumed run logs steps 4..6 exactly as the uninterrupted run did
    want = {r["global_step"]: r["loss"] for r in rank0["fsdp"]["records"] if "loss" in r}
    got = {r["global_step"]: r["loss"] for r in rank0["resumed"]["records"] if "loss" in r}
    assert sorted(got) == [4, 5, 6] and all(got[s] == want[s] for s in got)
    # the final student, gathered and saved with save_pretrained by rank 0, loads whole
    import transformers
    saved = transformers.AutoModelForCausalLM.from_pretrained(rank0["resumed"]["student_dir"])
    assert max_diff(saved.state_dict(), rank0["resumed"]["params"]) == 0.0


def test_fsdp_bf16_parameters_train(fsdp_runs):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): fp32 shards that move
    like the fp32 run's, to bf16 accuracy."""
    bf16, fp32 = fsdp_runs[0]["bf16"], fsdp_runs[0]["fsdp"]
    assert all(v.dtype == torch.float32 for v in bf16["params"].values())
    losses = [r["loss"] for r in bf16["records"] if "loss" in r]
    want = [r["loss"] for r in fp32["records"] if "loss" in r]
    assert losses == pytest.approx(want, rel=3e-2, abs=1e-4)
    assert 0 < max_diff(bf16["params"], fp32["params"]) < 2e-2
