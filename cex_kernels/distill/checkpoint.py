"""Atomic checkpoints, kept N at a time, and the RNG states a bit-exact resume needs.

Checkpoints are ``out_dir/checkpoint-<global step>.pt`` (8 digits), or under FSDP2 the
directory ``out_dir/checkpoint-<global step>`` (``torch.distributed.checkpoint`` shards plus
``trainer.pt``, see :mod:`cex_kernels.distill.fsdp`); the newest is the one with the
highest step. A save writes a temporary file (directory) and renames it, so a crash
mid-save never leaves a truncated checkpoint under a real name; leftover temporary files are
removed by :func:`clean_temporary`.
"""
from __future__ import annotations

import glob
import os
import random
import re
import shutil
import tempfile
from typing import Any, Dict, List

import torch

_NAME = re.compile(r"checkpoint-(\d+)(\.pt)?$")
TRAINER_STATE = "trainer.pt"  # a sharded checkpoint's rank-0 part


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read (truncated or corrupt)."""


def checkpoint_name(out_dir: str, global_step: int, sharded: bool = False) -> str:
    return os.path.join(out_dir, f"checkpoint-{global_step:08d}" + ("" if sharded else ".pt"))


def list_checkpoints(out_dir: str) -> List[str]:
    """``out_dir``'s checkpoints (files and sharded directories), oldest first."""
    paths = [p for p in glob.glob(os.path.join(glob.escape(out_dir), "checkpoint-*"))
             if _NAME.search(os.path.basename(p))]
    return sorted(paths, key=lambda p: int(_NAME.search(os.path.basename(p)).group(1)))


def remove(path: str) -> None:
    """A checkpoint file or sharded checkpoint directory."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def prune_checkpoints(out_dir: str, keep: int) -> None:
    for path in list_checkpoints(out_dir)[:-keep]:
        remove(path)


def clean_temporary(out_dir: str) -> List[str]:
    """Remove the temporary files an interrupted save left behind; return their paths."""
    leftovers = glob.glob(os.path.join(glob.escape(out_dir), ".tmp-*"))
    for path in leftovers:
        remove(path)
    return leftovers


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file in the same directory, then ``os.replace``: a
    crash mid-write leaves the previous checkpoint intact, never a truncated one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Our own files (RNG tuples and numpy arrays, not only tensors). A file that does not
    load raises :class:`CheckpointError` naming it and the previous checkpoint to use."""
    try:
        sharded = os.path.isdir(path)
        ckpt = torch.load(os.path.join(path, TRAINER_STATE) if sharded else path,
                          map_location="cpu", weights_only=False)
        if not isinstance(ckpt, dict) or "global_step" not in ckpt:
            raise ValueError("not a cex-kernels trainer checkpoint")
        ckpt["sharded"] = path if sharded else None
        return ckpt
    except Exception as exc:  # truncated zip, unpickling errors, wrong content
        found = [os.path.abspath(p) for p in
                 list_checkpoints(os.path.dirname(os.path.abspath(path)))]
        older = found[:found.index(os.path.abspath(path))] if os.path.abspath(path) in found \
            else found
        hint = (f"; resume from the previous one with train.resume={older[-1]!r} "
                f"(TrainConfig(resume=...)), or delete {path!r}") if older else \
            f"; delete {path!r} to start over"
        raise CheckpointError(f"checkpoint {path!r} is corrupt or truncated "
                              f"({type(exc).__name__}: {exc}){hint}") from exc


def save_model(model: "torch.nn.Module", path: str, state_dict: Dict[str, Any] = None) -> str:
    """``model.save_pretrained(path)`` (safetensors) for Hugging Face models, else the state
    dict as ``path/model.safetensors`` (``torch.save``-d ``model.pt`` without safetensors).
    ``state_dict``: the full weights to write instead of the model's own (a sharded model's,
    gathered)."""
    os.makedirs(path, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(path, **({} if state_dict is None else {"state_dict": state_dict}))
        return path
    if state_dict is not None:
        torch.save(state_dict, os.path.join(path, "model.pt"))
        return path
    try:
        from safetensors.torch import save_model as save_safetensors
        save_safetensors(model, os.path.join(path, "model.safetensors"))
    except ImportError:
        torch.save(model.state_dict(), os.path.join(path, "model.pt"))
    return path
