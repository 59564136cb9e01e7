"""Hidden-state hooks, layer maps, budgets and the setup-time checks of the distill package."""
import pytest
import torch
from torch import nn

from cex_kernels.distill import (Budget, CurriculumExtraction, HiddenStateCapture, LayerMapError,
                                 evenly_spaced_layer_map, resolve_layer_map)
from cex_kernels.distill.registry import MLP


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared machine


class TupleBlock(nn.Module):
    """Returns (hidden, extra) like a Hugging Face block."""

    def __init__(self, d):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(d, d), nn.Tanh())

    def forward(self, x):
        h = self.inner(x)
        return h, h.sum()


class Nested(nn.Module):
    def __init__(self, d=6, n=3):
        super().__init__()
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(TupleBlock(d) for _ in range(n))})
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for layer in self.encoder["layers"]:
            x, _ = layer(x)
        return self.head(x)


def test_capture_takes_first_element_of_tuple_outputs_and_nested_names():
    torch.manual_seed(0)
    model, x = Nested(), torch.randn(4, 6)
    with HiddenStateCapture(model, ["encoder.layers.1", "encoder.layers.1.inner.0"]) as cap:
        model(x)
    h1 = model.encoder["layers"][1](model.encoder["layers"][0](x)[0])[0]
    torch.testing.assert_close(cap.hidden["encoder.layers.1"], h1)
    assert cap.hidden["encoder.layers.1.inner.0"].shape == (4, 6)
    assert not model.encoder["layers"][1]._forward_hooks  # hooks removed on exit


def test_capture_stop_after_skips_the_rest_of_the_forward():
    model, calls = Nested(), []
    model.head.register_forward_hook(lambda *a: calls.append("head"))
    with HiddenStateCapture(model, ["encoder.layers.0"], stop_after="encoder.layers.0") as cap:
        assert cap.run(model, torch.randn(2, 6)) is None
    assert calls == [] and cap.hidden["encoder.layers.0"].shape == (2, 6)


def test_evenly_spaced_layer_map():
    s, t = ["s0", "s1"], ["t0", "t1", "t2", "t3", "t4", "t5"]
    assert evenly_spaced_layer_map(s, t) == [("s0", "t2"), ("s1", "t5")]
    assert evenly_spaced_layer_map(["a", "b", "c"], ["x", "y", "z"]) == [("a", "x"), ("b", "y"), ("c", "z")]
    with pytest.raises(LayerMapError, match="only 1 teacher"):
        evenly_spaced_layer_map(s, ["t0"])


def test_resolve_layer_map_forms_and_unknown_names_list_close_matches():
    student, teacher = MLP(4, [3, 3], 2), MLP(4, [8, 8, 8, 8], 2)
    assert resolve_layer_map(student, teacher, {"blocks.0": "blocks.1"}) == [("blocks.0", "blocks.1")]
    assert resolve_layer_map(student, teacher, [("blocks.1", "blocks.3")]) == [("blocks.1", "blocks.3")]
    spaced = resolve_layer_map(student, teacher, {"student": ["blocks.0", "blocks.1"],
                                                  "teacher": [f"blocks.{i}" for i in range(4)]})
    assert spaced == [("blocks.0", "blocks.1"), ("blocks.1", "blocks.3")]
    with pytest.raises(LayerMapError, match=r"student has no module named 'block.0'.*blocks\.0"):
        resolve_layer_map(student, teacher, {"block.0": "blocks.1"})
    with pytest.raises(LayerMapError, match=r"teacher has no module named 'blocks.9'.*close matches"):
        resolve_layer_map(student, teacher, {"blocks.0": "blocks.9"})
    with pytest.raises(LayerMapError, match="empty"):
        resolve_layer_map(student, teacher, {})


def test_dimension_mismatch_and_empty_phase_errors():
    class SeqTeacher(nn.Module):  # hidden (N, 2, 8): leading dims differ from the student's
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(4, 16), nn.Unflatten(1, (2, 8)))
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.block(x).mean(1))

    student = MLP(4, [3], 2)
    method = CurriculumExtraction(SeqTeacher(), student, {"blocks.0": "block"})
    with pytest.raises(ValueError, match=r"leading dimensions"):
        method.setup((torch.randn(5, 4),))
    # Mapping the same depth twice with freeze_earlier leaves the second phase nothing to train.
    method = CurriculumExtraction(MLP(4, [8, 8], 2), MLP(4, [3, 3], 2),
                                  {"blocks.1": "blocks.0", "blocks.1.linear": "blocks.1"})
    with pytest.raises(ValueError, match="no parameters to train"):
        method.setup((torch.randn(5, 4),))
    student = MLP(4, [3], 5)  # 5 classes vs the teacher's 2
    with pytest.raises(ValueError, match="logits"):
        CurriculumExtraction(MLP(4, [8], 2), student, {"blocks.0": "blocks.0"}).setup((torch.randn(5, 4),))


def test_budgets():
    assert Budget(steps=7).resolve(32) == 7
    assert Budget(samples=100).resolve(32) == 4
    assert Budget(fraction=0.25).resolve(32, total_steps=40) == 10
    assert Budget(fraction=0.5).resolve(10, total_samples=1000) == 50
    with pytest.raises(ValueError, match="exactly one"):
        Budget(steps=1, samples=2)
    with pytest.raises(ValueError, match="total_steps"):
        Budget(fraction=0.5).resolve(8)


def _albert(width, n_layers):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AlbertConfig(vocab_size=40, embedding_size=8, hidden_size=width,
                                    num_hidden_layers=n_layers, num_attention_heads=2,
                                    intermediate_size=2 * width, max_position_embeddings=16,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.AlbertForMaskedLM(cfg)


def test_a_module_called_several_times_needs_a_call_index():
    """ALBERT runs one shared layer 4 times per forward: naming it alone is an error, and
    ``name@k`` captures exactly call k (= output_hidden_states[k + 1]) in setup and training."""
    torch.manual_seed(0)
    teacher, student = _albert(16, 4), _albert(8, 2)
    shared = "albert.encoder.albert_layer_groups.0"
    batch = {"input_ids": torch.randint(0, 40, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    method = CurriculumExtraction(teacher, student, {shared: shared})
    with pytest.raises(ValueError, match=r"student module '.*albert_layer_groups.0' is called 2 times"
                                         r" per forward .*'albert.encoder.albert_layer_groups.0@0'"):
        method.setup(batch)
    with pytest.raises(ValueError, match=r"only 4 time\(s\)"):
        CurriculumExtraction(teacher, student, {shared + "@1": shared + "@4"}).setup(batch)
    method = CurriculumExtraction(teacher, student, {shared + "@0": shared + "@1",
                                                     shared + "@1": shared + "@3"},
                                  freeze_earlier=False)  # one shared layer: nothing new to freeze
    method.setup(batch)
    with torch.no_grad():
        hs = teacher(**batch, output_hidden_states=True).hidden_states
    for phase, k in zip(method.phases[:2], (2, 4)):  # teacher calls 1 and 3
        torch.testing.assert_close(method.teacher_targets(phase, batch), hs[k], rtol=0, atol=0)
    with HiddenStateCapture(student, [shared + "@1"]) as cap:
        out = student(**batch, output_hidden_states=True)
    torch.testing.assert_close(cap.hidden[shared + "@1"], out.hidden_states[2], rtol=0, atol=0)


def test_hooks_capture_output_hidden_states_of_hf_blocks():
    pytest.importorskip("transformers")
    from test_distill_padding import make_pair
    for name in ("gpt2", "llama->qwen2", "bert"):
        teacher, student, layer_map = make_pair(name)
        method = CurriculumExtraction(teacher, student, {f"{s}": f"{t}" for s, t in zip(
            layer_map["student"], layer_map["teacher"][:2])})  # teacher blocks 0 and 1
        batch = {"input_ids": torch.randint(1, 60, (2, 5)),
                 "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}
        method.setup(batch)
        with torch.no_grad():
            hs = teacher(**batch, output_hidden_states=True).hidden_states
        for phase, (_, t) in zip(method.phases, method.layer_map):
            i = int(t.rsplit(".", 1)[1])  # (hs[-1] is after the final norm: not a block output)
            torch.testing.assert_close(method.teacher_targets(phase, batch), hs[i + 1],
                                       rtol=0, atol=0, msg=f"{name} {t}")
