"""The teacher cache: what offline distillation stores per token, on disk, and how it is read.

A cache is a directory::

    cex_cache.json            the index (below)
    shard-00000.safetensors   rows [0, R) of the dataset      (or shard-00000/ of .npy files)
    shard-00001.safetensors   rows [R, 2R) ...

Shard ``s`` holds dataset rows ``[s·R, min((s+1)·R, num_rows))`` in order (``R`` =
``rows_per_shard``), so which rows a shard holds never depends on how many processes wrote
it, and a shard file exists only once complete (written under a temporary name, then
renamed): a resumed run redoes exactly the shards that are missing. Each shard holds
``rows`` (int64, the dataset row indices) and, per *stream*, ``<stream>.offsets`` (int64,
``R + 1``: row ``i``'s tokens are ``[offsets[i], offsets[i+1])``) and its data, one entry
per real token of the row (the tokens a loss reads: ``attention_mask == 1``, or every
position of the row when the batch has no mask for that output):

- ``logits`` (the final teacher) and ``logits@<c>`` (progressive checkpoint ``c``):
  ``.logprobs`` (tokens, k) in ``logprob_dtype`` -- the teacher's log-probabilities
  ``log_softmax(z / temperature)`` at the cached ids, largest first; ``.indices`` (tokens,
  k) int32; for a sampled cache also ``.weights`` (tokens, k) float32, the importance
  weights (:mod:`cex_kernels.distill.top_k`). Padding entries (imported rows with fewer
  than k ids, unsampled slots) have log-prob ``-inf`` and weight 0.
- ``hidden.<i>`` for layer pair ``i``: ``.values`` (tokens, d_student) in ``hidden_dtype``,
  the projected teacher state ``teacher_hidden @ P_i`` with the seeded ``P_i`` of the
  curriculum (``random_projection(d_t, d_s, seed=projection_seed + i, kind)``).

Storage: safetensors when installed (bf16 native; read lazily through ``safe_open``), else
memory-mapped NumPy ``.npy`` files (bf16 kept as its raw uint16 bits). The index JSON
records the teacher's identity (class, name or path, a parameter fingerprint), the
vocabulary size (and tokenizer name when given), k, the temperature, the logits kind, the
layer map with each pair's projection seed, kind and widths, the dtypes, the streams and
the shard count; ``complete`` turns true when every shard is written.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

INDEX = "cex_cache.json"
FORMAT, VERSION = "cex-teacher-cache", 1
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class CacheError(ValueError):
    """A cache is incomplete, malformed, or does not match the run that reads it."""


def safetensors_available() -> bool:
    try:
        import safetensors.torch  # noqa: F401
        return True
    except ImportError:
        return False


def resolve_storage(storage: str) -> str:
    if storage not in ("auto", "safetensors", "numpy"):
        raise ValueError(f"storage must be 'auto', 'safetensors' or 'numpy', got {storage!r}")
    if storage == "auto":
        return "safetensors" if safetensors_available() else "numpy"
    if storage == "safetensors" and not safetensors_available():
        raise ValueError("storage='safetensors' needs the safetensors package "
                         "(pip install safetensors); or use storage='numpy'")
    return storage


def teacher_identity(teacher: nn.Module) -> Dict[str, Any]:
    """Class, name or path, parameter count and a fingerprint of the teacher's parameters
    (names, shapes, dtypes and their first 64 values): enough to tell two teachers apart
    without hashing every weight."""
    h = hashlib.sha256()
    count = 0
    for name, p in teacher.named_parameters():
        count += p.numel()
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(p.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    cfg = getattr(teacher, "config", None)
    return {"class": type(teacher).__name__, "num_parameters": count,
            "name_or_path": getattr(cfg, "_name_or_path", None) or None,
            "fingerprint": h.hexdigest()[:16]}


def shard_name(s: int, storage: str) -> str:
    return f"shard-{s:05d}" + (".safetensors" if storage == "safetensors" else "")


def _to_numpy(t: Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # NumPy has no bf16: keep the bits
        return t.view(torch.int16).numpy()
    return t.numpy()


def write_shard(directory: str, s: int, storage: str, tensors: Dict[str, Tensor]) -> str:
    """Write one shard atomically (temporary name, then rename); returns its path."""
    path = os.path.join(directory, shard_name(s, storage))
    tmp = path + ".tmp"
    if storage == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
        return path
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, t in tensors.items():
        np.save(os.path.join(tmp, name + ".npy"), _to_numpy(t))
    os.replace(tmp, path)
    return path


class _Shard:
    """Lazy, row-sliced reads of one shard file."""

    def __init__(self, path: str, storage: str, dtypes: Dict[str, torch.dtype]):
        self.path, self.storage, self.dtypes = path, storage, dtypes
        self._handle = None

    def __getstate__(self):  # DataLoader workers reopen the file themselves
        return {**self.__dict__, "_handle": None}

    def _open(self):
        if self._handle is None:
            if self.storage == "safetensors":
                from safetensors import safe_open
                self._handle = safe_open(self.path, framework="pt")
            else:
                self._handle = {}
        return self._handle

    def read(self, name: str, start: Optional[int] = None, stop: Optional[int] = None) -> Tensor:
        handle = self._open()
        if self.storage == "safetensors":
            t = handle.get_slice(name)
            return t[start:stop] if start is not None else t[:]
        if name not in handle:
            handle[name] = np.load(os.path.join(self.path, name + ".npy"), mmap_mode="r")
        arr = handle[name]
        arr = np.array(arr[start:stop] if start is not None else arr)
        t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if self.dtypes.get(name) == torch.bfloat16 else t


def stream_dtypes(index: Dict[str, Any]) -> Dict[str, torch.dtype]:
    """The stored dtype of every data tensor (NumPy storage needs it for bf16)."""
    out = {}
    for name, spec in index["streams"].items():
        if spec["kind"] == "hidden":
            out[f"{name}.values"] = DTYPES[index["hidden_dtype"]]
        else:
            out[f"{name}.logprobs"] = DTYPES[index["logprob_dtype"]]
    return out


class TeacherCache:
    """A complete teacher cache, opened for reading (``TeacherCache("runs/cache")``).

    Pass it as the ``teacher`` of any method (or the directory path) to train with no
    teacher model in memory. ``rows(indices)`` returns, per dataset row, a dict
    ``{stream: tensors}`` of that row's real tokens. ``named_modules()`` lists the teacher's
    module names as recorded at caching time (so layer maps are checked as for a model)."""

    def __init__(self, path: str):
        file = os.path.join(os.fspath(path), INDEX)
        if not os.path.isfile(file):
            raise CacheError(f"{path!r} is not a teacher cache (no {INDEX}); write one with "
                             "`cex cache-teacher --config ...`")
        with open(file) as f:
            self.index = json.load(f)
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise CacheError(f"{file}: not a {FORMAT} version {VERSION} index")
        if not self.index.get("complete"):
            raise CacheError(f"teacher cache {path!r} is incomplete (a run was interrupted): "
                             "run `cex cache-teacher` again with the same config to finish it")
        self.path = os.fspath(path)
        storage, dtypes = self.index["storage"], stream_dtypes(self.index)
        self._shards = [_Shard(os.path.join(self.path, shard_name(s, storage)), storage, dtypes)
                        for s in range(self.index["num_shards"])]
        self._offsets: Dict[int, Dict[str, np.ndarray]] = {}

    # -- metadata -------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return self.index["num_rows"]

    @property
    def vocab_size(self) -> int:
        return self.index["vocab_size"]

    @property
    def temperature(self) -> float:
        return self.index["temperature"]

    @property
    def logits_kind(self) -> str:
        return self.index["logits"]["kind"]

    @property
    def layers(self) -> List[Dict[str, Any]]:
        return self.index["layers"]

    @property
    def streams(self) -> Dict[str, Dict[str, Any]]:
        return self.index["streams"]

    def named_modules(self):
        return [(n, None) for n in self.index.get("teacher_modules", [])]

    def __repr__(self):
        i = self.index
        return (f"TeacherCache({self.path!r}: {i['num_rows']} rows, {i['logits']['kind']} "
                f"k={i['k']}, T={i['temperature']}, {len(i['layers'])} layer(s))")

    # -- rows -----------------------------------------------------------------------------
    def _row_offsets(self, s: int) -> Dict[str, np.ndarray]:
        if s not in self._offsets:
            shard = self._shards[s]
            self._offsets[s] = {name: shard.read(f"{name}.offsets").numpy()
                                for name in self.streams}
        return self._offsets[s]

    def row(self, i: int, streams: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Tensor]]:
        """Row ``i``'s stored tensors: ``{stream: {field: (tokens, ...)}}``."""
        if not 0 <= i < self.num_rows:
            raise IndexError(f"row {i} is outside the cache's {self.num_rows} rows")
        per = self.index["rows_per_shard"]
        s, local = divmod(int(i), per)
        offsets, shard = self._row_offsets(s), self._shards[s]
        out = {}
        for name in streams or self.streams:
            a, b = int(offsets[name][local]), int(offsets[name][local + 1])
            fields = ("values",) if self.streams[name]["kind"] == "hidden" else \
                ("logprobs", "indices") + (("weights",) if self.logits_kind == "sampled" else ())
            out[name] = {f: shard.read(f"{name}.{f}", a, b) for f in fields}
        return out

    # -- checks against a run -------------------------------------------------------------
    def check_layers(self, layer_map, projection_seed: int, projection_kind: str) -> None:
        """The method's layer pairs, seeds and projection kind are the cached ones."""
        want = [{"student": s, "teacher": t, "seed": projection_seed + i, "kind": projection_kind}
                for i, (s, t) in enumerate(layer_map)]
        have = [{k: layer[k] for k in ("student", "teacher", "seed", "kind")}
                for layer in self.layers]
        if want != have:
            raise CacheError(f"teacher cache {self.path!r} was written for the layer map / "
                             f"projections {have}, this run uses {want}: rerun "
                             "`cex cache-teacher` with this method's layer_map, "
                             "projection_seed and projection_kind")

    def check_width(self, i: int, d_student: int) -> None:
        d = self.layers[i]["d_student"]
        if d != d_student:
            raise CacheError(f"teacher cache {self.path!r}: layer pair {i} holds projected "
                             f"states of width {d}, the student's layer has width {d_student}")

    def check_vocab(self, student_vocab: int, vocab_size: Optional[int]) -> None:
        want = vocab_size if vocab_size is not None else student_vocab
        if self.vocab_size != want:
            raise CacheError(f"teacher cache {self.path!r} holds a vocabulary of "
                             f"{self.vocab_size}, the student compares {want} logits"
                             + ("" if vocab_size is not None else
                                f" (its vocabulary; pass vocab_size={self.vocab_size} when "
                                "the student's output is padded larger)"))

    def check_stream(self, name: str, what: str) -> None:
        if name not in self.streams:
            raise CacheError(f"teacher cache {self.path!r} has no {what} (stream {name!r}; it "
                             f"holds {sorted(self.streams)})")
