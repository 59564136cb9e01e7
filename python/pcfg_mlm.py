"""Masked language modelling on a cfg3-like grammar: curriculum extraction vs its baselines.

    python python/pcfg_mlm.py --teacher-only     # train and cache the teacher (once: 33 min
                                                 # on a shared 2-core CPU), fit the n-grams
    python python/pcfg_mlm.py --seed 0 --seeds 1 # then 5 students (~22 min per seed there)

Panigrahi et al. (2024)'s PCFG masked-LM setting at CPU size. :class:`CFG3` draws a grammar
with a fixed-depth hierarchy (cfg3 style: 3 terminals, levels of nonterminals with 2-3 rules
of 2-3 symbols each); sentences are joined as ``BOS s1 BOS s2 ...`` and cut into windows; 30%
of the terminals are chosen and corrupted by BERT's 80/10/10 rule; every loss and metric reads
the chosen positions only. A bidirectional encoder teacher is trained once (AdamW, betas
(0.9, 0.95), warmup then cosine, fresh data every step) and cached under ``--cache-dir`` by a
hash of the grammar, data and teacher settings, together with the intermediate checkpoints
progressive distillation needs.

**The teacher must have learnt more than local statistics**: the recipe fits Witten-Bell
smoothed n-gram models that predict a chosen token from the corrupted tokens around it (the
two-sided trigram: left neighbour, the token itself, right neighbour; and two-sided 5- and
7-grams, reported only)
and refuses to report students (exit status 3) unless the teacher's held-out masked loss is
``--margin`` nats below the trigram's and below the labels-only student's.

Students (same initialisation, same data, equal step budgets, per seed):

- ``labels``: cross-entropy on the true tokens;
- ``one_shot``: softmax-KL to the final teacher at temperature 1;
- ``one_shot_argmax``: cross-entropy on the teacher's argmax (temperature -> 0);
- ``progressive``: softmax-KL to the teacher's saved checkpoints along its own timeline (at
  student step t the first checkpoint at or after teacher step ``t * teacher_steps / steps``),
  the final teacher last;
- ``curriculum_extraction``: student block i -> a random projection of teacher block i
  (projected-MSE over all positions, earlier blocks frozen), then softmax-KL.

Reported: held-out masked loss and accuracy against steps and FLOPs (one-shot argmax's
FLOPs include the teacher forward that made its labels), per seed, with the n-gram baselines.

Measured on the 2-core CPU (2026-12-02), defaults: held-out masked loss teacher 0.397,
two-sided trigram 0.817, 5-gram 0.553, 7-gram 0.497. Students (400 steps, seeds 0/1/2):
labels 1.042/1.047/1.041, one-shot 1.035/1.042/1.032, argmax 1.046/1.052/1.044, progressive
1.032/1.037/1.029, curriculum extraction 1.044/1.049/1.047: no student leaves the unigram
plateau. With ``--steps 1200`` (seeds 0/1): labels 0.788/0.861, one-shot 0.624/0.676,
progressive 0.624/0.652, curriculum extraction 0.812/0.770. **The paper's curriculum-extraction advantage is not
reproduced here.** Results and every difference from the paper: python/RESULTS.md (section 3).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import shlex
import sys
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (add_run_arguments, TinyTransformer, block_names, environment,  # noqa: E402
                     format_table, plot_curves, resolve_device, finish_run)

from cex_kernels.distill import (Budget, CurriculumExtraction, OneShotDistillation,  # noqa: E402
                                 ProgressiveDistillation)
from cex_kernels.distill.flops import LinearFlopCounter  # noqa: E402
from cex_kernels.experiments._curves import fit_with_curve  # noqa: E402
from cex_kernels.experiments.pcfg import (CFG3, NGramMLM, TeacherNotGoodEnough,  # noqa: E402
                                          cache_key, check_teacher, iter_windows, mask_tokens,
                                          masked_loss_acc)
from cex_kernels.experiments.sparse_parity import torch_threads  # noqa: E402

METHODS = ("labels", "one_shot", "one_shot_argmax", "progressive", "curriculum_extraction")
CACHE_VERSION = 1  # bump when the teacher's training code changes what it produces


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("grammar and data")
    g.add_argument("--levels", type=int, nargs="+", default=[1, 3, 3, 3],
                   help="nonterminals per level (root first); depth = number of levels")
    g.add_argument("--terminals", type=int, default=3, help="terminal symbols")
    g.add_argument("--rules", type=int, nargs=2, default=[2, 3], metavar=("LO", "HI"),
                   help="rules per nonterminal")
    g.add_argument("--rhs-lengths", type=int, nargs=2, default=[2, 3], metavar=("LO", "HI"),
                   help="symbols per right-hand side")
    g.add_argument("--grammar-seed", type=int, default=0, help="seed that draws the grammar")
    g.add_argument("--seq-len", type=int, default=64, help="tokens per window")
    g.add_argument("--mask-rate", type=float, default=0.3, help="share of terminals chosen")
    t = p.add_argument_group("teacher (trained once, cached)")
    t.add_argument("--teacher-width", type=int, default=128)
    t.add_argument("--teacher-depth", type=int, default=4)
    t.add_argument("--teacher-heads", type=int, default=16)
    t.add_argument("--teacher-steps", type=int, default=1800)
    t.add_argument("--teacher-batch", type=int, default=64, help="windows per teacher step")
    t.add_argument("--teacher-lr", type=float, default=2e-3)
    t.add_argument("--teacher-checkpoints", type=int, default=8,
                   help="equal slices of the teacher's run; the first C-1 ends are saved "
                        "for progressive distillation")
    t.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache",
                                                       "cex-kernels", "pcfg_mlm"))
    t.add_argument("--retrain", action="store_true", help="ignore a cached teacher")
    t.add_argument("--teacher-only", action="store_true",
                   help="train (or load) the teacher and the baselines, then stop")
    s = p.add_argument_group("students")
    s.add_argument("--student-width", type=int, default=64)
    s.add_argument("--student-depth", type=int, default=4)
    s.add_argument("--student-heads", type=int, default=8)
    s.add_argument("--steps", type=int, default=400, help="each student's optimizer steps")
    s.add_argument("--batch-size", type=int, default=32, help="windows per student step")
    s.add_argument("--lr", type=float, default=2e-3, help="student peak learning rate")
    s.add_argument("--warmup", type=int, default=20, help="warmup steps of each phase")
    s.add_argument("--hidden-fraction", type=float, default=0.25,
                   help="share of curriculum extraction's steps for its block phases")
    s.add_argument("--temperature", type=float, default=1.0, help="KL temperature")
    s.add_argument("--seeds", type=int, default=3, help="student seeds: seed .. seed+N-1")
    s.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    e = p.add_argument_group("evaluation and the teacher check")
    e.add_argument("--margin", type=float, default=0.1,
                   help="nats the teacher must be below the trigram and labels-only student")
    e.add_argument("--eval-windows", type=int, default=512, help="held-out windows")
    e.add_argument("--ngram-windows", type=int, default=8192, help="windows to fit n-grams on")
    e.add_argument("--eval-every", type=int, default=50,
                   help="student steps between evaluations")
    add_run_arguments(p, "pcfg_mlm")
    return p


# -- data -------------------------------------------------------------------------------------

def make_grammar(args) -> CFG3:
    return CFG3(tuple(args.levels), args.terminals, rules_per_symbol=tuple(args.rules),
                rhs_lengths=tuple(args.rhs_lengths), seed=args.grammar_seed)


def masked_windows(grammar: CFG3, n: int, args, seed: int) -> Dict[str, torch.Tensor]:
    ids = iter_windows(grammar.stream(n * args.seq_len, seed=seed), args.seq_len)
    gen = torch.Generator().manual_seed(seed)
    return mask_tokens(ids, n_terminals=grammar.n_terminals, mask_id=grammar.mask_id,
                       mask_rate=args.mask_rate, generator=gen)


def sinusoids(n: int, width: int) -> torch.Tensor:
    """``(n, width)`` sin/cos position codes (wavelengths 2 pi .. 200 pi), unit variance."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(100.0) * torch.arange(0, width, 2, dtype=torch.float32) / width)
    out = torch.zeros(n, width)
    out[:, 0::2], out[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return out * math.sqrt(2.0)


class Windows(torch.utils.data.Dataset):
    """Rows ``{"input_ids", "labels", "attention_mask"}`` of a dict of ``(n, S)`` tensors."""

    def __init__(self, data: Dict[str, torch.Tensor]):
        self.data = data

    def __len__(self):
        return len(self.data["input_ids"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.data.items()}


def encoder_forward(model, batch):
    """Every method's forward: the encoder sees all tokens; ``attention_mask`` marks the
    chosen positions, which the losses read."""
    return model(batch["input_ids"])


class CurriculumExtractionAllTokens(CurriculumExtraction):
    """Projected-MSE over every position (the hidden state of an unchosen token is as
    informative as a chosen one's); the KL phase still reads the chosen positions."""

    def _learn_rows(self, key, batch, lead):
        if key != "logits":
            batch = {k: v for k, v in batch.items() if k != "attention_mask"}
        super()._learn_rows(key, batch, lead)


def make_model(grammar: CFG3, args, width, depth, heads) -> TinyTransformer:
    """The encoder, with fixed sinusoidal positions: with TinyTransformer's learnt ones
    (initialised at 0.02) the pilots sat on the unigram plateau for 400+ steps; with
    sinusoids they found the neighbours after ~350."""
    model = TinyTransformer(vocab=grammar.vocab, seq_len=args.seq_len, width=width,
                            depth=depth, heads=heads, n_out=grammar.vocab, causal=False,
                            pool=None)
    model.pos.data.copy_(sinusoids(args.seq_len, width))
    model.pos.requires_grad_(False)
    return model


@torch.no_grad()
def evaluate(model, data: Dict[str, torch.Tensor], chunk: int = 128) -> Dict[str, float]:
    was = model.training
    model.eval()
    logits = torch.cat([model(data["input_ids"][i:i + chunk])
                        for i in range(0, len(data["input_ids"]), chunk)])
    loss, acc = masked_loss_acc(logits, data["labels"])
    model.train(was)
    return {"heldout_loss": loss.item(), "heldout_acc": acc}


# -- the teacher, trained once -----------------------------------------------------------------

def teacher_config(args, grammar: CFG3) -> Dict:
    return {"version": CACHE_VERSION, "grammar": grammar.config, "seq_len": args.seq_len,
            "mask_rate": args.mask_rate, "width": args.teacher_width,
            "depth": args.teacher_depth, "heads": args.teacher_heads,
            "steps": args.teacher_steps, "batch": args.teacher_batch, "lr": args.teacher_lr,
            "checkpoints": args.teacher_checkpoints, "eval_windows": args.eval_windows}


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())


def train_teacher(args, grammar, heldout, log) -> Dict:
    torch.manual_seed(args.grammar_seed)
    model = make_model(grammar, args, args.teacher_width, args.teacher_depth, args.teacher_heads)
    opt = torch.optim.AdamW(model.parameters(), lr=args.teacher_lr, betas=(0.9, 0.95),
                            weight_decay=0.0)
    warmup = max(1, int(0.06 * args.teacher_steps))
    every = max(1, args.teacher_steps // args.teacher_checkpoints)
    history, checkpoints, t0 = [], [], time.perf_counter()
    for step in range(args.teacher_steps):
        for group in opt.param_groups:
            group["lr"] = args.teacher_lr * cosine_lr(step, args.teacher_steps, warmup)
        batch = masked_windows(grammar, args.teacher_batch, args, seed=1_000_000 + step)
        loss, _ = masked_loss_acc(model(batch["input_ids"]), batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done = step + 1
        if done % every == 0 and done < args.teacher_steps and \
                len(checkpoints) < args.teacher_checkpoints - 1:
            checkpoints.append({"step": done, "state": copy.deepcopy(model.state_dict())})
        if done % max(1, args.teacher_steps // 18) == 0 or done == args.teacher_steps:
            ev = evaluate(model, heldout)
            secs = time.perf_counter() - t0
            history.append({"step": done, "train_loss": loss.item(), **ev, "seconds": secs})
            log(f"teacher step {done}/{args.teacher_steps}: held-out masked loss "
                f"{ev['heldout_loss']:.4f} acc {ev['heldout_acc']:.4f} ({secs:.0f}s, "
                f"{done * args.teacher_batch * args.seq_len / secs:.0f} tokens/s)")
    model.eval().requires_grad_(False)
    return {"state": model.state_dict(), "checkpoints": checkpoints, "history": history,
            "seconds": time.perf_counter() - t0}


def load_or_train_teacher(args, grammar, heldout, log) -> Dict:
    """The cached teacher for this grammar/data/teacher config, training it on a miss."""
    config = teacher_config(args, grammar)
    key = cache_key(config)
    path = os.path.join(args.cache_dir, f"teacher-{key}.pt")
    if os.path.exists(path) and not args.retrain:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        log(f"teacher: cache hit {path}")
        cached = True
    else:
        log(f"teacher: training ({args.teacher_depth} x {args.teacher_width}, "
            f"{args.teacher_steps} steps of {args.teacher_batch} x {args.seq_len} tokens); "
            f"cache {path}")
        saved = {"config": config, **train_teacher(args, grammar, heldout, log)}
        os.makedirs(args.cache_dir, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(saved, tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
        cached = False
    model = make_model(grammar, args, args.teacher_width, args.teacher_depth, args.teacher_heads)
    model.load_state_dict(saved["state"])
    model.eval().requires_grad_(False)
    return {"model": model, "checkpoints": saved["checkpoints"], "history": saved["history"],
            "train_seconds": saved["seconds"], "cache_path": path, "cache_key": key,
            "cache_hit": cached}


def ngram_baselines(grammar, args, heldout) -> Dict[str, Dict[str, float]]:
    fit = masked_windows(grammar, args.ngram_windows, args, seed=2_000_000)
    out = {}
    for name, offsets in (("trigram", (-1, 0, 1)), ("5-gram", (-2, -1, 0, 1, 2)),
                          ("7-gram", (-3, -2, -1, 0, 1, 2, 3))):
        model = NGramMLM(offsets, grammar.vocab).fit(fit["input_ids"], fit["labels"])
        out[name] = model.evaluate(heldout["input_ids"], heldout["labels"])
    return out


# -- students ------------------------------------------------------------------------------------

def argmax_labels(teacher, data: Dict[str, torch.Tensor], chunk: int = 128):
    """``data`` with the labels replaced by the teacher's argmax on the chosen positions,
    and the teacher's forward FLOPs per window."""
    with torch.no_grad(), LinearFlopCounter(teacher) as counter:
        pred = torch.cat([teacher(data["input_ids"][i:i + chunk]).argmax(-1)
                          for i in range(0, len(data["input_ids"]), chunk)])
    labels = torch.where(data["labels"] != -100, pred, data["labels"])
    return {**data, "labels": labels}, counter.flops / len(pred)


class NoTeacher(torch.nn.Module):
    """Zero logits: the stand-in teacher of the students trained on labels alone (the
    trainer asks every method for teacher logits; with ``hard_label_weight=1`` they get
    weight 0, and this one costs no FLOPs)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab, device=ids.device)


def build_method(name, args, teacher, student, checkpoints):
    common = {"forward_fn": encoder_forward}
    if name in ("labels", "one_shot_argmax"):  # argmax: its dataset holds the teacher's labels
        return OneShotDistillation(NoTeacher(teacher.head.out_features), student,
                                   budget=args.steps, hard_label_weight=1.0, **common)
    if name == "one_shot":
        return OneShotDistillation(teacher, student, budget=args.steps,
                                   temperature=args.temperature, **common)
    if name == "progressive":
        # The teacher's timeline: C equal slices; student slice j uses the teacher's end of
        # slice j (the final teacher for the last one).
        per = args.steps // args.teacher_checkpoints
        states = [c["state"] for c in checkpoints]
        return ProgressiveDistillation(teacher, student, states, checkpoint_budget=per,
                                       final_budget=args.steps - per * len(states),
                                       temperature=args.temperature, **common)
    per_block = max(1, int(args.hidden_fraction * args.steps / args.student_depth))
    return CurriculumExtractionAllTokens(
        teacher, student, {"student": block_names(student), "teacher": block_names(teacher)},
        hidden_budget=Budget(steps=per_block),
        final_budget=Budget(steps=args.steps - per_block * args.student_depth),
        temperature=args.temperature, projection_seed=args.seed, **common)


def run_students(args, grammar, teacher, heldout, seed, device, log) -> Dict[str, Dict]:
    train = masked_windows(grammar, args.steps * args.batch_size, args, seed=3_000_000 + seed)
    torch.manual_seed(10_000 + seed)
    init = make_model(grammar, args, args.student_width, args.student_depth, args.student_heads)
    out = {}
    for name in args.methods:
        data, extra_flops = train, 0.0
        if name == "one_shot_argmax":
            data, extra_flops = argmax_labels(teacher["model"], train)
        method = build_method(name, args, teacher["model"], copy.deepcopy(init),
                              teacher["checkpoints"])
        run = fit_with_curve(
            method, Windows(data), batch_size=args.batch_size, lr=args.lr, device=device,
            seed=seed, eval_every=args.eval_every, max_grad_norm=1.0,
            evaluate=lambda m: evaluate(m, heldout),
            optimizer_factory=lambda params: torch.optim.AdamW(params, lr=args.lr,
                                                               betas=(0.9, 0.95),
                                                               weight_decay=0.0),
            lr_schedule="cosine", warmup_steps=args.warmup)
        curve = run["curve"]
        for c in curve:  # the labels came from one teacher forward per training window
            c["flops"] = int(c["flops"] + extra_flops * c["samples"])
        res = run["result"]
        out[name] = {"final_heldout_loss": curve[-1]["heldout_loss"],
                     "final_heldout_acc": curve[-1]["heldout_acc"],
                     "steps": res.global_step, "flops": curve[-1]["flops"],
                     "seconds": run["seconds"],
                     "phases": [{"name": p.name, "steps": p.steps} for p in res.phases],
                     "curve": curve}
        log(f"seed {seed} {name:>22}: held-out masked loss {curve[-1]['heldout_loss']:.4f} "
            f"acc {curve[-1]['heldout_acc']:.4f} ({run['seconds']:.0f}s)")
        if name == "labels":
            check_teacher(teacher["heldout_loss"], {"labels-only student": out[name][
                "final_heldout_loss"]}, args.margin)
    return out


def summarise(per_seed: Dict[int, Dict[str, Dict]]) -> List[Dict]:
    rows = []
    methods = list(next(iter(per_seed.values())))
    for name in methods:
        losses = [per_seed[s][name]["final_heldout_loss"] for s in per_seed]
        accs = [per_seed[s][name]["final_heldout_acc"] for s in per_seed]
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        rows.append({"method": name, "seeds": len(losses), "mean_loss": round(mean(losses), 4),
                     "min_loss": round(min(losses), 4), "max_loss": round(max(losses), 4),
                     "mean_acc": round(mean(accs), 4),
                     "flops": f"{per_seed[next(iter(per_seed))][name]['flops']:.3g}",
                     "seconds": round(mean([per_seed[s][name]["seconds"] for s in per_seed]), 1)})
    return rows


def main(argv: Optional[List[str]] = None) -> Dict:
    args = build_parser().parse_args(argv)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    command = "python python/pcfg_mlm.py " + " ".join(shlex.quote(a) for a in (
        argv if argv is not None else sys.argv[1:]))
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    grammar = make_grammar(args)
    heldout = masked_windows(grammar, args.eval_windows, args, seed=4_000_000)
    result = {"experiment": "pcfg_mlm", "command": command, "config": vars(args),
              "grammar": {**grammar.config, "depth": grammar.depth,
                          "rules": [[list(map(list, r)) for r in lvl] for lvl in grammar.rules]}}
    with torch_threads(args.threads if device == "cpu" else None):
        teacher = load_or_train_teacher(args, grammar, heldout, log)
        teacher.update(evaluate(teacher["model"], heldout))
        baselines = ngram_baselines(grammar, args, heldout)
        result["teacher"] = {k: v for k, v in teacher.items() if k not in ("model", "checkpoints")}
        result["teacher"]["checkpoint_steps"] = [c["step"] for c in teacher["checkpoints"]]
        result["baselines"] = baselines
        log(f"held-out masked loss: teacher {teacher['heldout_loss']:.4f} (acc "
            f"{teacher['heldout_acc']:.4f}); " + "; ".join(
                f"{k} {v['loss']:.4f} (acc {v['acc']:.4f})" for k, v in baselines.items()))
        per_seed: Dict[int, Dict] = {}
        try:
            check_teacher(teacher["heldout_loss"], {"trigram": baselines["trigram"]["loss"]},
                          args.margin)
            if not args.teacher_only:
                if "labels" in args.methods:  # the check against it runs first
                    args.methods = ["labels"] + [m for m in args.methods if m != "labels"]
                for seed in range(args.seed, args.seed + args.seeds):
                    per_seed[seed] = run_students(args, grammar, teacher, heldout, seed, device,
                                                  log)
        except TeacherNotGoodEnough as exc:
            result["refused"] = str(exc)
            print(f"REFUSED: {exc}", flush=True)
        env = environment(device)
    result.update({"environment": env, "students": per_seed,
                   "seconds": time.perf_counter() - t0})
    if per_seed:
        result["table"] = summarise(per_seed)
        print(format_table(result["table"]))
    print(f"teacher {teacher['heldout_loss']:.4f} nats; " + "; ".join(
        f"{k} {v['loss']:.4f}" for k, v in baselines.items()))
    print(f"re-run: {command}")
    plot_path = None
    if per_seed:
        first = per_seed[args.seed]
        plot_path = plot_curves(
            args.plot, {n: s["curve"] for n, s in first.items()}, metric="heldout_loss",
            xs=("step", "flops"), ylabel="held-out masked loss (nats)",
            hline=baselines["trigram"]["loss"],
            title=f"PCFG masked LM (depth {grammar.depth}): teacher {args.teacher_depth}x"
                  f"{args.teacher_width} ({teacher['heldout_loss']:.3f}), student "
                  f"{args.student_depth}x{args.student_width}, seed {args.seed} "
                  "(dotted: two-sided trigram)")
    out = finish_run(result, args.json, plot_path)
    if "refused" in result and argv is None:
        sys.exit(3)
    return out


if __name__ == "__main__":
    main()
