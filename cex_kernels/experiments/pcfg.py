"""Masked language modelling on a cfg3-like context-free grammar (Panigrahi et al., 2024).

The pieces of ``python/pcfg_mlm.py`` that are worth testing on their own:

- :class:`CFG3`: a random grammar in the style of Allen-Zhu & Li's cfg3 family, fixed by a
  seed: ``level_sizes[l]`` nonterminals at level ``l`` (level 0 is the root), each with a few
  rules whose right-hand sides are 2-3 symbols of the next level; the last level rewrites to
  the terminals ``1 .. n_terminals``. Every leaf sits at the same depth, so a sentence is
  ``2^D .. 3^D`` tokens long and its structure is a hierarchy ``D`` levels deep.
- :func:`mask_tokens`: BERT's corruption: each terminal is chosen with probability
  ``mask_rate`` (0.3 in the paper); a chosen token becomes ``[MASK]`` with probability 0.8,
  a uniformly random terminal with 0.1, and stays with 0.1. Labels are -100 off the chosen
  positions, so losses read the chosen positions only.
- :class:`NGramMLM`: a Witten-Bell smoothed n-gram model predicting a chosen token from the
  corrupted tokens around it (both sides): the local-statistics baseline a teacher must beat
  before its knowledge is worth distilling.
- :func:`cache_key`: the content address of a trained teacher.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

BOS = 0  # sentence separator (every sentence starts with it)
IGNORE = -100


class CFG3:
    """A random context-free grammar with a fixed-depth hierarchy, drawn from ``seed``.

    Symbols of level ``l`` rewrite to ``rhs_lengths``-long strings of level ``l + 1``
    symbols (terminals after the last level); each symbol gets ``rules_per_symbol`` distinct
    rules, chosen uniformly when generating. Token ids: ``0`` = BOS, terminals
    ``1 .. n_terminals``; ``mask_id = n_terminals + 1``; ``vocab = n_terminals + 2``.
    """

    def __init__(self, level_sizes: Sequence[int] = (1, 3, 3, 3), n_terminals: int = 3, *,
                 rules_per_symbol: Tuple[int, int] = (2, 3), rhs_lengths: Tuple[int, int] = (2, 3),
                 seed: int = 0):
        sizes = list(level_sizes)
        if not sizes or any(not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"level_sizes must be positive ints, got {level_sizes!r}")
        if sizes[0] != 1:
            raise ValueError(f"level_sizes[0] is the root level and must be 1, got {sizes[0]}")
        if not isinstance(n_terminals, int) or n_terminals < 2:
            raise ValueError(f"n_terminals must be an int >= 2, got {n_terminals!r}")
        for name, (lo, hi) in (("rules_per_symbol", rules_per_symbol), ("rhs_lengths", rhs_lengths)):
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be (lo, hi) with 1 <= lo <= hi, got {(lo, hi)!r}")
        self.level_sizes, self.n_terminals = sizes, n_terminals
        self.config = {"level_sizes": sizes, "n_terminals": n_terminals,
                       "rules_per_symbol": list(rules_per_symbol), "rhs_lengths": list(rhs_lengths),
                       "seed": seed}
        rng = np.random.default_rng(seed)
        self.rules: List[List[List[Tuple[int, ...]]]] = []  # [level][symbol] -> right-hand sides
        for level, n in enumerate(sizes):
            n_next = sizes[level + 1] if level + 1 < len(sizes) else n_terminals
            level_rules = []
            for _ in range(n):
                n_rules = int(rng.integers(rules_per_symbol[0], rules_per_symbol[1] + 1))
                n_rules = min(n_rules, sum(n_next ** k for k in range(rhs_lengths[0], rhs_lengths[1] + 1)))
                seen: set = set()
                while len(seen) < n_rules:  # distinct rules, as in cfg3
                    length = int(rng.integers(rhs_lengths[0], rhs_lengths[1] + 1))
                    seen.add(tuple(int(s) for s in rng.integers(0, n_next, length)))
                level_rules.append(sorted(seen))
            self.rules.append(level_rules)
        # Padded tables for vectorised generation: table[level][symbol, rule, position].
        self._tables, self._n_rules = [], []
        width = rhs_lengths[1]
        for level_rules in self.rules:
            most = max(len(r) for r in level_rules)
            table = np.full((len(level_rules), most, width), -1, dtype=np.int64)
            for a, rhs_list in enumerate(level_rules):
                for k, rhs in enumerate(rhs_list):
                    table[a, k, :len(rhs)] = rhs
            self._tables.append(table)
            self._n_rules.append(np.array([len(r) for r in level_rules]))

    @property
    def depth(self) -> int:
        return len(self.level_sizes)

    @property
    def mask_id(self) -> int:
        return self.n_terminals + 1

    @property
    def vocab(self) -> int:
        return self.n_terminals + 2

    def sentences(self, n: int, seed: int) -> List[np.ndarray]:
        """``n`` sentences (terminal ids ``1 .. n_terminals``), expanded level by level."""
        rng = np.random.default_rng(seed)
        symbols = np.zeros(n, dtype=np.int64)
        owner = np.arange(n)
        for table, n_rules in zip(self._tables, self._n_rules):
            choice = (rng.random(len(symbols)) * n_rules[symbols]).astype(np.int64)
            rhs = table[symbols, choice]  # (len, width), -1 padded
            keep = rhs >= 0
            symbols = rhs[keep]
            owner = np.broadcast_to(owner[:, None], rhs.shape)[keep]
        cuts = np.flatnonzero(np.diff(owner)) + 1
        return np.split(symbols + 1, cuts)

    def stream(self, n_tokens: int, seed: int) -> torch.Tensor:
        """``n_tokens`` ids: ``BOS sentence BOS sentence ...``."""
        out, total, k = [], 0, 0
        mean = 2.5 ** self.depth + 1
        while total < n_tokens:
            batch = self.sentences(int((n_tokens - total) / mean) + 16, seed=seed * 1_000_003 + k)
            for s in batch:
                out.append(np.concatenate([[BOS], s]))
                total += len(s) + 1
            k += 1
        return torch.from_numpy(np.concatenate(out)[:n_tokens].astype(np.int64))

    def derives(self, tokens: Sequence[int]) -> bool:
        """Whether the root derives ``tokens`` (terminal ids): a memoised top-down parse."""
        toks = tuple(int(t) - 1 for t in tokens)
        memo: Dict[Tuple[int, int, int, int], bool] = {}

        def span(level, a, i, j):  # does symbol a of `level` derive toks[i:j]?
            key = (level, a, i, j)
            if key not in memo:
                memo[key] = any(seq(level + 1, rhs, i, j) for rhs in self.rules[level][a])
            return memo[key]

        def seq(level, rhs, i, j):  # does the symbol string rhs (of `level`) derive toks[i:j]?
            if not rhs:
                return i == j
            if level == self.depth:  # terminals
                return j - i == len(rhs) and all(toks[i + k] == t for k, t in enumerate(rhs))
            lo, hi = 2 ** (self.depth - level), 3 ** (self.depth - level)
            return any(span(level, rhs[0], i, m) and seq(level, rhs[1:], m, j)
                       for m in range(i + lo, min(j, i + hi) + 1))

        return span(0, 0, 0, len(toks))


def mask_tokens(ids: torch.Tensor, *, n_terminals: int, mask_id: int, mask_rate: float = 0.3,
                generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """BERT's 80/10/10 corruption of the terminals of ``ids`` (BOS is never chosen).

    Returns ``input_ids`` (corrupted), ``labels`` (the original token on chosen positions,
    -100 elsewhere) and ``attention_mask`` (1 on chosen positions: the rows every
    distillation loss reads; the encoder attends to all positions regardless)."""
    if not 0.0 < mask_rate <= 1.0:
        raise ValueError(f"mask_rate must be in (0, 1], got {mask_rate!r}")
    u = torch.rand(ids.shape, generator=generator)
    how = torch.rand(ids.shape, generator=generator)
    chosen = (u < mask_rate) & (ids != BOS)
    random_tok = torch.randint(1, n_terminals + 1, ids.shape, generator=generator)
    inputs = torch.where(chosen & (how < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_tok, inputs)
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    return {"input_ids": inputs, "labels": labels, "attention_mask": chosen.long()}


def masked_loss_acc(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, float]:
    """Mean cross-entropy (nats) and accuracy over the positions with a label (not -100)."""
    keep = labels != IGNORE
    picked, target = logits[keep], labels[keep]
    loss = F.cross_entropy(picked.float(), target)
    acc = (picked.argmax(-1) == target).float().mean().item() if target.numel() else float("nan")
    return loss, acc


class NGramMLM:
    """Witten-Bell interpolated n-gram model of a chosen token given corrupted neighbours.

    ``offsets``: the context of the most specific order, positions relative to the predicted
    one (``(-1, 0, 1)``: left neighbour, the corrupted token itself, right neighbour -- the
    two-sided trigram). Orders back off by dropping the outermost offsets symmetrically
    (``(-1, 0, 1) -> (0,) -> ()``) and finally to uniform over ``vocab``::

        P_k(y | h) = (c(h, y) + T(h) P_{k+1}(y | h')) / (c(h) + T(h))

    with ``T(h)`` the number of distinct tokens seen after context ``h``. Positions off the
    window's ends read as BOS.
    """

    def __init__(self, offsets: Sequence[int], vocab: int):
        offs = sorted(set(int(o) for o in offsets))
        self.vocab = vocab
        self.orders: List[Tuple[int, ...]] = []
        while True:
            self.orders.append(tuple(offs))
            if not offs:
                break
            lo, hi = offs[0], offs[-1]
            drop = {lo, hi} if -lo == hi else ({lo} if -lo > hi else {hi})
            offs = [o for o in offs if o not in drop]
        self.counts: List[Dict[Tuple[int, ...], np.ndarray]] = [{} for _ in self.orders]

    @staticmethod
    def _contexts(inputs: torch.Tensor, labels: torch.Tensor, offsets):
        keep = labels != IGNORE
        b, n = inputs.shape
        padded = F.pad(inputs, (8, 8), value=BOS)
        cols = [padded[:, 8 + o: 8 + o + n][keep] for o in offsets]
        ctx = torch.stack(cols, 1).tolist() if cols else [[] for _ in range(int(keep.sum()))]
        return [tuple(c) for c in ctx], labels[keep].tolist()

    def fit(self, inputs: torch.Tensor, labels: torch.Tensor) -> "NGramMLM":
        for order, table in zip(self.orders, self.counts):
            ctx, ys = self._contexts(inputs, labels, order)
            for h, y in zip(ctx, ys):
                row = table.get(h)
                if row is None:
                    row = table[h] = np.zeros(self.vocab)
                row[y] += 1
        return self

    def prob(self, contexts: List[Tuple[int, ...]]) -> np.ndarray:
        """``(len(contexts), vocab)`` probabilities; ``contexts[i]`` follows ``orders[0]``."""
        out = np.empty((len(contexts), self.vocab))
        for i, full in enumerate(contexts):
            p = np.full(self.vocab, 1.0 / self.vocab)
            for order, table in zip(reversed(self.orders), reversed(self.counts)):
                h = tuple(full[self.orders[0].index(o)] for o in order)
                row = table.get(h)
                if row is not None:
                    c, t = row.sum(), np.count_nonzero(row)
                    p = (row + t * p) / (c + t)
            out[i] = p
        return out

    def evaluate(self, inputs: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
        """Held-out masked-position loss (nats) and accuracy."""
        ctx, ys = self._contexts(inputs, labels, self.orders[0])
        p = self.prob(ctx)
        y = np.array(ys)
        picked = p[np.arange(len(y)), y]
        return {"loss": float(-np.log(picked).mean()), "acc": float((p.argmax(1) == y).mean())}


def cache_key(config: Dict) -> str:
    """Content address of a trained teacher: SHA-256 of the canonical JSON of ``config``
    (grammar, data, teacher architecture and training settings)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class TeacherNotGoodEnough(RuntimeError):
    """The teacher does not beat the local baselines by the required margin."""


def check_teacher(teacher_loss: float, baselines: Dict[str, float], margin: float) -> None:
    """Raise :class:`TeacherNotGoodEnough` unless ``teacher_loss`` is at least ``margin``
    nats below every baseline loss in ``baselines`` (name -> held-out masked loss)."""
    if not math.isfinite(teacher_loss):
        raise TeacherNotGoodEnough(f"teacher held-out loss is {teacher_loss}")
    short = {k: v for k, v in baselines.items() if not teacher_loss <= v - margin}
    if short:
        detail = ", ".join(f"{k} {v:.4f} (gap {v - teacher_loss:+.4f})" for k, v in short.items())
        raise TeacherNotGoodEnough(
            f"teacher held-out masked loss {teacher_loss:.4f} nats is not {margin} nats below: "
            f"{detail}; no student results are reported (train the teacher longer or make it "
            "bigger)")


def iter_windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``stream`` cut into ``(n, seq_len)`` windows (the tail dropped)."""
    n = len(stream) // seq_len
    return stream[: n * seq_len].view(n, seq_len)
