"""Distil a small Hugging Face model from a larger one on your text: curriculum extraction vs
one-shot distillation, through the package's trainer (meant for a GPU).

    # the paper's setting, scaled to a stated budget (BERT-large -> a 6 x 768 BERT, MLM):
    python python/bert_distill_gpu.py --teacher bert-large-uncased --task mlm \
        --dataset wikimedia/wikipedia --dataset-config 20231101.en --max-rows 2000000 \
        --student-layers 6 --student-hidden 768 --student-heads 12 --student-intermediate 3072 \
        --steps 10000 --batch-size 256 --seq-len 128 --device cuda
    # any causal LM and a text file (one document per line):
    python python/bert_distill_gpu.py --teacher path/to/llm --task causal --text corpus.txt \
        --student path/to/small-llm-with-the-same-tokenizer --steps 2000 --device cuda

The teacher is a ``save_pretrained`` directory or a hub name (``AutoModelForMaskedLM`` for
``--task mlm``, ``AutoModelForCausalLM`` for ``--task causal``). The student is another such
model with the teacher's vocabulary, or (``--student-layers`` ...) a randomly initialised copy
of the teacher's architecture with fewer / narrower layers. Text: ``--text`` files (one
document per line) or a ``datasets`` dataset (``--dataset``, ``--dataset-config``,
``--split``, ``--text-column``); it is tokenised with the teacher's tokenizer and cut into
blocks of ``--seq-len`` tokens; the last ``--eval-rows`` blocks are held out.

Masked LM: each block gets a fixed random mask (``--mask-prob`` of the tokens, 80% replaced
by the mask token, 10% by a random token, 10% kept). Every method trains on the same masked
inputs; softmax-KL reads the teacher's distribution at every real position; the reported
held-out loss and accuracy are on the masked positions against the true tokens (as BERT's
pretraining loss). Causal LM: held-out next-token cross-entropy and accuracy.

Students (the same initialisation, the same ``--steps`` optimizer steps of ``--batch-size``
blocks, AdamW with warmup + cosine per phase, bf16 autocast on CUDA):

- ``one_shot``: softmax-KL to the teacher's logits for all steps;
- ``curriculum_extraction``: student block i matched (projected-MSE) to a fixed Gaussian
  random projection of the teacher block evenly spaced by depth, ``--hidden-fraction`` of the
  steps split over the blocks (earlier blocks frozen), then softmax-KL;
- ``labels``: the hard-label loss alone (optional, ``--methods``).

Cost estimate (an ESTIMATE, nothing measured on a GPU): training FLOPs per token are about
``2 N_teacher`` (teacher forward) ``+ 6 N_student`` (student forward + backward), N = the
matmul parameters including the output layer. BERT-large teacher (~335M) with a 6 x 768
student (~66M, DistilBERT-sized; its 23M-parameter output layer counts too) is about
0.67 + 0.40 = 1.1 GFLOP per token. The first command above runs 10,000 steps x 256 x 128 =
328M tokens per method = 3.5e17 FLOPs; at 40% of an H100's 989 TFLOP/s bf16 peak (~400
TFLOP/s) that is **about 15 minutes per method, ~0.5 H100-hours for both** (1 hour at 20%
utilisation), plus tokenising 2M Wikipedia articles on the CPU (about 10-20 minutes with a
fast tokenizer). Curriculum extraction's block phases cost less per step (both models stop
at the mapped block). The script prints its own estimate from the actual parameter counts
before training. The paper's BERT-large / Wikipedia budget is larger and not reproduced by
this default.

Smoke-tested on the CPU with tiny random-init BERT and GPT-2 models (tests/test_recipes.py).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (environment, finish_run, format_table, plot_curves, resolve_device,  # noqa: E402
                     step_budget_method)

from cex_kernels.experiments._curves import fit_with_curve  # noqa: E402

METHODS = ("labels", "one_shot", "curriculum_extraction")
IGNORE = -100


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", required=True, help="save_pretrained directory or hub name")
    p.add_argument("--task", choices=("mlm", "causal"), default="mlm")
    p.add_argument("--tokenizer", help="default: the teacher's")
    p.add_argument("--student", help="a model with the teacher's vocabulary (directory or hub "
                                     "name); default: the teacher's architecture, resized")
    p.add_argument("--student-layers", type=int, help="random-init student: number of blocks")
    p.add_argument("--student-hidden", type=int, help="random-init student: width")
    p.add_argument("--student-heads", type=int, help="random-init student: attention heads")
    p.add_argument("--student-intermediate", type=int, help="random-init student: MLP width")
    p.add_argument("--text", nargs="+", help="text files, one document per line")
    p.add_argument("--dataset", help="a datasets name (instead of --text)")
    p.add_argument("--dataset-config", help="the dataset's configuration name")
    p.add_argument("--split", default="train")
    p.add_argument("--text-column", default="text")
    p.add_argument("--max-rows", type=int, help="documents to read (default: all)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per block")
    p.add_argument("--eval-rows", type=int, default=512, help="held-out blocks")
    p.add_argument("--mask-prob", type=float, default=0.15, help="MLM masking rate")
    p.add_argument("--methods", nargs="+", choices=METHODS,
                   default=["one_shot", "curriculum_extraction"])
    p.add_argument("--steps", type=int, default=10_000, help="optimizer steps per student")
    p.add_argument("--batch-size", type=int, default=256, help="blocks per step")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=100, help="per phase")
    p.add_argument("--hidden-fraction", type=float, default=0.1,
                   help="curriculum extraction's block phases' share of the steps")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=500, help="steps between evaluations")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                   help="bf16 autocast (auto: on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default="bert_distill.json")
    p.add_argument("--plot", default="bert_distill.png")
    p.add_argument("--quiet", action="store_true")
    return p


def read_documents(args) -> List[str]:
    if bool(args.text) == bool(args.dataset):
        raise SystemExit("give exactly one of --text and --dataset")
    docs: List[str] = []
    if args.text:
        for path in args.text:
            with open(path, encoding="utf-8") as f:
                docs.extend(line.strip() for line in f if line.strip())
    else:
        import datasets
        ds = datasets.load_dataset(args.dataset, args.dataset_config, split=args.split)
        docs = [t for t in ds[args.text_column] if t and t.strip()]
    return docs[:args.max_rows] if args.max_rows else docs


def token_blocks(docs: List[str], tokenizer, seq_len: int) -> torch.Tensor:
    """The documents' tokens (separated by the EOS/SEP token) cut into rows of ``seq_len``."""
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    ids: List[int] = []
    for start in range(0, len(docs), 1000):
        for row in tokenizer(docs[start:start + 1000], add_special_tokens=False)["input_ids"]:
            ids.extend(row + ([sep] if sep is not None else []))
    n = len(ids) // seq_len
    if n == 0:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than one block of {seq_len}")
    return torch.tensor(ids[:n * seq_len]).view(n, seq_len)


def mask_blocks(blocks: torch.Tensor, tokenizer, prob: float, seed: int):
    """BERT's masking, fixed per block: ``prob`` of the tokens are targets; of those 80%
    become the mask token, 10% a random token, 10% stay. Returns (inputs, labels)."""
    if tokenizer.mask_token_id is None:
        raise SystemExit("--task mlm needs a tokenizer with a mask token")
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(blocks.shape, generator=g) < prob
    labels = blocks.masked_fill(~target, IGNORE)
    roll = torch.rand(blocks.shape, generator=g)
    inputs = blocks.clone()
    inputs[target & (roll < 0.8)] = tokenizer.mask_token_id
    rand = target & (roll >= 0.8) & (roll < 0.9)
    inputs[rand] = torch.randint(len(tokenizer), blocks.shape, generator=g)[rand]
    return inputs, labels


def rows_of(inputs: torch.Tensor, labels: Optional[torch.Tensor]) -> List[Dict]:
    if labels is None:
        return [{"input_ids": x.tolist()} for x in inputs]
    return [{"input_ids": x.tolist(), "labels": y.tolist()} for x, y in zip(inputs, labels)]


def block_names(model: torch.nn.Module) -> List[str]:
    """The transformer blocks: the longest ``ModuleList`` of one module type (BERT's
    ``encoder.layer``, GPT-2's ``transformer.h``, Llama's ``model.layers``)."""
    best: List[str] = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > len(best) and \
                len({type(m) for m in mod}) == 1:
            best = [f"{name}.{i}" for i in range(len(mod))]
    if not best:
        raise SystemExit(f"{type(model).__name__}: found no list of transformer blocks")
    return best


def load_models(args):
    import transformers
    auto = transformers.AutoModelForMaskedLM if args.task == "mlm" else \
        transformers.AutoModelForCausalLM
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer or args.teacher)
    teacher = auto.from_pretrained(args.teacher)
    torch.manual_seed(args.seed + 1)
    if args.student:
        student = auto.from_pretrained(args.student)
    else:
        cfg = copy.deepcopy(teacher.config)
        for field, value in (("num_hidden_layers", args.student_layers),
                             ("hidden_size", args.student_hidden),
                             ("num_attention_heads", args.student_heads)):
            if value is not None:
                setattr(cfg, field, value)  # attribute_map aliases (GPT-2: n_layer, ...)
        if args.student_intermediate is not None:
            setattr(cfg, "intermediate_size" if hasattr(cfg, "intermediate_size") else "n_inner",
                    args.student_intermediate)
        student = auto.from_config(cfg)
    v_s, v_t = (m.get_output_embeddings().weight.shape[0] for m in (student, teacher))
    if v_s != v_t:
        raise SystemExit(f"teacher and student vocabularies differ in size ({v_t} vs {v_s})")
    return tokenizer, teacher, student


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that enter a matmul per token: all but embeddings' lookups and norms,
    plus the output layer (tied or not)."""
    out = model.get_output_embeddings()
    n = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2)
    n -= sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return n + out.weight.numel()


@torch.no_grad()
def heldout(model, inputs, labels, task: str, batch_size: int, device) -> Dict[str, float]:
    """Held-out cross-entropy and accuracy on the target tokens (masked positions for MLM,
    next tokens for causal LM)."""
    was = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for i in range(0, len(inputs), batch_size):
        x = inputs[i:i + batch_size].to(device)
        y = labels[i:i + batch_size].to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=x).logits.float()
        if task == "causal":
            logits, y = logits[:, :-1], y[:, 1:]
        keep = y != IGNORE
        loss_sum += torch.nn.functional.cross_entropy(logits[keep], y[keep], reduction="sum").item()
        correct += (logits[keep].argmax(-1) == y[keep]).sum().item()
        count += int(keep.sum())
    model.train(was)
    return {"heldout_loss": loss_sum / max(count, 1), "heldout_acc": correct / max(count, 1)}


def main(argv: Optional[List[str]] = None) -> Dict:
    args = build_parser().parse_args(argv)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    device = torch.device(resolve_device(args.device))
    amp = device.type == "cuda" if args.amp == "auto" else args.amp == "on"
    t0 = time.perf_counter()
    tokenizer, teacher, init = load_models(args)
    teacher.to(device).eval().requires_grad_(False)
    blocks = token_blocks(read_documents(args), tokenizer, args.seq_len)
    if args.task == "mlm":
        inputs, labels = mask_blocks(blocks, tokenizer, args.mask_prob, args.seed)
    else:
        inputs, labels = blocks, blocks.clone()
    n_eval = min(args.eval_rows, len(blocks) // 2)
    train = rows_of(inputs[:-n_eval], labels[:-n_eval] if args.task == "mlm" else None)
    ev_in, ev_lab = inputs[-n_eval:], labels[-n_eval:]
    tokens = args.steps * args.batch_size * args.seq_len
    n_t, n_s = matmul_params(teacher), matmul_params(init)
    flops = tokens * (2 * n_t + 6 * n_s)
    log(f"{len(train)} training blocks, {n_eval} held out; teacher {n_t / 1e6:.0f}M and student "
        f"{n_s / 1e6:.0f}M matmul parameters; per method {tokens / 1e6:.0f}M tokens, about "
        f"{flops:.2g} FLOPs (= {flops / 4e14 / 3600:.2f} h at 400 TFLOP/s)")
    teacher_eval = heldout(teacher, ev_in, ev_lab, args.task, args.batch_size, device)
    log(f"teacher: held-out loss {teacher_eval['heldout_loss']:.3f}, "
        f"acc {teacher_eval['heldout_acc']:.3f}")
    students = {}
    for name in args.methods:
        student = copy.deepcopy(init)
        method = step_budget_method(name, teacher, student, steps=args.steps,
                                    student_blocks=block_names(student),
                                    teacher_blocks=block_names(teacher),
                                    hidden_fraction=args.hidden_fraction,
                                    temperature=args.temperature, seed=args.seed)
        run = fit_with_curve(method, train, batch_size=args.batch_size, lr=args.lr,
                             device=str(device), seed=args.seed, eval_every=args.eval_every,
                             evaluate=lambda m: heldout(m, ev_in, ev_lab, args.task,
                                                        args.batch_size, device),
                             max_grad_norm=1.0, amp=amp, lr_schedule="cosine",
                             warmup_steps=args.warmup_steps)
        curve, res = run["curve"], run["result"]
        students[name] = {"method": name, "final_heldout_loss": curve[-1]["heldout_loss"],
                          "final_heldout_acc": curve[-1]["heldout_acc"],
                          "steps": res.global_step, "flops": int(sum(res.phase_flops)),
                          "seconds": run["seconds"],
                          "phases": [{"name": p.name, "steps": p.steps} for p in res.phases],
                          "curve": curve}
        log(f"{name:>22}: held-out loss {curve[-1]['heldout_loss']:.3f}, acc "
            f"{curve[-1]['heldout_acc']:.3f} ({run['seconds']:.0f}s)")
    rows = [{"method": n, "heldout_loss": round(s["final_heldout_loss"], 4),
             "heldout_acc": round(s["final_heldout_acc"], 4), "steps": s["steps"],
             "flops": f"{s['flops']:.3g}", "seconds": round(s["seconds"], 1)}
            for n, s in students.items()]
    print(format_table(rows))
    result = {"experiment": "bert_distill", "environment": environment(str(device)),
              "config": vars(args), "teacher": teacher_eval,
              "estimate": {"tokens_per_method": tokens, "flops_per_method": flops,
                           "teacher_matmul_params": n_t, "student_matmul_params": n_s},
              "students": students, "table": rows, "seconds": time.perf_counter() - t0}
    plot_path = plot_curves(args.plot, {n: s["curve"] for n, s in students.items()},
                            metric="heldout_loss", ylabel="held-out loss (nats)",
                            title=f"{args.task}: {os.path.basename(str(args.teacher))} -> "
                                  f"student, {args.steps} steps of {args.batch_size}")
    return finish_run(result, args.json, plot_path)


if __name__ == "__main__":
    main()
