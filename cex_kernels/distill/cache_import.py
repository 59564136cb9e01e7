"""Import teacher log-probabilities made elsewhere (an inference server) into a teacher cache.

Layout (JSONL, one object per dataset row; or Parquet with the columnar form's columns)::

    {"row": 0, "top_logprobs": [P_0, P_1, ...]}      # one P_t per real token of the row
    {"row": 1, "ids": [[id, ...], ...], "logprobs": [[lp, ...], ...]}   # columnar form

``row`` is the dataset row's index (every row once; order free). Position ``t`` holds the
teacher's distribution over the token that **follows** token ``t`` (what the model's logits
at ``t`` predict; vLLM's ``prompt_logprobs`` shifted by one, and the last position from the
first generated token's ``top_logprobs``), one entry per real token in order. ``P_t`` is a
mapping ``{"<token id>": logprob}`` or ``{"<token id>": {"logprob": lp, ...}}`` (vLLM), or a
list of ``[id, logprob]`` pairs or of ``{"id"|"token_id": id, "logprob": lp}``. Up to ``k``
entries per position are kept (the most probable; fewer are padded).

Temperature, honestly: servers return ``log softmax(z / T_src)`` (T_src = 1 unless sampled
otherwise), restricted to their top ids. The cache records ``temperature = T_src``. The
renormalized top-k loss can train at any temperature T, but only **over the stored
support**: ``softmax(lp · T_src / T)`` over the k ids equals the teacher at T renormalized
over those ids; the mass outside them at T is unknown. The ``tail`` loss needs the
log-probabilities at the training temperature itself, so it needs ``T = T_src`` (and
log-probabilities normalized over the full vocabulary, as servers return them).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from cex_kernels.distill import cache as C
from cex_kernels.distill.cache_write import _prepare, _write_index


def _position(p, where: str) -> List[Tuple[int, float]]:
    if isinstance(p, dict):
        out = []
        for key, v in p.items():
            lp = v.get("logprob") if isinstance(v, dict) else v
            out.append((int(key), float(lp)))
        return out
    if isinstance(p, list):
        out = []
        for e in p:
            if isinstance(e, dict):
                tid = e.get("id", e.get("token_id"))
                if tid is None or "logprob" not in e:
                    raise ValueError(f"{where}: an entry {e!r} needs 'id' (or 'token_id') and "
                                     "'logprob'")
                out.append((int(tid), float(e["logprob"])))
            elif isinstance(e, (list, tuple)) and len(e) == 2:
                out.append((int(e[0]), float(e[1])))
            else:
                raise ValueError(f"{where}: an entry must be [id, logprob] or a mapping, got {e!r}")
        return out
    raise ValueError(f"{where}: a position must be a mapping or a list of entries, got "
                     f"{type(p).__name__}")


def _record_positions(rec: Dict[str, Any], where: str) -> List[List[Tuple[int, float]]]:
    if "top_logprobs" in rec:
        return [_position(p, f"{where} position {t}") for t, p in enumerate(rec["top_logprobs"])]
    if "ids" in rec and "logprobs" in rec:
        ids, lps = rec["ids"], rec["logprobs"]
        if len(ids) != len(lps) or any(len(a) != len(b) for a, b in zip(ids, lps)):
            raise ValueError(f"{where}: 'ids' and 'logprobs' must have the same shape")
        return [[(int(i), float(lp)) for i, lp in zip(a, b)] for a, b in zip(ids, lps)]
    raise ValueError(f"{where}: a record needs 'top_logprobs', or 'ids' and 'logprobs'")


def read_records(path: str) -> Iterable[Dict[str, Any]]:
    """The records of a ``.jsonl`` file or (with pyarrow) a ``.parquet`` file."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow); or "
                             "convert it to JSONL") from exc
        yield from pq.read_table(path).to_pylist()
        return
    with open(path) as f:
        for n, line in enumerate(f):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n + 1}: not JSON: {exc}") from None


def import_logprobs(source: str, out_dir: str, *, num_rows: int, vocab_size: int, k: int = 20,
                    temperature: float = 1.0, teacher: str = "imported",
                    tokenizer: Optional[str] = None, rows_per_shard: int = 256,
                    logprob_dtype: str = "bfloat16", storage: str = "auto",
                    overwrite: bool = False) -> C.TeacherCache:
    """Convert ``source`` (the layout above) into a teacher cache in ``out_dir`` holding the
    ``logits`` stream (one-shot distillation; curriculum extraction also needs hidden
    states, so it needs :func:`~cex_kernels.distill.offline.cache_teacher`). ``num_rows``:
    the training dataset's length; every row must appear once. Returns the opened cache."""
    if not os.path.isfile(source):
        raise FileNotFoundError(f"import_logprobs: {source!r} does not exist")
    for name, v in (("num_rows", num_rows), ("vocab_size", vocab_size), ("k", k),
                    ("rows_per_shard", rows_per_shard)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"import_logprobs: {name} must be a positive int, got {v!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"import_logprobs: temperature must be a finite number > 0, got "
                         f"{temperature!r}")
    if logprob_dtype not in C.DTYPES:
        raise ValueError(f"import_logprobs: logprob_dtype must be one of {sorted(C.DTYPES)}")
    storage = C.resolve_storage(storage)
    rows: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
    for n, rec in enumerate(read_records(source)):
        where = f"{source} record {n}"
        if not isinstance(rec, dict) or not isinstance(rec.get("row"), int):
            raise ValueError(f"{where}: needs an integer 'row' (the dataset row index)")
        i = rec["row"]
        if not 0 <= i < num_rows:
            raise ValueError(f"{where}: row {i} is outside the dataset's {num_rows} rows")
        if i in rows:
            raise ValueError(f"{where}: row {i} appears twice")
        positions = _record_positions(rec, where)
        lp = torch.full((len(positions), k), float("-inf"))
        ids = torch.zeros((len(positions), k), dtype=torch.int32)  # padding: -inf at id 0
        for t, entries in enumerate(positions):
            if not entries:
                raise ValueError(f"{where} position {t}: no entries (each real token needs at "
                                 "least one id with its log-probability)")
            entries = sorted(entries, key=lambda e: -e[1])[:k]
            seen = set()
            for j, (tid, value) in enumerate(entries):
                if not 0 <= tid < vocab_size:
                    raise ValueError(f"{where} position {t}: token id {tid} is outside the "
                                     f"vocabulary [0, {vocab_size})")
                if tid in seen:
                    raise ValueError(f"{where} position {t}: token id {tid} appears twice")
                if not value <= 0 or math.isnan(value):
                    raise ValueError(f"{where} position {t}: log-probability {value} is not <= 0")
                seen.add(tid)
                lp[t, j], ids[t, j] = value, tid
        rows[i] = (lp.to(C.DTYPES[logprob_dtype]), ids)
    missing = [i for i in range(num_rows) if i not in rows]
    if missing:
        raise ValueError(f"import_logprobs: {source} has no record for rows {missing[:10]}"
                         + (" ..." if len(missing) > 10 else "") + f" of {num_rows}")
    index = {
        "format": C.FORMAT, "version": C.VERSION, "storage": storage, "complete": False,
        "teacher": {"class": None, "name_or_path": teacher, "imported_from": os.path.abspath(source)},
        "method": None, "teacher_modules": [], "vocab_size": vocab_size, "tokenizer": tokenizer,
        "k": k, "temperature": float(temperature), "logits": {"kind": "top_k"},
        "logprob_dtype": logprob_dtype, "hidden_dtype": "bfloat16", "layers": [],
        "checkpoints": [], "streams": {"logits": {"kind": "logits", "masked": True,
                                                  "row_shape": []}},
        "num_rows": num_rows, "rows_per_shard": rows_per_shard,
        "num_shards": math.ceil(num_rows / rows_per_shard),
    }
    _prepare(out_dir, index, overwrite)
    for s in range(index["num_shards"]):
        members = list(range(s * rows_per_shard, min((s + 1) * rows_per_shard, num_rows)))
        counts = [rows[i][0].shape[0] for i in members]
        C.write_shard(out_dir, s, storage, {
            "rows": torch.tensor(members, dtype=torch.int64),
            "logits.offsets": torch.tensor([0] + counts, dtype=torch.int64).cumsum(0),
            "logits.logprobs": torch.cat([rows[i][0] for i in members]),
            "logits.indices": torch.cat([rows[i][1] for i in members])})
    _write_index(out_dir, {**index, "complete": True})
    return C.TeacherCache(out_dir)
