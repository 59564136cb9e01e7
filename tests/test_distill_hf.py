"""Curriculum extraction on a tiny Hugging Face GPT-2 built from a config (no downloads)."""
import pytest
import torch

pytest.importorskip("transformers")

from cex_kernels.distill import CurriculumExtraction, Trainer, TrainConfig  # noqa: E402
from cex_kernels.distill.registry import random_tokens, tiny_gpt2  # noqa: E402


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
