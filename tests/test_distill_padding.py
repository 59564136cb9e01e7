"""Padding never reaches a loss, and every loss is normalized by the optimizer step's global
count of real tokens: tiny random-init GPT-2, Llama -> Qwen2 and BERT (masked LM) from
configs, rows of different lengths (the ``datasets`` format) through the default collator."""
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from cex_kernels import random_projection  # noqa: E402
from cex_kernels.distill import (CurriculumExtraction, OneShotDistillation, Trainer,  # noqa: E402
                                 TrainConfig)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared machine

V = 64
MASK_ID = V - 1


def gpt2(n_layer, width):
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=width, n_layer=n_layer,
                                  n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def llama(n_layer, width):
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=width, intermediate_size=2 * width,
                                   num_hidden_layers=n_layer, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


def qwen2(n_layer, width):
    cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=width, intermediate_size=2 * width,
                                   num_hidden_layers=n_layer, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=32)
    return transformers.Qwen2ForCausalLM(cfg)


def bert(n_layer, width):
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=width, num_hidden_layers=n_layer,
                                  num_attention_heads=2, intermediate_size=2 * width,
                                  max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertForMaskedLM(cfg)


def bert_cls(n_layer, width):
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=width, num_hidden_layers=n_layer,
                                  num_attention_heads=2, intermediate_size=2 * width,
                                  max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=3)
    return transformers.BertForSequenceClassification(cfg)


# name: (teacher, student, teacher blocks, student blocks)
PAIRS = {
    "gpt2": (lambda: gpt2(4, 32), lambda: gpt2(2, 16), "transformer.h", "transformer.h"),
    "llama->qwen2": (lambda: llama(4, 32), lambda: qwen2(2, 16), "model.layers", "model.layers"),
    "bert": (lambda: bert(4, 32), lambda: bert(2, 16), "bert.encoder.layer", "bert.encoder.layer"),
    # per-token hidden states, per-sequence logits (B, 3) and labels (B,)
    "bert-cls": (lambda: bert_cls(4, 32), lambda: bert_cls(2, 16), "bert.encoder.layer",
                 "bert.encoder.layer"),
}


def make_pair(name, seed=0):
    t, s, tb, sb = PAIRS[name]
    torch.manual_seed(seed)
    teacher, student = t(), s()
    layer_map = {"student": [f"{sb}.{i}" for i in range(2)], "teacher": [f"{tb}.{i}" for i in range(4)]}
    return teacher, student, layer_map


def rows(name, n=16, seed=0):
    """Dict rows of Python lists, lengths 3..10. BERT: 30% of tokens masked, labels there only;
    BERT classifier: one label per row; causal LMs: no labels (the collator makes labels =
    input_ids)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 11, (1,), generator=g))
        ids = torch.randint(1, V - 2, (length,), generator=g)
        row = {"text": "ignored", "input_ids": ids.tolist()}
        if name == "bert-cls":
            row["labels"] = int(torch.randint(0, 3, (1,), generator=g))
        if name == "bert":
            masked = torch.rand(length, generator=g) < 0.3
            masked[0] = True
            row["labels"] = torch.where(masked, ids, torch.full_like(ids, -100)).tolist()
            row["input_ids"] = torch.where(masked, torch.full_like(ids, MASK_ID), ids).tolist()
        out.append(row)
    return out


def train(name, data, *, method="ce", seed=0, **cfg):
    teacher, student, layer_map = make_pair(name, seed)
    if method == "ce":
        m = CurriculumExtraction(teacher, student, layer_map, hidden_budget=2, final_budget=2,
                                 temperature=2.0, hard_label_weight=0.5)
    else:
        m = OneShotDistillation(teacher, student, budget=2, temperature=2.0, hard_label_weight=0.5)
    base = dict(batch_size=4, seed=3, log_every=1, progress_bar=False, print_schedule=False)
    result = Trainer(m, data, TrainConfig(**{**base, **cfg})).fit()
    return student, result


def max_param_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("name", list(PAIRS))
def test_pad_token_ids_do_not_change_training(name):
    """Only the ids at padded positions differ (pad id 0 vs 61): every phase of curriculum
    extraction (projected-MSE, KL + CE) must train to identical parameters."""
    data = rows(name)
    a, ra = train(name, data, pad_token_id=0)
    b, rb = train(name, data, pad_token_id=61)
    for (n, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), f"{name} {n}"  # same shapes, same arithmetic: bit-identical
    assert [r["loss"] for r in ra.records] == pytest.approx([r["loss"] for r in rb.records],
                                                            rel=1e-6, abs=1e-7)
    assert {"mse", "kd", "ce", "lr", "tokens_per_s"} <= {k for r in ra.records for k in r}


@pytest.mark.parametrize("name", list(PAIRS))
def test_accumulation_equals_one_large_batch_with_padding_and_hard_labels(name):
    """2 micro-batches of 4 rows == 1 batch of 8 rows (padded to different lengths), to 1e-6."""
    data = rows(name)
    big, rbig = train(name, data, batch_size=8)
    acc, racc = train(name, data, batch_size=4, grad_accum_steps=2)
    diff = max_param_diff(big, acc)
    assert diff <= 1e-6, f"{name}: max |param diff| = {diff:.2e}"
    for key in ("loss", "tokens"):
        torch.testing.assert_close(torch.tensor([r[key] for r in rbig.records], dtype=torch.float64),
                                   torch.tensor([r[key] for r in racc.records], dtype=torch.float64),
                                   rtol=1e-6, atol=1e-7)


def _collate(name, data):
    from cex_kernels.distill.data import PadCollator
    return PadCollator(0, causal_lm=name != "bert")(data)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_logged_losses_match_a_float64_oracle(name):
    """The first step's logged parts against float64 eager PyTorch on the same 8 padded rows:
    projected-MSE on ``output_hidden_states[i+1]`` of real tokens over N·d_s; KL over real
    tokens / N; CE over labels != -100 (shifted for GPT-2) / their count."""
    data = rows(name, n=8)
    teacher, student, layer_map = make_pair(name)
    t64, s64 = [m.double().eval() for m in make_pair(name)[:2]]
    batch = _collate(name, data)
    mask = batch["attention_mask"].bool()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        to, so = (m(**inputs, output_hidden_states=True) for m in (t64, s64))
    n = mask.sum()
    # Phase 1 pairs student block 0 with teacher block 1 (evenly spaced), projection seed 0.
    p = random_projection(32, 16, seed=0, dtype=torch.float64)
    mse = ((so.hidden_states[1][mask] - to.hidden_states[2][mask] @ p) ** 2).sum() / (n * 16)
    T = 2.0
    kl = F.kl_div(F.log_softmax(so.logits[mask] / T, -1), F.log_softmax(to.logits[mask] / T, -1),
                  log_target=True, reduction="sum") * T * T / n
    labels = batch["labels"].masked_fill(~mask, -100)
    logits = so.logits
    if name == "gpt2":
        logits, labels = logits[:, :-1], labels[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100)

    _, r_ce = train(name, data, batch_size=8, max_grad_norm=None)
    _, r_os = train(name, data, method="one_shot", batch_size=8, max_grad_norm=None)
    first_mse = r_ce.records[0]
    first_kl = r_os.records[0]
    assert first_mse["tokens"] == int(n)
    assert first_mse["mse"] == pytest.approx(mse.item(), rel=1e-5)
    assert first_kl["kd"] == pytest.approx(kl.item(), rel=1e-5, abs=1e-6)  # fp32 KL cancels
    assert first_kl["ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert first_kl["loss"] == pytest.approx(0.5 * kl.item() + 0.5 * ce.item(), rel=1e-5)
    assert math.isfinite(first_kl["tokens_per_s"])


def test_pad_token_ids_do_not_change_training_under_bf16_autocast():
    data = rows("llama->qwen2")
    a, ra = train("llama->qwen2", data, pad_token_id=0, amp=True)
    b, _ = train("llama->qwen2", data, pad_token_id=61, amp=True)
    for (n, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), n
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in ra.records)
