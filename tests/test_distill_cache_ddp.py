"""cache_teacher on 2 CPU processes (gloo) writes the cache one process writes (each rank its
shards), for an MLP on tuple batches; curriculum extraction trained from it equals online."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cex_kernels.distill import CurriculumExtraction, Trainer, TrainConfig
from cex_kernels.distill.cache import TeacherCache
from cex_kernels.distill.offline import cache_teacher
from cex_kernels.distill.registry import MLP, sparse_parity
from conftest import free_port

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]

LAYERS = {"blocks.0": "blocks.0", "blocks.1": "blocks.1"}


def method(teacher=None):
    torch.manual_seed(0)
    t, student = MLP(8, [32, 32], 2), MLP(8, [6, 6], 2)
    m = CurriculumExtraction(teacher if teacher is not None else t, student, LAYERS,
                             hidden_budget=3, final_budget=4, temperature=2.0,
                             hard_label_weight=0.2)
    return m, student


def data():
    return sparse_parity(n=96, d=8, k=2)


def write(path):
    m, _ = method()
    return cache_teacher(m, data(), path, k=2, batch_size=10, rows_per_shard=16,
                         logprob_dtype="float32", hidden_dtype="float32", progress_bar=False)


def _worker(rank, world, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        report = write(path)
        torch.save(report["written"], f"{path}.{rank}")
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def test_two_ranks_write_the_single_process_cache(tmp_path):
    path = str(tmp_path / "ddp")
    mp.spawn(_worker, args=(2, free_port(), path), nprocs=2, join=True)
    written = [torch.load(f"{path}.{r}") for r in range(2)]
    assert written == [[0, 2, 4], [1, 3, 5]]  # each rank its shards, all six once
    single = str(tmp_path / "single")
    write(single)
    a, b = TeacherCache(path), TeacherCache(single)
    assert a.streams == b.streams and not a.streams["logits"]["masked"]
    for r in range(a.num_rows):
        for stream, fields in a.row(r).items():
            for f, t in fields.items():
                assert torch.equal(t, b.row(r)[stream][f]), (r, stream, f)

    def fit(m):
        cfg = TrainConfig(batch_size=16, grad_accum_steps=2, seed=5, progress_bar=False,
                          print_schedule=False, tensorboard=False)
        return Trainer(m, data(), cfg, optimizer_factory=lambda p: torch.optim.SGD(
            p, lr=0.1, momentum=0.9)).fit()
    online, s_online = method()
    fit(online)
    offline, s_offline = method(a)
    fit(offline)
    for (n, x), y in zip(s_online.named_parameters(), s_offline.parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=n)


def write_and_die(path):
    """Write ``path`` until the third shard, then SIGKILL this process mid-write."""
    import signal

    from cex_kernels.distill import cache as C
    torch.set_num_threads(1)  # as the test process: the same float summation order
    real, done = C.write_shard, []

    def dying(directory, s, storage, tensors):
        if len(done) == 2:
            with open(f"{directory}/{C.shard_name(s, storage)}.tmp", "wb") as f:
                f.write(b"half a shard")
            os.kill(os.getpid(), signal.SIGKILL)
        done.append(s)
        return real(directory, s, storage, tensors)
    C.write_shard = dying
    write(path)


def test_a_killed_cache_run_resumes_without_duplicates_or_gaps(tmp_path):
    import subprocess
    import sys
    from cex_kernels.distill.cache import CacheError
    path = str(tmp_path / "killed")
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import test_distill_cache_ddp as t; " \
           f"t.write_and_die({path!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(here),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(os.listdir(path)) == ["cex_cache.json", "shard-00000.safetensors",
                                        "shard-00001.safetensors", "shard-00002.safetensors.tmp"]
    with pytest.raises(CacheError, match="incomplete"):
        TeacherCache(path)
    assert write(path)["written"] == [2, 3, 4, 5]
    full = str(tmp_path / "full")
    write(full)
    assert sorted(os.listdir(path)) == sorted(os.listdir(full))
    a, b = TeacherCache(path), TeacherCache(full)
    for r in range(a.num_rows):
        for stream, fields in a.row(r).items():
            for f, t in fields.items():
                assert torch.equal(t, b.row(r)[stream][f]), (r, stream, f)
