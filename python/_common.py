"""Shared helpers of the recipes: device choice, tables, JSON and plots.

Every recipe prints a table (:func:`format_table`), writes a JSON file with every figure
(:func:`write_json`) and a PNG with one panel per x-axis (steps, samples, FLOPs) and one
line per method (:func:`plot_curves`).
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from typing import Dict, List, Optional, Sequence

import torch


def add_run_arguments(parser, name: str) -> None:
    """The flags every recipe shares: seed, device, threads, output paths, verbosity."""
    parser.add_argument("--seed", type=int, default=0, help="random seed (data, models)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (1 is fastest for these small models)")
    parser.add_argument("--json", default=f"{name}.json", metavar="PATH",
                        help="where to write every figure as JSON")
    parser.add_argument("--plot", default=f"{name}.png", metavar="PATH",
                        help="where to write the curves (PNG)")
    parser.add_argument("--quiet", action="store_true", help="print only the final table")


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch sees no CUDA device")
    return device


def environment(device: str) -> Dict:
    """Where and when a result was measured."""
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else \
        (platform.processor() or platform.machine())
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": device, "device_name": name,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3g}" if abs(value) >= 1e4 or (value and abs(value) < 1e-3) else \
            f"{value:.3f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))
    return "-" if value is None else str(value)


def format_table(rows: Sequence[Dict], columns: Optional[Sequence[str]] = None) -> str:
    """A Markdown table (also readable as plain text)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(r) for r in cells)])


def write_json(path: Optional[str], data: Dict) -> Optional[str]:
    if not path:
        return None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)
    return path


def finish_run(result: Dict, json_path: Optional[str], plot_path: Optional[str]) -> Dict:
    """A recipe's last step: record where the plot went, write the JSON, say where both are."""
    result["plot"] = plot_path
    result["json"] = json_path
    write_json(json_path, result)
    print(f"total {result['seconds']:.1f}s; json: {json_path}; plot: {plot_path}")
    return result


def plot_curves(path: Optional[str], curves: Dict[str, List[Dict]], *, metric: str,
                ylabel: str, title: str, xs: Sequence[str] = ("step", "samples", "flops"),
                hline: Optional[float] = None, logy: bool = False,
                ylim: Optional[tuple] = None) -> Optional[str]:
    """One panel per x-axis in ``xs``, one line per method; ``curves[method]`` is a list of
    dicts holding the x keys and ``metric``. Returns the path, or None without matplotlib."""
    if not path:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib does not import here: no plot written to {path}")
        return None
    labels = {"step": "optimizer steps", "samples": "training samples",
              "flops": "training FLOPs (matmuls)"}
    fig, axes = plt.subplots(1, len(xs), figsize=(5 * len(xs), 4), squeeze=False)
    for ax, x in zip(axes[0], xs):
        for name, points in curves.items():
            pts = [p for p in points if p.get(metric) is not None and p.get(x) is not None]
            if pts:
                ax.plot([p[x] for p in pts], [p[metric] for p in pts], label=name, lw=1.6)
        if hline is not None:
            ax.axhline(hline, color="gray", ls=":", lw=1)
        ax.set_xlabel(labels.get(x, x))
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def first_reaching(points: Sequence[Dict], metric: str, target: float, key: str,
                   higher_is_better: bool = True):
    """The ``key`` value (step, samples, FLOPs) of the first point whose ``metric`` reaches
    ``target``; None when none does."""
    for p in points:
        v = p.get(metric)
        if v is not None and (v >= target if higher_is_better else v <= target):
            return p[key]
    return None


def step_budget_method(name: str, teacher, student, *, steps: int, student_blocks: List[str],
                       teacher_blocks: List[str], hidden_fraction: float, temperature: float,
                       seed: int):
    """``labels`` (hard labels through ``OneShotDistillation``), ``one_shot`` or
    ``curriculum_extraction`` (student block i <- the teacher block evenly spaced by depth,
    ``hidden_fraction`` of the steps split over the blocks, then softmax-KL) for ``steps``
    optimizer steps in all."""
    from cex_kernels.distill import Budget, CurriculumExtraction, OneShotDistillation
    if name == "labels":
        return OneShotDistillation(teacher, student, budget=steps, hard_label_weight=1.0)
    if name == "one_shot":
        return OneShotDistillation(teacher, student, budget=steps, temperature=temperature)
    if name != "curriculum_extraction":
        raise ValueError(f"unknown method {name!r}")
    per_block = max(1, int(hidden_fraction * steps / len(student_blocks)))
    return CurriculumExtraction(
        teacher, student, {"student": list(student_blocks), "teacher": list(teacher_blocks)},
        hidden_budget=Budget(steps=per_block),
        final_budget=Budget(steps=max(1, steps - per_block * len(student_blocks))),
        temperature=temperature, projection_seed=seed)


# -- a tiny transformer the recipes share (plain nn.Linear everywhere, so the trainer's
#    FLOP counter sees every projection; attention-score matmuls are not counted) -------------

class Block(torch.nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        nn = torch.nn
        self.heads, self.causal = heads, causal
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        b, n, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, w // self.heads).unbind(2)
        att = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=self.causal)
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, w))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(torch.nn.Module):
    """Token + position embeddings, ``blocks.0 .. blocks.{L-1}``, final LayerNorm and head.

    ``pool="mean"``: one prediction per sequence (mean over positions; sparse parity);
    ``pool=None``: one per position (language modelling, use ``causal=True``).
    Curriculum extraction maps ``blocks.i`` of the student to ``blocks.j`` of the teacher.
    """

    def __init__(self, vocab: int, seq_len: int, width: int, depth: int, heads: int, n_out: int,
                 *, causal: bool = False, pool: Optional[str] = "mean"):
        super().__init__()
        nn = torch.nn
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(seq_len, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, causal) for _ in range(depth))
        self.ln, self.head, self.pool = nn.LayerNorm(width), nn.Linear(width, n_out), pool

    def forward(self, ids):
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        x = self.ln(x)
        if self.pool == "mean":
            x = x.mean(dim=1)
        return self.head(x)


def block_names(model: TinyTransformer) -> List[str]:
    return [f"blocks.{i}" for i in range(len(model.blocks))]


if __name__ == "__main__":  # a helper module, not a recipe: say so instead of doing nothing
    print(__doc__)
    print("Run a recipe instead: python python/sparse_parity.py --help, "
          "python python/transformer_parity.py --help, python python/pcfg_lm.py --help")
