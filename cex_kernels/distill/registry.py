"""Small models and datasets a config file can name (``"model": "mlp"``), next to Python
import paths (``"model": "my_pkg.models:make_student"``, ``"transformers:AutoModelForCausalLM.
from_pretrained"``) and ``save_pretrained`` directories (``"model": "runs/teacher"``).

Hugging Face models: ``hf_from_config`` builds one from a config (``model_type`` + config
fields, checked: a misspelt field is an error), ``hf_pretrained`` loads a directory.
"""
from __future__ import annotations

import difflib
import importlib
import json
import os
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import TensorDataset


class MLPBlock(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear, self.act = nn.Linear(d_in, d_out), nn.ReLU()

    def forward(self, x):
        return self.act(self.linear(x))


class MLP(nn.Module):
    """``blocks.0 .. blocks.{L-1}`` (Linear + ReLU) then ``head``: the paper's MLP teacher and
    student; map ``blocks.i`` to ``blocks.j``."""

    def __init__(self, d_in: int, widths: Sequence[int], n_out: int):
        super().__init__()
        dims = [d_in, *widths]
        self.blocks = nn.ModuleList(MLPBlock(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(dims[-1], n_out)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def tiny_gpt2(vocab_size: int = 64, n_positions: int = 32, n_embd: int = 32, n_layer: int = 2,
              n_head: int = 2) -> nn.Module:
    """A Hugging Face GPT-2 built from a config (no download); blocks are ``transformer.h.i``."""
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd,
                     n_layer=n_layer, n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def sparse_parity(n: int = 4096, d: int = 20, k: int = 3, seed: int = 0) -> TensorDataset:
    """x uniform in {±1}^d, label = 1 when the product of the first k coordinates is -1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 2, (n, d), generator=g).float() * 2 - 1
    y = (x[:, :k].prod(dim=1) < 0).long()
    return TensorDataset(x, y)


def random_tokens(n: int = 256, seq_len: int = 16, vocab_size: int = 64, seed: int = 0):
    """Dict rows ``{"input_ids", "labels"}`` of random tokens, ``labels = input_ids`` (the
    Hugging Face causal-LM convention: the loss shifts them)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (n, seq_len), generator=g)
    return _DictDataset(ids, ids.clone())


def token_rows(n: int = 256, min_len: int = 4, max_len: int = 16, vocab_size: int = 64,
               seed: int = 0):
    """Rows ``{"input_ids": [ints], "text": str}`` of random lengths in [min_len, max_len]: the
    ``datasets`` format (Python lists, a string column the collator drops). Causal LMs get
    ``labels = input_ids`` from the collator. A stand-in for a tokenized text dataset."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"token_rows: need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [{"input_ids": torch.randint(0, vocab_size, (k,), generator=g).tolist(),
             "text": f"row {i}"} for i, k in enumerate(lengths)]


class _DictDataset(torch.utils.data.Dataset):
    def __init__(self, input_ids, labels):
        self.input_ids, self.labels = input_ids, labels

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


HF_TASKS = {"causal_lm": "AutoModelForCausalLM", "masked_lm": "AutoModelForMaskedLM",
            "sequence_classification": "AutoModelForSequenceClassification", "base": "AutoModel"}


def _auto_class(task: str):
    import transformers
    if task not in HF_TASKS:
        raise ValueError(f"task must be one of {sorted(HF_TASKS)}, got {task!r}")
    return getattr(transformers, HF_TASKS[task])


def hf_from_config(model_type: str, task: str = "causal_lm", **config) -> nn.Module:
    """A randomly initialised Hugging Face model: ``AutoConfig.for_model(model_type,
    **config)`` then ``AutoModelFor<task>.from_config``. Config fields are checked against
    the model type's defaults (Hugging Face configs accept any name silently)."""
    from transformers import AutoConfig
    try:
        default = AutoConfig.for_model(model_type)
    except ValueError as exc:
        raise ValueError(f"hf_from_config: {exc}") from None
    known = set(default.to_dict()) | set(vars(default)) | set(getattr(default, "attribute_map", {}))
    for key in config:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            raise ValueError(f"hf_from_config: {model_type} config has no field {key!r}" +
                             (f"; did you mean {close}?" if close else ""))
    return _auto_class(task).from_config(AutoConfig.for_model(model_type, **config))


def hf_pretrained(path: str, task: Optional[str] = None, **kwargs) -> nn.Module:
    """``from_pretrained(path, **kwargs)`` of a ``save_pretrained`` directory: the class named
    in its ``config.json`` (``architectures``), or ``AutoModelFor<task>`` when given."""
    import transformers
    if task is not None:
        return _auto_class(task).from_pretrained(path, **kwargs)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path!r} is not a save_pretrained directory (no config.json)")
    with open(config_file) as f:
        archs = json.load(f).get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise ValueError(f"{config_file}: cannot tell the model class (architectures={archs}); "
                         "give task: causal_lm / masked_lm / ...")
    return cls.from_pretrained(path, **kwargs)


def load_model(spec) -> nn.Module:
    """An ``nn.Module`` as given, or a ``save_pretrained`` directory loaded."""
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, (str, os.PathLike)) and os.path.isdir(spec):
        return hf_pretrained(os.fspath(spec))
    raise TypeError(f"expected an nn.Module or a save_pretrained directory, got {spec!r}")


MODELS: Dict[str, Callable] = {"mlp": MLP, "tiny_gpt2": tiny_gpt2, "hf_from_config": hf_from_config,
                               "hf_pretrained": hf_pretrained}
DATASETS: Dict[str, Callable] = {"sparse_parity": sparse_parity, "random_tokens": random_tokens,
                                 "token_rows": token_rows}


def lookup(name: str, table: Dict[str, Callable], what: str) -> Callable:
    """A registry entry, ``package.module:attr`` (``attr`` may be dotted:
    ``transformers:AutoModelForCausalLM.from_pretrained``) imported, or, for models, a
    ``save_pretrained`` directory (loaded by :func:`hf_pretrained`)."""
    if name in table:
        return table[name]
    if what == "model" and os.path.isdir(name):
        return lambda **kwargs: hf_pretrained(name, **kwargs)
    if ":" in name:
        module, attr = name.split(":", 1)
        try:
            obj = importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(f"{what} {name!r}: cannot import {module!r} ({exc})") from None
        for part in attr.split("."):
            if not hasattr(obj, part):
                close = difflib.get_close_matches(part, [n for n in dir(obj) if not n.startswith("_")], n=3)
                raise ValueError(f"{what} {name!r}: {getattr(obj, '__name__', obj)!s} has no "
                                 f"attribute {part!r}" + (f"; did you mean {close}?" if close else ""))
            obj = getattr(obj, part)
        if not callable(obj):
            raise ValueError(f"{what} {name!r} is not callable")
        return obj
    close = difflib.get_close_matches(name, sorted(table), n=3)
    if os.sep in name or name.startswith("."):
        raise ValueError(f"{what} {name!r}: no such directory")
    raise ValueError(f"unknown {what} {name!r}" + (f"; did you mean {close}?" if close else "") +
                     f": use one of {sorted(table)}, an import path 'package.module:function'" +
                     (" or a save_pretrained directory" if what == "model" else ""))
