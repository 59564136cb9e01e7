"""Curriculum extraction on a tiny Hugging Face GPT-2 built from a config (no downloads)."""
import pytest
import torch

pytest.importorskip("transformers")

from cex_kernels.distill import CurriculumExtraction, Trainer, TrainConfig  # noqa: E402
from cex_kernels.distill.registry import random_tokens, tiny_gpt2  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared machine


def test_tiny_gpt2_curriculum_extraction_trains_every_phase():
    torch.manual_seed(0)
    teacher = tiny_gpt2(n_embd=32, n_layer=4)
    student = tiny_gpt2(n_embd=16, n_layer=2)
    layer_map = {"student": [f"transformer.h.{i}" for i in range(2)],
                 "teacher": [f"transformer.h.{i}" for i in range(4)]}
    method = CurriculumExtraction(teacher, student, layer_map, hidden_budget=2, final_budget=2,
                                  temperature=2.0, hard_label_weight=0.5)
    assert method.layer_map == [("transformer.h.0", "transformer.h.1"),
                                ("transformer.h.1", "transformer.h.3")]
    before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher.train()
    cfg = TrainConfig(batch_size=4, progress_bar=False, print_schedule=False, log_every=1)
    result = Trainer(method, random_tokens(n=16, seq_len=8, vocab_size=64), cfg).fit()
    phase0 = set(result.phases[0].trainable)
    # Block 0 depends on the embeddings and itself; not on block 1, the final norm or the head.
    assert {"transformer.wte.weight", "transformer.wpe.weight"} <= phase0
    assert any(n.startswith("transformer.h.0.") for n in phase0)
    assert not any(n.startswith(("transformer.h.1.", "transformer.ln_f")) for n in phase0)
    assert not set(result.phases[1].trainable) & phase0  # earlier layers frozen
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in result.records)
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert "transformer.h.1.attn.c_attn.weight" in changed and result.phase_flops[0] > 0
    # The teacher never trained, and leaves fit() in the mode and with the flags it came in.
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())


def test_different_vocabularies_need_vocab_size_and_identity_projection_needs_equal_widths():
    """Teacher vocabulary 72, student 64 (padded differently): an error naming vocab_size,
    then KL over the first 64 logits equal to an eager float64 oracle; identity projection
    rejected at construction for unequal widths and equal to MSE(h_s, h_t) for equal ones."""
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    from cex_kernels.distill import OneShotDistillation

    def gpt2(vocab, width, layers):
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=16, n_embd=width,
                                          n_layer=layers, n_head=2, resid_pdrop=0.0,
                                          embd_pdrop=0.0, attn_pdrop=0.0))
    torch.manual_seed(0)
    teacher, student = gpt2(72, 32, 2), gpt2(64, 16, 1)
    batch = {"input_ids": torch.randint(0, 64, (3, 5)),
             "attention_mask": torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 4 + [0]])}
    with pytest.raises(ValueError, match="pass vocab_size="):
        OneShotDistillation(teacher, student).setup(batch)
    method = OneShotDistillation(teacher, student, vocab_size=64, temperature=2.0)
    phase = method.setup(batch)[0]
    loss, parts = method.student_loss(phase, batch, method.teacher_targets(phase, batch))
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        s = student.double()(**batch).logits[mask][:, :64]
        t = teacher.double()(**batch).logits[mask][:, :64]
    student.float(), teacher.float()
    want = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True,
                    reduction="batchmean") * 4
    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)

    with pytest.raises(ValueError, match="identity' needs equal widths, got teacher 32 and student 16"):
        CurriculumExtraction(teacher, student, {"transformer.h.0": "transformer.h.0"},
                             projection_kind="identity")
    twin = gpt2(64, 32, 2)
    method = CurriculumExtraction(teacher, twin, {"transformer.h.0": "transformer.h.0"},
                                  projection_kind="identity", vocab_size=64)
    phase = method.setup(batch)[0]
    loss, _ = method.student_loss(phase, batch, method.teacher_targets(phase, batch))
    with torch.no_grad():
        hs = twin(**batch, output_hidden_states=True).hidden_states[1][mask].double()
        ht = teacher(**batch, output_hidden_states=True).hidden_states[1][mask].double()
    assert loss.item() == pytest.approx(F.mse_loss(hs, ht).item(), rel=1e-5)
