"""The PCFG masked-LM experiment: grammar, 80/10/10 masking, masked-only loss, the n-gram
baseline, the teacher check, the teacher cache, and the recipe at a tiny setting."""
import itertools
import json
import math
import os
import sys

import pytest
import torch

from cex_kernels.experiments.pcfg import (BOS, CFG3, IGNORE, NGramMLM, TeacherNotGoodEnough,
                                          cache_key, check_teacher, mask_tokens, masked_loss_acc)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))


@pytest.fixture(autouse=True)
def _restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def language(grammar):
    """Every sentence the grammar derives, by expanding its rule lists exhaustively (the
    oracle: independent of the vectorised generator and of the parser)."""
    def expand(level, symbol):
        if level == grammar.depth:
            return {(symbol + 1,)}
        out = set()
        for rhs in grammar.rules[level][symbol]:
            for parts in itertools.product(*(expand(level + 1, s) for s in rhs)):
                out.add(sum(parts, ()))
        return out
    return expand(0, 0)


# -- grammar ------------------------------------------------------------------------------------

def test_grammar_rules_have_the_configured_shape():
    g = CFG3((1, 3, 4), 3, rules_per_symbol=(2, 3), rhs_lengths=(2, 3), seed=5)
    sizes = [1, 3, 4, 3]  # the last entry: terminals
    for level, rules in enumerate(g.rules):
        assert len(rules) == sizes[level]
        for rhs_list in rules:
            assert 2 <= len(rhs_list) <= 3 and len(set(rhs_list)) == len(rhs_list)
            for rhs in rhs_list:
                assert 2 <= len(rhs) <= 3 and all(0 <= s < sizes[level + 1] for s in rhs)


def test_sentences_are_derivable_and_cover_the_language():
    g = CFG3((1, 2), 2, rules_per_symbol=(2, 2), rhs_lengths=(2, 2), seed=1)
    lang = language(g)
    drawn = {tuple(s.tolist()) for s in g.sentences(3000, seed=0)}
    assert drawn <= lang
    assert drawn == lang  # rules are uniform: every sentence shows up in 3000 draws
    assert all(g.derives(s) for s in lang)
    # Same lengths, not in the language: the parser says no.
    others = {s for s in itertools.product((1, 2), repeat=4)} - lang
    assert others and not any(g.derives(s) for s in others)


def test_sentence_lengths_follow_the_depth():
    for levels in ((1, 3), (1, 3, 3), (1, 3, 3, 3)):
        g = CFG3(levels, 3, seed=2)
        d = len(levels)
        sents = g.sentences(500, seed=3)
        lengths = [len(s) for s in sents]
        assert 2 ** d <= min(lengths) and max(lengths) <= 3 ** d
        assert all(1 <= int(s.min()) and int(s.max()) <= 3 for s in sents)
        assert all(g.derives(s.tolist()) for s in sents[:20])


def test_grammar_and_stream_are_seeded():
    a, b, c = CFG3(seed=4), CFG3(seed=4), CFG3(seed=5)
    assert a.rules == b.rules and a.rules != c.rules
    s1, s2 = a.stream(1000, seed=1), b.stream(1000, seed=1)
    assert torch.equal(s1, s2) and not torch.equal(s1, a.stream(1000, seed=2))
    assert len(s1) == 1000 and int(s1[0]) == BOS
    # Between two BOS tokens: one derivable sentence.
    cuts = (s1 == BOS).nonzero().flatten().tolist()
    for i, j in zip(cuts[:5], cuts[1:6]):
        assert a.derives(s1[i + 1:j].tolist())


@pytest.mark.parametrize("bad", [dict(level_sizes=(2, 3)), dict(level_sizes=()),
                                 dict(n_terminals=1), dict(rules_per_symbol=(3, 2)),
                                 dict(rhs_lengths=(0, 2))])
def test_grammar_rejects_bad_config(bad):
    with pytest.raises(ValueError):
        CFG3(**bad)


# -- masking and loss ---------------------------------------------------------------------------

def test_masking_follows_the_80_10_10_rule():
    n_t, mask_id, rate = 3, 4, 0.3
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, n_t + 1, (400, 500), generator=gen)
    ids[:, ::10] = BOS
    out = mask_tokens(ids, n_terminals=n_t, mask_id=mask_id, mask_rate=rate,
                      generator=torch.Generator().manual_seed(1))
    chosen = out["attention_mask"].bool()
    terminals = ids != BOS
    assert not chosen[~terminals].any()  # BOS never chosen
    assert torch.equal(out["labels"][chosen], ids[chosen])
    assert (out["labels"][~chosen] == IGNORE).all()
    assert torch.equal(out["input_ids"][~chosen], ids[~chosen])
    n_term, n_chosen = int(terminals.sum()), int(chosen.sum())

    def close(count, n, p):  # within 5 standard deviations of a binomial
        return abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p))
    assert close(n_chosen, n_term, rate)
    x = out["input_ids"][chosen]
    y = ids[chosen]
    assert close(int((x == mask_id).sum()), n_chosen, 0.8)
    # kept: 10%, plus the random 10% that drew the same terminal (1 in 3)
    assert close(int((x == y).sum()), n_chosen, 0.1 + 0.1 / n_t)
    other = (x != mask_id) & (x != y)
    assert close(int(other.sum()), n_chosen, 0.1 * (n_t - 1) / n_t)
    assert int(x[other].min()) >= 1 and int(x[other].max()) <= n_t


def test_mask_rate_is_checked():
    with pytest.raises(ValueError, match="mask_rate"):
        mask_tokens(torch.ones(2, 3, dtype=torch.long), n_terminals=3, mask_id=4, mask_rate=0.0)


def test_masked_loss_reads_only_labelled_positions():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 5, dtype=torch.float64)
    labels = torch.full((3, 7), IGNORE)
    keep = [(0, 1), (1, 4), (2, 0), (2, 6)]
    for b, t in keep:
        labels[b, t] = (b + t) % 5
    loss, acc = masked_loss_acc(logits, labels)
    want = [-(logits[b, t].log_softmax(-1)[(b + t) % 5]).item() for b, t in keep]
    assert loss.item() == pytest.approx(sum(want) / len(want), rel=1e-6)
    hits = [int(logits[b, t].argmax()) == (b + t) % 5 for b, t in keep]
    assert acc == pytest.approx(sum(hits) / len(hits))
    changed = logits.clone()
    changed[labels == IGNORE] = 100.0 * torch.randn_like(changed[labels == IGNORE])
    assert masked_loss_acc(changed, labels)[0].item() == pytest.approx(loss.item(), rel=1e-12)


# -- n-gram baseline ----------------------------------------------------------------------------

def test_witten_bell_by_hand():
    # Training pairs (context = the token itself, label): (1 -> 1), (1 -> 2), (2 -> 2).
    m = NGramMLM((0,), vocab=4).fit(torch.tensor([[1, 3, 1, 2]]),
                                    torch.tensor([[1, IGNORE, 2, 2]]))
    assert m.orders == [(0,), ()]
    # Order (): counts {1: 1, 2: 2}, c = 3, T = 2, uniform 1/4 below:
    unigram = [0.5 / 5, 1.5 / 5, 2.5 / 5, 0.5 / 5]
    # Order (0,), context 1: counts {1: 1, 2: 1}, c = 2, T = 2:
    given_1 = [(0 + 2 * unigram[y]) / 4 + (1 / 4 if y in (1, 2) else 0) for y in range(4)]
    assert given_1 == pytest.approx([0.05, 0.4, 0.5, 0.05])
    p = m.prob([(1,), (3,)])  # context 3 never seen: the unigram order
    assert p[0] == pytest.approx(given_1) and p[1] == pytest.approx(unigram)
    ev = m.evaluate(torch.tensor([[1, 3]]), torch.tensor([[2, 1]]))
    assert ev["loss"] == pytest.approx(-(math.log(0.5) + math.log(0.3)) / 2)
    assert ev["acc"] == pytest.approx(0.5)  # both argmaxes are 2


def test_two_sided_contexts_and_backoff_orders():
    m = NGramMLM((-2, -1, 0, 1, 2), vocab=5)
    assert m.orders == [(-2, -1, 0, 1, 2), (-1, 0, 1), (0,), ()]
    # Positions off the window read as BOS: the first token's left context is BOS.
    ctx, ys = NGramMLM._contexts(torch.tensor([[3, 4, 1]]), torch.tensor([[2, IGNORE, 1]]),
                                 (-1, 0, 1))
    assert ctx == [(BOS, 3, 4), (4, 1, BOS)] and ys == [2, 1]
    # A deterministic rule the trigram can see (label = right neighbour) is learnt exactly.
    ids = torch.randint(1, 4, (200, 30), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = ids[:, 1:]
    tri = NGramMLM((-1, 0, 1), vocab=5).fit(ids, labels)
    assert tri.evaluate(ids, labels)["acc"] == 1.0


# -- the teacher check and the cache -----------------------------------------------------------

def test_check_teacher_refuses_without_the_margin():
    check_teacher(0.5, {"trigram": 0.61, "labels": 0.7}, 0.1)
    with pytest.raises(TeacherNotGoodEnough, match="trigram"):
        check_teacher(0.55, {"trigram": 0.61, "labels": 0.9}, 0.1)
    with pytest.raises(TeacherNotGoodEnough, match="labels"):
        check_teacher(0.5, {"trigram": 0.9, "labels": 0.55}, 0.1)
    with pytest.raises(TeacherNotGoodEnough):
        check_teacher(float("nan"), {"trigram": 0.9}, 0.1)


def test_cache_key_is_content_addressed():
    base = {"grammar": {"level_sizes": [1, 3, 3], "seed": 0}, "width": 64, "lr": 0.002}
    assert cache_key(base) == cache_key(json.loads(json.dumps(base)))
    assert cache_key(base) == cache_key(dict(reversed(list(base.items()))))
    for change in ({"width": 65}, {"lr": 0.003},
                   {"grammar": {"level_sizes": [1, 3, 3], "seed": 1}}):
        assert cache_key({**base, **change}) != cache_key(base)


TINY = ["--levels", "1", "3", "3", "--seq-len", "32", "--teacher-width", "16",
        "--teacher-depth", "2", "--teacher-heads", "2", "--teacher-steps", "12",
        "--teacher-batch", "4", "--teacher-checkpoints", "4", "--student-width", "8",
        "--student-depth", "2", "--student-heads", "2", "--steps", "12", "--batch-size", "4",
        "--seeds", "1", "--eval-windows", "16", "--ngram-windows", "32", "--eval-every", "4",
        "--device", "cpu", "--quiet"]


def test_recipe_refuses_an_untrained_teacher_and_caches_it(tmp_path):
    import pcfg_mlm
    cache = str(tmp_path / "cache")
    js = str(tmp_path / "a.json")
    first = pcfg_mlm.main(TINY + ["--cache-dir", cache, "--json", js, "--plot", ""])
    # 12 steps of 4 windows: the teacher has not beaten the two-sided trigram.
    assert "trigram" in first["refused"] and first["students"] == {}
    assert not first["teacher"]["cache_hit"]
    assert os.path.exists(first["teacher"]["cache_path"])
    with open(js) as f:
        assert "refused" in json.load(f)
    again = pcfg_mlm.main(TINY + ["--cache-dir", cache, "--json", "", "--plot", ""])
    assert again["teacher"]["cache_hit"]
    assert again["teacher"]["cache_path"] == first["teacher"]["cache_path"]
    assert again["teacher"]["heldout_loss"] == first["teacher"]["heldout_loss"]
    other = pcfg_mlm.main(TINY + ["--teacher-lr", "0.001", "--cache-dir", cache, "--json", "",
                                  "--plot", ""])
    assert not other["teacher"]["cache_hit"]
    assert other["teacher"]["cache_key"] != first["teacher"]["cache_key"]


def test_recipe_runs_every_student(tmp_path):
    import pcfg_mlm
    js = str(tmp_path / "b.json")
    result = pcfg_mlm.main(TINY + ["--margin", "-100", "--cache-dir", str(tmp_path / "c"),
                                   "--json", js, "--plot", ""])
    assert "refused" not in result
    with open(js) as f:
        data = json.load(f)
    students = data["students"]["0"]
    assert set(students) == set(pcfg_mlm.METHODS)
    for name, s in students.items():
        steps = [p["step"] for p in s["curve"]]
        flops = [p["flops"] for p in s["curve"]]
        assert steps == sorted(steps) and steps[-1] == 12 == s["steps"]
        assert flops == sorted(flops) and flops[-1] > 0
        assert all(0.0 <= p["heldout_acc"] <= 1.0 for p in s["curve"])
    assert [p["steps"] for p in students["progressive"]["phases"]] == [3, 3, 3, 3]
    assert len(students["curriculum_extraction"]["phases"]) == 3  # 2 blocks, then KL
    # Labels alone never run the teacher; the argmax student pays one teacher forward.
    assert students["labels"]["flops"] < students["one_shot"]["flops"]
    assert students["one_shot_argmax"]["flops"] > students["labels"]["flops"]
    assert data["command"].startswith("python python/pcfg_mlm.py")
