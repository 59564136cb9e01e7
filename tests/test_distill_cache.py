"""Offline distillation: a teacher cache (cex_kernels.distill.cache/offline) written from tiny
random-init GPT-2s on rows of different lengths, and training from it with no teacher."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cex_kernels import random_projection  # noqa: E402
from cex_kernels.distill import (CurriculumExtraction, OneShotDistillation,  # noqa: E402
                                 ProgressiveDistillation, Trainer, TrainConfig)
from cex_kernels.distill import cache as C  # noqa: E402
from cex_kernels.distill.cache_import import import_logprobs  # noqa: E402
from cex_kernels.distill.data import PadCollator  # noqa: E402
from cex_kernels.distill.offline import cache_teacher  # noqa: E402
from test_distill_padding import V, gpt2, make_pair, rows  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared machine

T = 2.0
BASE = dict(batch_size=4, seed=3, log_every=1, progress_bar=False, print_schedule=False,
            tensorboard=False)
EXACT = dict(k=V, logprob_dtype="float32", hidden_dtype="float32")


def sgd(params):  # linear in the gradient, so a 1e-7 gradient difference stays 1e-7
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def method(kind, teacher, student, layer_map, **kw):
    if kind == "ce":
        return CurriculumExtraction(teacher, student, layer_map, hidden_budget=2,
                                    final_budget=2, temperature=T, hard_label_weight=0.5, **kw)
    return OneShotDistillation(teacher, student, budget=2, temperature=T,
                               hard_label_weight=0.5, **kw)


def write(kind, path, data=None, **opts):
    teacher, student, layer_map = make_pair("gpt2")
    m = method(kind, teacher, student, layer_map, **opts.pop("method_kw", {}))
    opts = {"batch_size": 3, "rows_per_shard": 5, "progress_bar": False, **opts}
    return cache_teacher(m, data or rows("gpt2"), str(path), **opts)


def train(kind, teacher=None, **kw):
    t, student, layer_map = make_pair("gpt2")
    m = method(kind, teacher if teacher is not None else t, student, layer_map)
    Trainer(m, rows("gpt2"), TrainConfig(**BASE), optimizer_factory=sgd, **kw).fit()
    return student


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    torch.set_num_threads(1)
    for kind in ("ce", "os"):
        write(kind, root / kind, **EXACT)
    return root


@pytest.mark.parametrize("kind", ["ce", "os"])
def test_training_from_a_full_cache_reproduces_online_training(caches, kind):
    """k = V, fp32 storage: curriculum extraction (both projected-MSE phases and the KL
    phase) and one-shot end with the online run's parameters to 1e-6."""
    online = train(kind)
    offline = train(kind, C.TeacherCache(str(caches / kind)))
    diff = max((a - b).abs().max().item() for a, b in zip(online.parameters(),
                                                           offline.parameters()))
    assert diff <= 1e-6, f"{kind}: max |param diff| offline vs online = {diff:.2e}"


def test_cached_projected_states_equal_teacher_hidden_times_the_seeded_projection(caches):
    """Every real token's cached ``teacher_hidden @ P_i`` against float64: GPT-2's hidden
    state after teacher block m(i), times random_projection(32, 16, seed=i)."""
    cache = C.TeacherCache(str(caches / "ce"))
    assert [(layer["teacher"], layer["seed"]) for layer in cache.layers] == \
        [("transformer.h.1", 0), ("transformer.h.3", 1)]
    teacher = make_pair("gpt2")[0].double()
    data = rows("gpt2")
    batch = PadCollator(0, causal_lm=True)(data)
    mask = batch["attention_mask"].bool()
    outputs = {}
    hooks = [teacher.transformer.h[block].register_forward_hook(
        lambda mod, inp, out, block=block: outputs.__setitem__(block, out[0] if isinstance(
            out, tuple) else out)) for block in (1, 3)]
    with torch.no_grad():
        out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    for i, block in enumerate((1, 3)):
        p = random_projection(32, 16, seed=i, dtype=torch.float64)
        want = outputs[block] @ p
        for r in range(len(data)):
            got = cache.row(r)[f"hidden.{i}"]["values"].double()
            torch.testing.assert_close(got, want[r][mask[r]], rtol=1e-5, atol=1e-5)
    lp = torch.log_softmax(out.logits / T, -1)
    for r in range(len(data)):
        stored = cache.row(r)["logits"]
        dense = torch.full((int(mask[r].sum()), V), float("-inf"), dtype=torch.float64)
        dense.scatter_(-1, stored["indices"].long(), stored["logprobs"].double())
        torch.testing.assert_close(dense, lp[r][mask[r]], rtol=1e-5, atol=1e-5)


def test_interrupted_cache_run_resumes_without_duplicates_or_gaps(tmp_path, monkeypatch):
    """An exception after two of four shards leaves an incomplete cache (refused by the
    reader) and a stale temporary file; the rerun writes exactly the missing shards and the
    result equals an uninterrupted run, row for row."""
    full = tmp_path / "full"
    write("ce", full)
    real_write = C.write_shard
    calls = []

    def dying(directory, s, storage, tensors):
        if len(calls) == 2:
            open(os.path.join(directory, C.shard_name(s, storage)) + ".tmp", "w").write("junk")
            raise RuntimeError("killed")
        calls.append(s)
        return real_write(directory, s, storage, tensors)

    part = tmp_path / "part"
    monkeypatch.setattr(C, "write_shard", dying)
    with pytest.raises(RuntimeError, match="killed"):
        write("ce", part)
    monkeypatch.setattr(C, "write_shard", real_write)
    with pytest.raises(C.CacheError, match="incomplete"):
        C.TeacherCache(str(part))
    report = write("ce", part)
    assert calls == [0, 1] and report["written"] == [2, 3]
    assert sorted(os.listdir(part)) == sorted(os.listdir(full))  # no .tmp left, no extra shard
    a, b = C.TeacherCache(str(full)), C.TeacherCache(str(part))
    for r in range(a.num_rows):
        for stream, fields in a.row(r).items():
            for f, t in fields.items():
                assert torch.equal(t, b.row(r)[stream][f]), (r, stream, f)
    assert write("ce", part)["written"] == []  # complete: nothing to redo


def test_numpy_and_safetensors_storage_hold_the_same_rows(tmp_path):
    write("ce", tmp_path / "st", storage="safetensors", k=8)
    write("ce", tmp_path / "np", storage="numpy", k=8)
    a, b = C.TeacherCache(str(tmp_path / "st")), C.TeacherCache(str(tmp_path / "np"))
    assert os.path.isdir(tmp_path / "np" / "shard-00000")
    with open(tmp_path / "st" / C.INDEX) as f:
        index = json.load(f)
    assert (index["k"], index["vocab_size"], index["temperature"], index["logprob_dtype"]) == \
        (8, V, T, "bfloat16")
    assert index["teacher"]["class"] == "GPT2LMHeadModel" and index["complete"]
    for r in range(a.num_rows):
        ra, rb = a.row(r), b.row(r)
        assert ra["logits"]["logprobs"].dtype == torch.bfloat16
        assert ra["logits"]["indices"].dtype == torch.int32
        assert ra["hidden.0"]["values"].dtype == torch.bfloat16
        for stream in ra:
            for f in ra[stream]:
                assert torch.equal(ra[stream][f], rb[stream][f]), (r, stream, f)


def test_a_cache_that_does_not_match_the_student_is_rejected(caches, tmp_path):
    cache = C.TeacherCache(str(caches / "ce"))
    _, student, layer_map = make_pair("gpt2")
    with pytest.raises(C.CacheError, match="layer map / projections"):
        CurriculumExtraction(cache, student, layer_map, projection_seed=5)
    with pytest.raises(C.CacheError, match="layer map / projections"):
        CurriculumExtraction(cache, student, layer_map, projection_kind="rademacher")
    with pytest.raises(C.CacheError, match="layer map / projections"):
        CurriculumExtraction(cache, student, {"transformer.h.0": "transformer.h.0"})
    with pytest.raises(ValueError, match="no module named 'transformer.h.9'"):
        CurriculumExtraction(cache, student, {"transformer.h.0": "transformer.h.9"})
    wide = gpt2(2, 32)  # same layer names, width 32: the cached states are 16 wide
    with pytest.raises(C.CacheError, match="width 16, the student's layer has width 32"):
        train_with(CurriculumExtraction(cache, wide, layer_map, hidden_budget=1, final_budget=1,
                                        temperature=T))
    other_vocab = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=72, n_positions=32, n_embd=16, n_layer=2, n_head=2))
    with pytest.raises(C.CacheError, match="vocabulary of 64, the student compares 72"):
        train_with(OneShotDistillation(C.TeacherCache(str(caches / "os")), other_vocab,
                                       budget=1, temperature=T))
    with pytest.raises(C.CacheError, match="holds 16 rows, the dataset has 12"):
        train_with(OneShotDistillation(cache, student, budget=1, temperature=T), rows("gpt2")[:12])
    with pytest.raises(C.CacheError, match="real tokens in this batch"):  # other lengths
        train_with(OneShotDistillation(cache, student, budget=1, temperature=T),
                   rows("gpt2", seed=1))
    with pytest.raises(ValueError, match="needs the cache's temperature"):
        OneShotDistillation(cache, student, temperature=1.0, top_k_loss="tail")
    with pytest.raises(ValueError, match="top_k_loss must be one of"):
        OneShotDistillation(cache, student, top_k_loss="sampled")
    with pytest.raises(C.CacheError, match="made with other settings"):
        write("ce", caches / "ce", k=4)  # a different cache into the same directory
    with pytest.raises(C.CacheError, match="not a teacher cache"):
        C.TeacherCache(str(tmp_path))


def train_with(m, data=None):
    cfg = TrainConfig(**{**BASE, "batch_size": 4})
    return Trainer(m, data or rows("gpt2"), cfg).fit()


def test_progressive_distillation_from_cached_checkpoints(tmp_path):
    """Each checkpoint's logits are cached as a stream ``logits@c``; offline progressive
    training equals online to 1e-6 (k = V, fp32)."""
    def progressive(teacher, student):
        ckpt = {k: v * 0.5 for k, v in make_pair("gpt2", seed=7)[0].state_dict().items()}
        return ProgressiveDistillation(teacher, student, [ckpt], checkpoint_budget=2,
                                       final_budget=1, temperature=T)
    teacher, student, _ = make_pair("gpt2")
    cache_teacher(progressive(teacher, student), rows("gpt2"), str(tmp_path), batch_size=4,
                  rows_per_shard=8, progress_bar=False, **EXACT)
    cache = C.TeacherCache(str(tmp_path))
    assert sorted(cache.streams) == ["logits", "logits@0"]
    teacher, online, _ = make_pair("gpt2")
    Trainer(progressive(teacher, online), rows("gpt2"), TrainConfig(**BASE),
            optimizer_factory=sgd).fit()
    _, offline, _ = make_pair("gpt2")
    Trainer(progressive(cache, offline), rows("gpt2"), TrainConfig(**BASE),
            optimizer_factory=sgd).fit()
    diff = max((a - b).abs().max().item() for a, b in zip(online.parameters(),
                                                           offline.parameters()))
    assert diff <= 1e-6, diff


def _export_jsonl(cache, path, form):
    with open(path, "w") as f:
        for r in reversed(range(cache.num_rows)):  # any order
            lp, ids = cache.row(r)["logits"]["logprobs"], cache.row(r)["logits"]["indices"]
            if form == "pairs":
                rec = {"row": r, "top_logprobs": [[[int(i), float(v)] for i, v in zip(a, b)]
                                                  for a, b in zip(ids, lp)]}
            else:  # vLLM: {"<id>": {"logprob": lp, ...}}
                rec = {"row": r, "top_logprobs": [{str(int(i)): {"logprob": float(v), "rank": 1}
                                                   for i, v in zip(a, b)} for a, b in zip(ids, lp)]}
            f.write(json.dumps(rec) + "\n")


@pytest.mark.parametrize("form", ["pairs", "vllm", "parquet"])
def test_imported_log_probs_become_the_same_cache(tmp_path, form):
    """Log-probs written out as JSONL (pairs or vLLM mappings) or Parquet (ids/logprobs
    columns) and imported give the cache_teacher rows back, and train the same student."""
    write("os", tmp_path / "made", k=8, logprob_dtype="float32")
    made = C.TeacherCache(str(tmp_path / "made"))
    if form == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq
        recs = [{"row": r, "ids": made.row(r)["logits"]["indices"].tolist(),
                 "logprobs": made.row(r)["logits"]["logprobs"].tolist()}
                for r in range(made.num_rows)]
        src = str(tmp_path / "lp.parquet")
        pq.write_table(pa.Table.from_pylist(recs), src)
    else:
        src = str(tmp_path / "lp.jsonl")
        _export_jsonl(made, src, form)
    got = import_logprobs(src, str(tmp_path / "imported"), num_rows=made.num_rows,
                          vocab_size=V, k=8, temperature=T, logprob_dtype="float32",
                          rows_per_shard=5)
    for r in range(made.num_rows):
        for f in ("logprobs", "indices"):
            assert torch.equal(got.row(r)["logits"][f], made.row(r)["logits"][f]), (r, f)
    a = train("os", made)
    b = train("os", got)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_import_rejects_bad_records(tmp_path):
    src = tmp_path / "bad.jsonl"
    cases = [({"row": 0, "top_logprobs": [[[70, -0.1]]]}, "outside the vocabulary"),
             ({"row": 0, "top_logprobs": [[[1, -0.1], [1, -0.2]]]}, "appears twice"),
             ({"row": 0, "top_logprobs": [[[1, 0.5]]]}, "is not <= 0"),
             ({"row": 3, "top_logprobs": [[[1, -0.1]]]}, "outside the dataset"),
             ({"row": 0, "top_logprobs": [[[1, -0.1]], {}]}, "position 1: no entries"),
             ({"top_logprobs": []}, "integer 'row'"),
             ({"row": 0, "ids": [[1]]}, "needs 'top_logprobs', or 'ids' and 'logprobs'")]
    for rec, match in cases:
        src.write_text(json.dumps(rec) + "\n")
        with pytest.raises(ValueError, match=match):
            import_logprobs(str(src), str(tmp_path / "out"), num_rows=2, vocab_size=V,
                            overwrite=True)
    src.write_text(json.dumps({"row": 0, "top_logprobs": [[[1, -0.1]]]}) + "\n")
    with pytest.raises(ValueError, match=r"no record for rows \[1\]"):
        import_logprobs(str(src), str(tmp_path / "out"), num_rows=2, vocab_size=V,
                        overwrite=True)


def test_training_from_a_sampled_cache_logs_the_sampled_estimate(tmp_path):
    """A cache written with sampled_rounds: weights c/N summing to 1 per token; the first
    logged KL of one-shot training from it equals the float64 estimate over every real
    token, ``T² Σ_i w_i (log p_i - log s_i) / tokens``."""
    write("os", tmp_path, sampled_rounds=6, logprob_dtype="float32")
    cache = C.TeacherCache(str(tmp_path))
    assert cache.logits_kind == "sampled" and cache.index["k"] == 6
    data = rows("gpt2")
    _, student, _ = make_pair("gpt2")
    s64 = make_pair("gpt2")[1].double()
    batch = PadCollator(0, causal_lm=True)(data)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        log_s = torch.log_softmax(s64(input_ids=batch["input_ids"],
                                      attention_mask=batch["attention_mask"]).logits / T, -1)
    total, tokens = 0.0, 0
    for r in range(len(data)):
        stored = cache.row(r)["logits"]
        w = stored["weights"].double()
        assert torch.allclose(w.sum(-1), torch.ones(w.shape[0], dtype=torch.float64))
        ls = log_s[r][mask[r]].gather(-1, stored["indices"].long())
        terms = torch.where(w > 0, w * (stored["logprobs"].double() - ls), torch.zeros_like(w))
        total, tokens = total + terms.sum().item() * T * T, tokens + w.shape[0]
    m = OneShotDistillation(cache, student, budget=1, temperature=T)
    assert m.top_k_loss == "sampled"
    result = Trainer(m, data, TrainConfig(**{**BASE, "batch_size": 16})).fit()
    assert result.records[0]["kd"] == pytest.approx(total / tokens, rel=1e-5)


def test_storage_falls_back_to_numpy_without_safetensors(monkeypatch):
    assert C.resolve_storage("auto") == ("safetensors" if C.safetensors_available() else "numpy")
    monkeypatch.setattr(C, "safetensors_available", lambda: False)
    assert C.resolve_storage("auto") == "numpy"
    with pytest.raises(ValueError, match="needs the safetensors package"):
        C.resolve_storage("safetensors")


def test_import_keeps_the_k_most_probable_ids_and_pads_the_rest(tmp_path):
    src = tmp_path / "lp.jsonl"
    src.write_text(json.dumps({"row": 0, "top_logprobs": [
        {"5": -3.0, "7": -0.5, "9": -1.0},                 # 3 ids, k = 2: keep 7 and 9
        [[4, -0.25]]]}) + "\n")                            # 1 id: one -inf padding slot
    cache = import_logprobs(str(src), str(tmp_path / "c"), num_rows=1, vocab_size=V, k=2,
                            logprob_dtype="float32", storage="numpy")
    got = cache.row(0)["logits"]
    assert got["indices"].tolist() == [[7, 9], [4, 0]]
    assert got["logprobs"].tolist() == [[-0.5, -1.0], [-0.25, float("-inf")]]
    assert cache.temperature == 1.0 and cache.index["teacher"]["name_or_path"] == "imported"


def test_hf_distillation_trainer_refuses_a_cache_teacher(caches, tmp_path):
    """transformers.Trainer does not carry the cache's row indices: a clear error, not a
    crash inside the collator."""
    pytest.importorskip("accelerate")
    from cex_kernels.integrations.hf import DistillationTrainer
    _, student, layer_map = make_pair("gpt2")
    m = method("os", C.TeacherCache(str(caches / "os")), student, layer_map)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="from-cache"):
        DistillationTrainer(m, args=args, train_dataset=rows("gpt2"))
