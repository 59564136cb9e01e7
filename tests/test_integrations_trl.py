"""The fused generalized JSD against TRL's own ``GKDTrainer.generalized_jsd_loss``: values and
gradients over beta, temperature, reductions, ignored tokens and ``num_items_in_batch``; and a
few GKD steps with :class:`CexGKDTrainer` ending where TRL's ``GKDTrainer`` does."""
import pytest
import torch

pytest.importorskip("trl", reason="TRL is an optional dependency (pip install cex-kernels[trl])")
transformers = pytest.importorskip("transformers")

from cex_kernels.integrations import (CexGKDTrainer, CexLinearGKDTrainer,  # noqa: E402
                                      generalized_jsd_loss)
from cex_kernels.integrations.trl import _gkd_trainer_class  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models, shared machine

GKDTrainer = _gkd_trainer_class()
V = 50



def logits(seed, shape=(3, 7, V)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 3)


CASES = [dict(beta=b, temperature=t, reduction=r, with_labels=lab, num_items=n)
         for b in (0.0, 0.1, 0.5, 1.0) for t in (1.0, 2.0)
         for r, lab, n in (("batchmean", True, None), ("batchmean", False, None),
                           ("sum", True, None), ("mean", True, None), ("mean", False, None),
                           ("batchmean", True, 29))]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_values_and_gradients_match_trl(case):
    s0, t = logits(0), logits(1)
    labels = torch.randint(0, V, s0.shape[:-1], generator=torch.Generator().manual_seed(2))
    labels[0, :3] = -100  # a prompt
    labels[2, 5:] = -100  # padding
    kw = dict(labels=labels if case["with_labels"] else None, beta=case["beta"],
              temperature=case["temperature"], reduction=case["reduction"],
              num_items_in_batch=case["num_items"])
    out = {}
    for name, fn in (("trl", GKDTrainer.generalized_jsd_loss), ("cex", generalized_jsd_loss)):
        s = s0.clone().requires_grad_(True)
        loss = fn(s, t, **kw)
        (grad,) = torch.autograd.grad(loss, s)
        out[name] = (loss.detach(), grad)
    assert out["cex"][0].item() == pytest.approx(out["trl"][0].item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(out["cex"][1], out["trl"][1], rtol=1e-9, atol=1e-12)
    if case["with_labels"]:  # ignored tokens get no gradient
        assert out["cex"][1][0, :3].abs().max() == 0


def test_float32_close_to_trl_and_none_refused():
    s, t = logits(3).float(), logits(4).float()
    want = GKDTrainer.generalized_jsd_loss(s, t, beta=0.3)
    got = generalized_jsd_loss(s, t, beta=0.3)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ValueError, match="reduction must be"):
        generalized_jsd_loss(s, t, reduction="none")


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    vocab = {f"w{i}": i for i in range(V)}
    tok = Tokenizer(WordLevel(vocab, unk_token="w1"))
    tok.pre_tokenizer = Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0",
                                                eos_token="w2", unk_token="w1")


def _collate(rows):
    """input_ids / attention_mask / labels (-100 on the prompt and the padding)."""
    longest = max(len(r["ids"]) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        n = len(r["ids"])
        ids[i, :n], mask[i, :n] = torch.tensor(r["ids"]), 1
        labels[i, r["prompt"]:n] = ids[i, r["prompt"]:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _gkd_run(cls, data, tmp_path):
    try:  # TRL >= 0.20 keeps GKD under trl.experimental
        from trl.experimental.gkd import GKDConfig
    except ImportError:
        from trl import GKDConfig
    torch.manual_seed(0)
    make = lambda layers, width: transformers.GPT2LMHeadModel(transformers.GPT2Config(  # noqa: E731
        vocab_size=V, n_positions=32, n_embd=width, n_layer=layers, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, eos_token_id=2, bos_token_id=2))
    teacher, student = make(2, 32), make(1, 16)
    args = GKDConfig(output_dir=str(tmp_path / cls.__name__), per_device_train_batch_size=4,
                     gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-3,
                     lr_scheduler_type="constant", lmbda=0.0, beta=0.4, seq_kd=False,
                     train_sampling_strategy="sequential", save_strategy="no", report_to=[],
                     use_cpu=True, logging_steps=1, disable_tqdm=True, bf16=False)
    trainer = cls(model=student, teacher_model=teacher, args=args, train_dataset=data,
                  data_collator=_collate, processing_class=_tokenizer())
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer.train()
    assert max((v - before[k]).abs().max().item() for k, v in student.state_dict().items()) > 1e-4
    return student, [r["loss"] for r in trainer.state.log_history if "loss" in r]


@pytest.fixture(scope="module")
def gkd_data():
    import datasets
    g = torch.Generator().manual_seed(5)
    rows = []
    for _ in range(16):
        n = int(torch.randint(4, 12, (1,), generator=g))
        rows.append({"ids": torch.randint(3, V, (n,), generator=g).tolist(),
                     "prompt": int(torch.randint(1, 3, (1,), generator=g))})
    return datasets.Dataset.from_list(rows)


@pytest.fixture(scope="module")
def trl_run(gkd_data, tmp_path_factory):
    return _gkd_run(GKDTrainer, gkd_data, tmp_path_factory.mktemp("trl"))


@pytest.mark.parametrize("cls", [CexGKDTrainer, CexLinearGKDTrainer], ids=lambda c: c.__name__)
def test_cex_gkd_trainer_trains_like_trl_gkd_trainer(cls, gkd_data, trl_run, tmp_path):
    """Off-policy GKD (lmbda=0), beta=0.4, rows with prompts and padding, 2 steps of 2
    accumulated micro-batches: the same losses and the same student (CexLinearGKDTrainer:
    from hidden states and output layers, no logits)."""
    theirs, their_losses = trl_run
    ours, our_losses = _gkd_run(cls, gkd_data, tmp_path)
    # fp32 losses of ~2e-3 made of O(1) log-ratio terms: ~1e-7 absolute is their rounding
    assert len(our_losses) == 2 and our_losses == pytest.approx(their_losses, rel=1e-5, abs=2e-7)
    a, b = theirs.state_dict(), ours.state_dict()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-5, f"{cls.__name__} vs GKDTrainer: max |Δθ| = {diff:.3g}"
