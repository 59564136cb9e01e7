"""Small models and datasets a config file can name (``"model": "mlp"``), next to Python
import paths (``"model": "my_pkg.models:make_student"``)."""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Sequence

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
    """Dict batches ``{"input_ids", "labels"}`` of random tokens (labels = next token)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (n, seq_len + 1), generator=g)
    return _DictDataset(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())


class _DictDataset(torch.utils.data.Dataset):
    def __init__(self, input_ids, labels):
        self.input_ids, self.labels = input_ids, labels

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


MODELS: Dict[str, Callable] = {"mlp": MLP, "tiny_gpt2": tiny_gpt2}
DATASETS: Dict[str, Callable] = {"sparse_parity": sparse_parity, "random_tokens": random_tokens}


def lookup(name: str, table: Dict[str, Callable], what: str) -> Callable:
    """A registry entry, or ``module.path:attr`` imported."""
    if name in table:
        return table[name]
    if ":" in name:
        module, attr = name.split(":", 1)
        return getattr(importlib.import_module(module), attr)
    raise ValueError(f"unknown {what} {name!r}: use one of {sorted(table)} or an import path "
                     "'package.module:function'")
