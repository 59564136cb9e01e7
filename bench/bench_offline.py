"""Online vs offline distillation: step time and peak memory of curriculum extraction with the
teacher in memory (online) and from a teacher cache (offline, no teacher model), on tiny
random-init GPT-2s built from configs.

    python bench/bench_offline.py [--device cpu|cuda] [--steps 6] [--k 32] [--json PATH]

Each mode runs in its own process, so peak memory is that process's own: the peak resident
set size (``ru_maxrss``) on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU. Step
time: the median over each phase's steps after its first (from the trainer's per-step
``elapsed_s``). The cache is written first by a third process (its time is reported too).
A script, not a test: it asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

TEACHER = dict(n_layer=6, n_embd=384, n_head=6)
STUDENT = dict(n_layer=2, n_embd=128, n_head=4)
VOCAB, ROWS, MIN_LEN, MAX_LEN, BATCH = 8192, 96, 48, 96, 8


def _models(with_teacher=True):
    import torch

    from cex_kernels.distill.registry import hf_from_config
    common = dict(model_type="gpt2", task="causal_lm", vocab_size=VOCAB, n_positions=128)
    torch.manual_seed(0)
    teacher = hf_from_config(**common, **TEACHER) if with_teacher else None
    torch.manual_seed(1)
    student = hf_from_config(**common, **STUDENT)
    return teacher, student


def _method(teacher, student, steps):
    from cex_kernels.distill import CurriculumExtraction
    layer_map = {"student": [f"transformer.h.{i}" for i in range(STUDENT["n_layer"])],
                 "teacher": [f"transformer.h.{i}" for i in range(TEACHER["n_layer"])]}
    return CurriculumExtraction(teacher, student, layer_map, hidden_budget=steps,
                                final_budget=steps, temperature=2.0)


def _data():
    from cex_kernels.distill.registry import token_rows
    return token_rows(n=ROWS, min_len=MIN_LEN, max_len=MAX_LEN, vocab_size=VOCAB, seed=0)


def _peak(device) -> int:
    import torch
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child(mode: str, cache_dir: str, device: str, steps: int, k: int) -> dict:
    import torch
    torch.set_num_threads(max(1, os.cpu_count() // 2))
    from cex_kernels.distill import Trainer, TrainConfig
    from cex_kernels.distill.cache import TeacherCache
    from cex_kernels.distill.offline import cache_teacher
    teacher, student = _models(with_teacher=mode != "offline")  # offline: never built
    if mode == "cache":
        t0 = time.perf_counter()
        report = cache_teacher(_method(teacher, student, steps), _data(), cache_dir, k=k,
                               batch_size=BATCH, rows_per_shard=32, device=device,
                               progress_bar=False, overwrite=True)
        return {"mode": mode, "seconds": time.perf_counter() - t0,
                "bytes": report["estimate"].total_bytes,
                "bytes_per_token": report["estimate"].bytes_per_token}
    if mode == "offline":
        teacher = TeacherCache(cache_dir)
    teacher_bytes = 0 if mode == "offline" else sum(
        p.numel() * p.element_size() for p in teacher.parameters())
    method = _method(teacher, student, steps)
    del teacher
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cfg = TrainConfig(batch_size=BATCH, device=device, log_every=1, progress_bar=False,
                      print_schedule=False, tensorboard=False, max_grad_norm=None)
    result = Trainer(method, _data(), cfg).fit()
    per_phase = {}
    last = {}
    for r in result.records:
        if "step" not in r:
            continue
        prev = last.get(r["phase_index"])
        if prev is not None:
            per_phase.setdefault(r["phase"], []).append(r["elapsed_s"] - prev)
        last[r["phase_index"]] = r["elapsed_s"]
    return {"mode": mode, "teacher_bytes": teacher_bytes, "peak_bytes": _peak(device),
            "step_ms": {p: 1e3 * statistics.median(v) for p, v in per_phase.items()}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "CACHE_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.device, args.steps, args.k)))
        return 0
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = os.path.join(tmp, "cache")
        for mode in ("cache", "online", "offline"):
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--device",
                                   args.device, "--steps", str(args.steps), "--k", str(args.k),
                                   "--child", mode, cache_dir], capture_output=True, text=True)
            if proc.returncode:
                sys.stderr.write(proc.stderr[-3000:])
                return proc.returncode
            out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    c = out["cache"]
    print(f"teacher {TEACHER} -> student {STUDENT}, V={VOCAB}, {ROWS} rows of {MIN_LEN}-{MAX_LEN} "
          f"tokens, batch {BATCH}, k={args.k}, device {args.device}")
    print(f"cache: {c['bytes'] / 2**20:.2f} MiB ({c['bytes_per_token']} B/token), written in "
          f"{c['seconds']:.1f} s")
    print("| phase | online ms/step | offline ms/step | speed-up |")
    print("|---|---|---|---|")
    for phase, ms in out["online"]["step_ms"].items():
        off = out["offline"]["step_ms"][phase]
        print(f"| {phase} | {ms:.1f} | {off:.1f} | {ms / off:.2f}x |")
    mem = "peak RSS" if args.device == "cpu" else "peak allocated"
    print(f"{mem}: online {out['online']['peak_bytes'] / 2**20:.0f} MiB (teacher weights "
          f"{out['online']['teacher_bytes'] / 2**20:.0f} MiB), offline "
          f"{out['offline']['peak_bytes'] / 2**20:.0f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
