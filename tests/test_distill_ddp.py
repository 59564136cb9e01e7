"""DDP on 2 CPU processes (gloo) ends where the single-process run does: an MLP, and GPT-2 on
rows of different lengths with hard labels (one spawn runs both, to keep the test short)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cex_kernels.distill import CurriculumExtraction, Trainer, TrainConfig
from cex_kernels.distill.registry import MLP, sparse_parity
from conftest import free_port



pytestmark = [pytest.mark.usefixtures("one_thread"),  # tiny models on a shared machine
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]


def train_mlp(out_dir=None):
    torch.manual_seed(0)
    teacher, student = MLP(8, [32, 32], 2), MLP(8, [6, 6], 2)
    method = CurriculumExtraction(teacher, student, {"blocks.0": "blocks.0", "blocks.1": "blocks.1"},
                                  hidden_budget=3, final_budget=4, temperature=2.0,
                                  hard_label_weight=0.2)
    cfg = TrainConfig(batch_size=16, grad_accum_steps=2, seed=5, out_dir=out_dir,
                      progress_bar=False, print_schedule=False, tensorboard=False)
    result = Trainer(method, sparse_parity(n=128, d=8, k=2), cfg).fit()
    return student, result


def train_gpt2():
    from test_distill_padding import rows, train
    return train("gpt2", rows("gpt2"), batch_size=8, grad_accum_steps=2)


def _has_transformers():
    try:
        import transformers  # noqa: F401
        return True
    except ImportError:
        return False


def _worker(rank, world, port, out_file, with_gpt2):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        out = {}
        student, result = train_mlp()
        out["mlp"] = {"params": student.state_dict(), "flops": result.phase_flops}
        if with_gpt2:
            student, result = train_gpt2()
            out["gpt2"] = {"params": student.state_dict(), "records": result.records}
        torch.save(out, f"{out_file}.{rank}")
    finally:
        if dist.is_initialized():
            # Leave together: rank 0 hosts the TCP store, and a rank still tearing down
            # after it is gone aborts in gloo's background thread.
            dist.barrier()
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Both ranks' results of one 2-process spawn."""
    out_file = str(tmp_path_factory.mktemp("ddp") / "ddp.pt")
    mp.spawn(_worker, args=(2, free_port(), out_file, _has_transformers()), nprocs=2, join=True)
    return [torch.load(f"{out_file}.{r}", weights_only=False) for r in range(2)]


def test_two_process_gloo_matches_single_process(ddp_runs):
    ddp = ddp_runs[0]["mlp"]
    torch.set_num_threads(1)
    single, result = train_mlp()
    for name, p in single.state_dict().items():
        torch.testing.assert_close(ddp["params"][name], p, rtol=1e-5, atol=1e-6, msg=name)
    # Each rank did half of the single process's work.
    assert [2 * f for f in ddp["flops"]] == result.phase_flops


def test_two_processes_match_one_with_padding_and_hard_labels(ddp_runs):
    """GPT-2 on rows of different lengths (each rank pads its own half), hard labels mixed
    in, 2 micro-batches per step: the same parameters and the same logged (all-reduced)
    losses as one process."""
    pytest.importorskip("transformers")
    single, result = train_gpt2()
    ranks = [r["gpt2"] for r in ddp_runs]
    diff = max((ranks[0]["params"][k] - v).abs().max().item()
               for k, v in single.state_dict().items())
    print(f"max |param diff| DDP vs single process = {diff:.2e}")
    assert diff <= 1e-6, f"max |param diff| DDP vs single = {diff:.2e}"
    for key in ("loss", "mse", "kd", "ce", "tokens"):
        want = [r[key] for r in result.records if key in r]
        assert want
        for rank in ranks:  # every rank logs the global value, not its own share
            got = [r[key] for r in rank["records"] if key in r]
            assert got == pytest.approx(want, rel=1e-6, abs=1e-7), key
