"""The paper's recipes (python/) and ``cex demo``, each at a tiny setting (seconds): they run,
write JSON with the fields their docs promise, and a PNG plot (when matplotlib imports)."""
import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

HAS_MPL = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(autouse=True)
def _one_thread():
    import torch
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def check_outputs(result, json_path, png_path):
    assert os.path.exists(json_path)
    with open(json_path) as f:
        data = json.load(f)
    if HAS_MPL:
        assert result["plot"] == png_path and os.path.getsize(png_path) > 1000
        with open(png_path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    else:
        assert result["plot"] is None
    return data


def check_curve(curve, metric):
    assert curve, "empty curve"
    steps = [p["step"] for p in curve]
    assert steps == sorted(steps) and steps[0] > 0
    for p in curve:
        assert {"step", "samples", "flops", metric} <= set(p)
        assert p[metric] == p[metric]  # not NaN
    assert curve[-1]["flops"] > 0


def test_sparse_parity_recipe(tmp_path):
    import sparse_parity
    from cex_kernels.experiments.sparse_parity import METHODS
    js, png = str(tmp_path / "sp.json"), str(tmp_path / "sp.png")
    result = sparse_parity.main(["--d", "10", "--k", "2", "--teacher-width", "64",
                                 "--student-width", "16", "--samples", "2048",
                                 "--teacher-samples", "25600", "--batch-size", "64",
                                 "--eval-every", "8", "--device", "cpu", "--quiet",
                                 "--json", js, "--plot", png])
    data = check_outputs(result, js, png)
    run = data["runs"][0]
    assert set(run["students"]) == set(METHODS)
    assert {"d", "k", "teacher_width", "student_width", "samples", "seed"} <= set(run["config"])
    assert 0.0 <= run["teacher"]["test_acc"] <= 1.0
    for name, s in run["students"].items():
        check_curve(s["curve"], "test_acc")
        assert 0.0 <= s["final_test_acc"] <= 1.0
        assert s["samples"] >= 2048 and s["flops"] > 0  # every method gets the same budget
    ce = run["students"]["curriculum_extraction"]
    assert [p["name"].split(":")[0] for p in ce["phases"]] == ["layer 1", "logits"]
    assert len(data["table"]) == len(METHODS) and "environment" in data
    # progressive follows the teacher's timeline: student step t uses the first checkpoint
    # saved at or after teacher step t x multiplier (oracle: the rule, step by step)
    teacher, plan = run["teacher"], run["progressive"]
    saved = [s for s in teacher["saved_checkpoint_steps"] if s < teacher["steps"]]
    assert saved == list(range(50, teacher["steps"], 50)) and saved
    assert plan["multiplier"] == pytest.approx(teacher["steps"] / (0.5 * plan["student_steps"]))
    for name, ckpts in (("progressive", saved), ("progressive_2shot", [plan["two_shot_step"]])):
        want = []
        for t in range(1, plan["student_steps"] + 1):
            c = next((c for c in ckpts if c >= t * plan["multiplier"]), None)
            want.append("final teacher" if c is None else f"teacher step {c}")
        got = [p["name"].split(":")[0] for p in run["students"][name]["phases"]
               for _ in range(p["steps"])]
        assert got == want, name
    accs = {h["step"]: h["test_acc"] for h in teacher["history"]}
    half = 0.5 + (teacher["test_acc"] - 0.5) / 2
    first = next((s for s in saved if accs[s] >= half), saved[-1])
    assert plan["two_shot_step"] == first
    phases = [p["name"] for p in run["students"]["progressive_thresholds"]["phases"]]
    assert len(phases) == 5 and phases[-1] == "final teacher: softmax-KL"


def test_parity_config_rejects_bad_progressive_settings():
    from cex_kernels.experiments.sparse_parity import ParityConfig
    for kwargs, message in [(dict(checkpoint_every=70), "multiple of 50"),
                            (dict(progressive_until=0.0), "progressive_until"),
                            (dict(progressive_multiplier=-1.0), "progressive_multiplier"),
                            (dict(methods=["progresive"]), "unknown method")]:
        with pytest.raises(ValueError, match=message):
            ParityConfig(**kwargs)


def test_sparse_parity_paper_flag_builds_the_papers_config():
    import sparse_parity
    args = sparse_parity.build_parser().parse_args(["--paper", "--device", "cpu"])
    cfg = sparse_parity.config_from_args(args, seed=0)
    assert (cfg.d, cfg.k, cfg.samples) == (100, 6, 2_000_000)
    args = sparse_parity.build_parser().parse_args(["--paper", "--samples", "10", "--device", "cpu"])
    assert sparse_parity.config_from_args(args, seed=0).samples == 10


def test_transformer_parity_recipe(tmp_path):
    import transformer_parity
    js, png = str(tmp_path / "tp.json"), str(tmp_path / "tp.png")
    result = transformer_parity.main(
        ["--d", "6", "--k", "2", "--teacher-width", "16", "--teacher-depth", "2",
         "--student-width", "8", "--student-depth", "2", "--heads", "2",
         "--teacher-samples", "1600", "--samples", "640", "--batch-size", "32",
         "--eval-every", "5", "--test-size", "256", "--device", "cpu", "--quiet",
         "--json", js, "--plot", png])
    data = check_outputs(result, js, png)
    assert set(data["students"]) == set(transformer_parity.METHODS)
    for s in data["students"].values():
        check_curve(s["curve"], "test_acc")
        assert "samples_to_0.9" in s and "flops_to_0.9" in s
    plan, steps = data["progressive"], data["students"]["progressive"]["steps"]
    assert steps == plan["student_steps"] == 20
    assert plan["multiplier"] == pytest.approx(data["teacher"]["steps"] / (0.5 * 20))
    teacher = data["teacher"]
    assert teacher["restarts"] == len(teacher["attempts"]) - 1
    assert teacher["reached_target"] == teacher["attempts"][-1]["reached_target"]
    phases = [p["name"] for p in data["students"]["curriculum_extraction"]["phases"]]
    assert phases[:2] == ["layer 1: blocks.0 <- blocks.0", "layer 2: blocks.1 <- blocks.1"]


def test_transformer_parity_restarts_a_teacher_that_misses_its_target(tmp_path, capsys):
    import transformer_parity
    result = transformer_parity.main(
        ["--d", "6", "--k", "2", "--teacher-width", "8", "--teacher-depth", "1",
         "--student-width", "8", "--student-depth", "1", "--heads", "2", "--seed", "4",
         "--teacher-samples", "1600", "--teacher-target", "1.01", "--teacher-restarts", "2",
         "--samples", "320", "--batch-size", "32", "--eval-every", "5", "--test-size", "128",
         "--methods", "one_shot", "--device", "cpu", "--quiet",
         "--json", str(tmp_path / "tp.json"), "--plot", ""])
    teacher = result["teacher"]
    assert teacher["restarts"] == 2 and not teacher["reached_target"]
    assert [a["init_seed"] for a in teacher["attempts"]] == [4, 1004, 2004]
    assert [a["samples"] for a in teacher["attempts"]] == [1600] * 3
    assert teacher["total_samples"] == 4800
    assert "no teacher reached 1.01 test accuracy in 3 attempts" in capsys.readouterr().out


def test_pcfg_grammar_is_seeded_and_ends():
    import pcfg_lm
    a, b = pcfg_lm.PCFG(seed=3), pcfg_lm.PCFG(seed=3)
    assert a.stream(500, seed=1).tolist() == b.stream(500, seed=1).tolist()
    s = a.stream(2000, seed=2)
    assert (s == 0).any() and int(s.max()) <= a.n_t and int(s.min()) >= 0


def test_pcfg_lm_recipe(tmp_path):
    import pcfg_lm
    js, png = str(tmp_path / "lm.json"), str(tmp_path / "lm.png")
    result = pcfg_lm.main(
        ["--nonterminals", "4", "--terminals", "8", "--seq-len", "8", "--teacher-width", "16",
         "--teacher-depth", "2", "--student-width", "8", "--student-depth", "2", "--heads", "2",
         "--teacher-steps", "20", "--steps", "20", "--eval-every", "5", "--batch-size", "8",
         "--eval-sequences", "16", "--device", "cpu", "--quiet", "--json", js, "--plot", png])
    data = check_outputs(result, js, png)
    assert set(data["students"]) == {"labels", "one_shot", "curriculum_extraction"}
    assert data["target_loss"] == data["students"]["one_shot"]["final_heldout_loss"]
    for s in data["students"].values():
        check_curve(s["curve"], "heldout_loss")
        assert "steps_to_target" in s and "flops_to_target" in s
    assert data["students"]["one_shot"]["steps_to_target"] is not None


def _tiny_parity():
    from cex_kernels.experiments.sparse_parity import ParityConfig
    return ParityConfig(d=10, k=2, teacher_width=64, student_width=16, samples=1024,
                        teacher_samples=6400, batch_size=64, eval_every=8, test_size=512)


def test_demo_function(tmp_path):
    from cex_kernels.experiments.demo import run_demo
    out = tmp_path / "cex-demo"
    result = run_demo(str(out), quick=True, device="cpu", parity=_tiny_parity(),
                      bench_impls=["cpu", "eager"])
    data = check_outputs(result, str(out / "demo.json"), str(out / "demo.png"))
    assert sorted(os.listdir(out)) == (["demo.json", "demo.png"] if HAS_MPL else ["demo.json"])
    assert set(data["sparse_parity"]["students"]) == {"labels", "one_shot", "progressive",
                                                       "curriculum_extraction"}
    assert list(data["bench"]) == ["projected_mse"]
    rows = data["bench"]["projected_mse"]["rows"]
    ours = [r for r in rows if r["impl"] == "cpu" and "time_s" in r]
    assert ours and all(r["time_s"]["repeats"] >= 5 and "noisy" in r["time_s"] for r in ours)
    assert all("speedup_vs_eager_rounds" in r and r["peak_extra_memory_bytes"] > 0 for r in ours)
    assert data["bench"]["projected_mse"]["settings"]["timing"] == "interleaved"
    assert data["mode"] == "quick" and data["load_average_at_start"] is not None
    parts = {r["part"] for r in data["summary"]}
    assert parts == {"sparse parity", "bench projected_mse"}
    assert "| part" in result["table"] and "cex C++ fwd+bwd" in result["table"]
    assert "interleaved" in result["legend"]


def test_demo_quick_and_full_exclude_each_other(tmp_path):
    from cex_kernels.experiments.demo import run_demo
    with pytest.raises(ValueError, match="exclude"):
        run_demo(str(tmp_path), quick=True, full=True)


def test_cex_demo_cli(tmp_path, monkeypatch, capsys):
    """``cex demo --quick --out DIR`` reaches run_demo with its flags and prints the table."""
    from cex_kernels import cli
    from cex_kernels.experiments import demo

    real = demo.run_demo
    seen = {}

    def tiny(out, **kwargs):
        seen.update(kwargs, out=out)
        return real(out, parity=_tiny_parity(), bench_impls=["cpu", "eager"], **kwargs)

    monkeypatch.setattr(demo, "run_demo", tiny)
    assert cli.main(["demo", "--quick", "--out", str(tmp_path), "--device", "cpu",
                     "--silent"]) == 0
    assert seen["quick"] is True and seen["full"] is False and seen["out"] == str(tmp_path)
    out = capsys.readouterr().out
    assert "curriculum_extraction" in out and "demo.json" in out and "NOISY when" in out
    assert os.path.exists(tmp_path / "demo.json")


def test_cex_demo_default_out_is_its_own_folder():
    from cex_kernels import cli
    args = cli.build_parser().parse_args(["demo"])
    assert args.out == "cex-demo" and not args.quick and not args.full
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["demo", "--quick", "--full"])


def _tiny_hf_models(tmp_path):
    """A tiny word-level BERT tokenizer, random-init BERT (masked LM) and GPT-2 (causal LM)
    teachers with its vocabulary, and a text file: what bert_distill_gpu.py reads."""
    transformers = pytest.importorskip("transformers")
    words = "the a cat dog sat ran on under mat tree big small red blue and then".split()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(vocab))
    import random
    rng = random.Random(0)
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 20)))
                              for _ in range(120)) + "\n")
    import torch
    torch.manual_seed(0)
    dirs = {}
    for task, model in (
            ("mlm", transformers.BertForMaskedLM(transformers.BertConfig(
                vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64))),
            ("causal", transformers.GPT2LMHeadModel(transformers.GPT2Config(
                vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64)))):
        dirs[task] = str(tmp_path / task)
        model.save_pretrained(dirs[task])
        tok.save_pretrained(dirs[task])
    return dirs, str(text)


@pytest.mark.parametrize("task", ["mlm", "causal"])
def test_bert_distill_gpu_script_runs_on_cpu(tmp_path, task):
    import bert_distill_gpu
    dirs, text = _tiny_hf_models(tmp_path)
    methods = ["labels", "one_shot", "curriculum_extraction"] if task == "mlm" else \
        ["curriculum_extraction"]
    js, png = str(tmp_path / "bd.json"), str(tmp_path / "bd.png")
    result = bert_distill_gpu.main(
        ["--teacher", dirs[task], "--task", task, "--text", text, "--student-layers", "1",
         "--student-hidden", "16", "--student-heads", "2", "--student-intermediate", "32",
         "--seq-len", "16", "--eval-rows", "16", "--steps", "6", "--batch-size", "4",
         "--warmup-steps", "1", "--hidden-fraction", "0.34", "--eval-every", "3",
         "--methods", *methods, "--device", "cpu", "--quiet", "--json", js, "--plot", png])
    data = check_outputs(result, js, png)
    assert list(data["students"]) == methods
    for s in data["students"].values():
        check_curve(s["curve"], "heldout_loss")
        assert s["steps"] == 6 and 0.0 <= s["final_heldout_acc"] <= 1.0
    phases = [p["name"] for p in data["students"]["curriculum_extraction"]["phases"]]
    block = "bert.encoder.layer" if task == "mlm" else "transformer.h"
    assert phases[0] == f"layer 1: {block}.0 <- {block}.1" and len(phases) == 2
    assert data["estimate"]["flops_per_method"] > 0 and data["teacher"]["heldout_loss"] > 0


def test_bert_distill_masking_follows_the_80_10_10_rule():
    import torch
    import bert_distill_gpu

    class Tok:
        mask_token_id = 4

        def __len__(self):
            return 100

    blocks = torch.randint(5, 100, (200, 100))
    inputs, labels = bert_distill_gpu.mask_blocks(blocks, Tok(), 0.3, seed=0)
    target = labels != -100
    assert torch.equal(labels[target], blocks[target])
    assert abs(target.float().mean().item() - 0.3) < 0.01
    masked = (inputs == 4) & target
    kept = (inputs == blocks) & target
    assert not ((inputs != blocks) & ~target).any()  # only targets change
    assert abs(masked.sum().item() / target.sum().item() - 0.8) < 0.02
    # 10% random (a random token may equal the original: counted as kept, ~1/95 of them)
    assert abs(kept.sum().item() / target.sum().item() - 0.1) < 0.02
