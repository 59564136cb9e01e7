"""Writing a teacher cache: :func:`cache_teacher` runs the teacher (and progressive
checkpoints) once over a dataset, through the trainer's data path (the same collator, the
method's own forward and hooks, its row rules), so exactly the tokens a loss reads are
stored. Rows are cached in order, ``rows_per_shard`` per shard (the format:
:mod:`~cex_kernels.distill.cache`); under ``torchrun`` rank r writes shards r, r + W, ...;
a rerun writes only the shards that are missing (resume after a kill).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from cex_kernels.distill import cache as C
from cex_kernels.distill.hooks import HiddenStateCapture
from cex_kernels.distill.metrics import log
from cex_kernels.distill.schedule import LOGIT_KL


@dataclass
class CacheEstimate:
    """Tokens per stream, bytes per token, and the total, before anything is written."""
    rows: int
    tokens: Dict[str, int]
    bytes_per_token: Dict[str, int]
    total_bytes: int = field(init=False)

    def __post_init__(self):
        self.total_bytes = sum(self.tokens[s] * self.bytes_per_token[s] for s in self.tokens)

    def __str__(self):
        lines = [f"teacher cache estimate: {self.rows} rows"]
        for s in self.tokens:
            lines.append(f"  {s:<12} {self.tokens[s]:>10} tokens x {self.bytes_per_token[s]:>6} "
                         f"B/token = {self.tokens[s] * self.bytes_per_token[s] / 2**20:.2f} MiB")
        lines.append(f"  total        {self.total_bytes / 2**20:.2f} MiB")
        return "\n".join(lines)


def _stream_plan(method) -> Dict[str, Dict[str, Any]]:
    """The streams a method's phases read: name -> {kind, rule key, phase}."""
    return {method.cache_stream(phase):
            {"kind": "logits", "key": "logits", "phase": phase} if phase.kind == LOGIT_KL else
            {"kind": "hidden", "key": phase.pair, "phase": phase} for phase in method.phases}


def _per_row(t: Tensor, mask: Optional[Tensor]) -> List[Tensor]:
    if mask is not None:
        return [t[b][mask[b]] for b in range(t.shape[0])]
    return [t[b].reshape(-1, t.shape[-1]) for b in range(t.shape[0])]


class _Runner:
    """One batch through the teacher(s): per stream, the tensors to store per row."""

    def __init__(self, method, opts):
        self.method, self.opts = method, opts
        self.plan = _stream_plan(method)
        self.layer_names = [t for _, t in getattr(method, "layer_map", [])] \
            if any(p["kind"] == "hidden" for p in self.plan.values()) else []
        # One group per teacher model: the final teacher's streams (logits and hidden
        # states, one pass), then each progressive checkpoint's logits. A shard runs group
        # by group, so each checkpoint is loaded once per shard, not once per batch.
        final = [n for n in self.plan if n == "logits" or self.plan[n]["kind"] == "hidden"]
        self.groups = ([final] if final else []) + [[n] for n in self.plan if n.startswith("logits@")]

    def _logits(self, logits: Tensor, generator) -> Dict[str, Tensor]:
        o = self.opts
        z = logits.float()
        if self.method.vocab_size is not None:
            z = z[..., :self.method.vocab_size]
        self.vocab = z.shape[-1]
        lp = torch.log_softmax(z / self.method.temperature, dim=-1).reshape(-1, z.shape[-1])
        if o["sampled_rounds"]:
            from cex_kernels.distill.top_k import sample_sparse_logits
            vals, idx, w = sample_sparse_logits(lp, o["sampled_rounds"], generator=generator,
                                                proposal_temperature=o["proposal_temperature"])
            out = {"weights": w.reshape(*z.shape[:-1], -1)}
        else:
            vals, idx = lp.topk(min(o["k"], lp.shape[-1]), dim=-1)
            out = {}
        out["logprobs"] = vals.reshape(*z.shape[:-1], -1).to(C.DTYPES[o["logprob_dtype"]])
        out["indices"] = idx.reshape(*z.shape[:-1], -1).to(torch.int32)
        return out

    @torch.inference_mode()
    def run(self, batch, generator, group=None) -> Dict[str, Dict[str, Tensor]]:
        """The streams of ``group`` (all when None) for one batch."""
        from cex_kernels.distill.methods import logits_of
        method, out = self.method, {}
        names = set(group or self.plan)
        hidden_wanted = any(self.plan[n]["kind"] == "hidden" for n in names)
        for name, p in self.plan.items():
            if p["kind"] != "logits" or name not in names:
                continue
            teacher = method.teacher_for(p["phase"])
            with HiddenStateCapture(teacher, self.layer_names if name == "logits" else []) as cap:
                logits = logits_of(cap.run(method.forward_fn, teacher, batch))
            out[name] = self._logits(logits, generator)
            if name == "logits":
                hidden = dict(cap.hidden)
        if hidden_wanted and "logits" not in out:  # no KL phase: hidden states only
            with HiddenStateCapture(method.teacher, self.layer_names) as cap:
                cap.run(method.forward_fn, method.teacher, batch)
            hidden = dict(cap.hidden)
        for name, p in self.plan.items():
            if p["kind"] == "hidden" and name in names:
                i = p["key"]
                proj = method.projections[i].projection
                h = hidden[method.layer_map[i][1]].float()
                y = h @ proj.to(h.device, torch.float32)
                out[name] = {"values": y.to(C.DTYPES[self.opts["hidden_dtype"]])}
        return out


def _batches(dataset, rows, batch_size, collate):
    for a in range(0, len(rows), batch_size):
        yield collate([dataset[i] for i in rows[a:a + batch_size]])


def cache_teacher(method, dataset, out_dir: str, *, k: int = 32, batch_size: int = 8,
                  rows_per_shard: int = 256, logprob_dtype: str = "bfloat16",
                  hidden_dtype: str = "bfloat16", sampled_rounds: Optional[int] = None,
                  proposal_temperature: float = 1.0, seed: int = 0, storage: str = "auto",
                  collate_fn=None, device: str = "auto", tokenizer: Optional[str] = None,
                  dry_run: bool = False, overwrite: bool = False,
                  progress_bar: bool = True) -> Dict[str, Any]:
    """Run ``method``'s teacher (and progressive checkpoints) over ``dataset`` once and write
    a cache in ``out_dir`` that ``method`` can train from without the teacher.

    ``method`` is built as for online training (teacher and student: the student fixes the
    projections' widths and the layer map; it is not trained). ``k`` ids per token (top-k),
    or ``sampled_rounds`` draws per token (Random-Sampling KD, :mod:`top_k`) with proposal
    ``q ∝ p^(1/proposal_temperature)``; log-probabilities at ``method.temperature``.
    Prints (and returns under ``"estimate"``) the size per token and in total before
    writing; ``dry_run`` stops there. A rerun with the same arguments resumes (writes only
    missing shards); other arguments in a non-empty ``out_dir`` are an error unless
    ``overwrite``. Under ``torchrun`` every rank writes its share of the shards.
    Returns ``{"path", "estimate", "written": [shard ids], "rows"}``."""
    from cex_kernels.distill.trainer import _setup_distributed, default_collator
    import torch.distributed as dist

    _check_options(k, batch_size, rows_per_shard, logprob_dtype, hidden_dtype, sampled_rounds,
                   proposal_temperature)
    storage = C.resolve_storage(storage)
    if not hasattr(dataset, "__len__") or isinstance(dataset, torch.utils.data.IterableDataset):
        raise TypeError("cache_teacher needs a map-style dataset (len and __getitem__)")
    rank, world, dev = _setup_distributed(device)
    collate = collate_fn or default_collator(method)
    n = len(dataset)
    method.student.to(dev).eval()
    method.teacher.to(dev).eval().requires_grad_(False)
    from cex_kernels.distill.data import to_device
    sample = to_device(collate([dataset[i] for i in range(min(batch_size, n))]), dev)
    method.setup(sample)
    opts = dict(k=k, logprob_dtype=logprob_dtype, hidden_dtype=hidden_dtype,
                sampled_rounds=sampled_rounds, proposal_temperature=proposal_temperature)
    runner = _Runner(method, opts)
    first = runner.run(sample, torch.Generator(device=dev).manual_seed(seed))
    streams = {}
    for name, p in runner.plan.items():
        rule = method.row_rules[p["key"]]
        lead = next(iter(first[name].values())).shape[:-1]
        streams[name] = {"kind": p["kind"], "masked": rule.masked,
                         "row_shape": [] if rule.masked else list(lead[1:])}
        if p["kind"] == "hidden":
            streams[name]["width"] = first[name]["values"].shape[-1]
    del first
    vocab = getattr(runner, "vocab", None)
    # ids stored per token: k, or one per distinct draw; never more than V
    opts["slots"] = min(sampled_rounds or k, vocab or sampled_rounds or k)

    index = _index(method, n, rows_per_shard, storage, streams, opts, seed, tokenizer, vocab)
    estimate = _estimate(method, dataset, collate, batch_size, runner.plan, streams, opts)
    if rank == 0:
        print(estimate, flush=True)
    if dry_run:
        return {"path": out_dir, "estimate": estimate, "written": [], "rows": n}
    if rank == 0:
        _prepare(out_dir, index, overwrite)
    if world > 1:
        dist.barrier()
    num_shards = index["num_shards"]
    todo = [s for s in range(rank, num_shards, world)
            if not os.path.exists(os.path.join(out_dir, C.shard_name(s, storage)))]
    bar = _bar(progress_bar and rank == 0, len(runner.groups) * sum(
        math.ceil((min((s + 1) * rows_per_shard, n) - s * rows_per_shard) / batch_size)
        for s in todo))
    for s in todo:
        rows = list(range(s * rows_per_shard, min((s + 1) * rows_per_shard, n)))
        per_stream: Dict[str, Dict[str, List[Tensor]]] = {name: {} for name in streams}
        generator = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + s)
        batches = [to_device(b, dev) for b in _batches(dataset, rows, batch_size, collate)]
        for group in runner.groups:
            for batch in batches:
                for name, fields in runner.run(batch, generator, group).items():
                    mask = method.row_rules[runner.plan[name]["key"]].mask(batch)
                    for f, t in fields.items():
                        per_stream[name].setdefault(f, []).extend(_per_row(t, mask))
                bar.update(1)
        tensors = {"rows": torch.tensor(rows, dtype=torch.int64)}
        for name, fields in per_stream.items():
            counts = [r.shape[0] for r in next(iter(fields.values()))]
            tensors[f"{name}.offsets"] = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0)
            for f, parts in fields.items():
                tensors[f"{name}.{f}"] = torch.cat(parts)
        C.write_shard(out_dir, s, storage, tensors)
    bar.close()
    if world > 1:
        dist.barrier()
    if rank == 0:
        missing = [s for s in range(num_shards)
                   if not os.path.exists(os.path.join(out_dir, C.shard_name(s, storage)))]
        if missing:
            raise C.CacheError(f"teacher cache {out_dir!r}: shards {missing[:10]} are missing "
                               "after the run")
        _write_index(out_dir, {**index, "complete": True})
        log.info("teacher cache %s complete: %d shards (%d written now)", out_dir, num_shards,
                 len(todo))
    if world > 1:
        dist.barrier()
    return {"path": out_dir, "estimate": estimate, "written": todo, "rows": n}


def _check_options(k, batch_size, rows_per_shard, logprob_dtype, hidden_dtype, sampled_rounds,
                   proposal_temperature):
    for name, v in (("k", k), ("batch_size", batch_size), ("rows_per_shard", rows_per_shard)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"cache.{name} must be a positive int, got {v!r}")
    if logprob_dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"cache.logprob_dtype must be bfloat16, float16 or float32, got "
                         f"{logprob_dtype!r}")
    if hidden_dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"cache.hidden_dtype must be bfloat16, float16 or float32, got "
                         f"{hidden_dtype!r}")
    if sampled_rounds is not None and (not isinstance(sampled_rounds, int) or sampled_rounds < 1):
        raise ValueError(f"cache.sampled_rounds must be a positive int or null, got "
                         f"{sampled_rounds!r}")
    if not (isinstance(proposal_temperature, (int, float)) and proposal_temperature > 0
            and math.isfinite(proposal_temperature)):
        raise ValueError(f"cache.proposal_temperature must be a finite number > 0, got "
                         f"{proposal_temperature!r}")


def _index(method, n, rows_per_shard, storage, streams, opts, seed, tokenizer,
           vocab) -> Dict[str, Any]:
    teacher = method.teacher
    layers = []
    for i, (s, t) in enumerate(getattr(method, "layer_map", [])):
        proj = method.projections[i]
        layers.append({"student": s, "teacher": t, "seed": proj.seed, "kind": proj.kind,
                       "d_teacher": proj.d_teacher, "d_student": proj.d_student})
    checkpoints = [str(c) if isinstance(c, (str, os.PathLike)) else f"<{type(c).__name__}>"
                   for c in getattr(method, "teacher_checkpoints", [])]
    sampled = opts["sampled_rounds"]
    return {
        "format": C.FORMAT, "version": C.VERSION, "storage": storage, "complete": False,
        "teacher": C.teacher_identity(teacher), "method": method.name,
        "teacher_modules": [name for name, _ in teacher.named_modules() if name],
        "vocab_size": vocab,
        "tokenizer": tokenizer,
        "k": opts["slots"], "temperature": method.temperature,
        "logits": ({"kind": "sampled", "rounds": sampled,
                    "proposal_temperature": opts["proposal_temperature"], "seed": seed}
                   if sampled else {"kind": "top_k"}),
        "logprob_dtype": opts["logprob_dtype"], "hidden_dtype": opts["hidden_dtype"],
        "layers": layers, "checkpoints": checkpoints, "streams": streams,
        "num_rows": n, "rows_per_shard": rows_per_shard,
        "num_shards": max(1, math.ceil(n / rows_per_shard)),
    }


def _estimate(method, dataset, collate, batch_size, plan, streams, opts) -> CacheEstimate:
    n = len(dataset)
    tokens = {name: 0 for name in streams}
    for a in range(0, n, batch_size):
        batch = collate([dataset[i] for i in range(a, min(a + batch_size, n))])
        for name in streams:
            tokens[name] += method.row_rules[plan[name]["key"]].count(batch)
    size = {}
    for name, spec in streams.items():
        if spec["kind"] == "hidden":
            size[name] = spec["width"] * C.DTYPES[opts["hidden_dtype"]].itemsize
        else:
            size[name] = opts["slots"] * (C.DTYPES[opts["logprob_dtype"]].itemsize + 4
                              + (4 if opts["sampled_rounds"] else 0))
    return CacheEstimate(n, tokens, size)


_VOLATILE = ("complete",)


def _prepare(out_dir: str, index: Dict[str, Any], overwrite: bool) -> None:
    """Create ``out_dir`` or check that the cache there was started with the same options."""
    file = os.path.join(out_dir, C.INDEX)
    if os.path.isfile(file):
        with open(file) as f:
            old = json.load(f)
        same = {k: v for k, v in old.items() if k not in _VOLATILE} == \
            {k: v for k, v in json.loads(json.dumps(index)).items() if k not in _VOLATILE}
        if not same and not overwrite:
            diff = sorted(k for k in set(old) | set(index) if k not in _VOLATILE
                          and old.get(k) != json.loads(json.dumps(index)).get(k))
            raise C.CacheError(f"{out_dir!r} holds a teacher cache made with other settings "
                               f"({', '.join(diff)} differ): use another directory or "
                               "overwrite (--overwrite)")
        if same and not overwrite:
            return  # resume
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite and not os.path.isfile(file):
            raise C.CacheError(f"{out_dir!r} is not empty and holds no teacher cache: use an "
                               "empty directory or overwrite (--overwrite)")
        shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    _write_index(out_dir, index)


def _write_index(out_dir: str, index: Dict[str, Any]) -> None:
    tmp = os.path.join(out_dir, C.INDEX + ".tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, C.INDEX))


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _bar(enabled: bool, total: int):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="cache-teacher", unit="batch", dynamic_ncols=True)
