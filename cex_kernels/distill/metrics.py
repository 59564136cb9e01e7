"""Where metrics go: JSONL (every record), CSV (the fixed training columns), TensorBoard
when installed; and a per-phase progress bar (tqdm when installed, log lines otherwise)."""
from __future__ import annotations

import csv
import json
import logging
import os
from typing import Any, Dict, Optional

log = logging.getLogger("cex_kernels.distill")

CSV_COLUMNS = ("phase_index", "phase", "step", "global_step", "samples", "tokens", "loss",
               "mse", "kd", "ce", "lr", "grad_norm", "tokens_per_s", "flops", "elapsed_s")
METRICS_FILES = ("metrics.jsonl", "metrics.csv")


def truncate_metrics(out_dir: str, global_step: int) -> None:
    """Drop the records after ``global_step`` (written after the checkpoint a run resumes
    from), so a resumed run's logs hold each step once."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            keep = [line for line in f
                    if line.strip() and json.loads(line).get("global_step", 0) <= global_step]
        with open(path, "w") as f:
            f.writelines(keep)
    path = os.path.join(out_dir, "metrics.csv")
    if os.path.exists(path):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(r for r in rows if int(r["global_step"]) <= global_step)


class MetricsLogger:
    """Appends records to ``out_dir/metrics.jsonl`` and ``metrics.csv`` (and TensorBoard
    scalars under ``out_dir/tb`` when ``tensorboard`` is installed). Only rank 0 writes;
    without ``out_dir`` records are kept in memory only (``self.records``). The trainer
    truncates the files to the resumed checkpoint's step first (:func:`truncate_metrics`)."""

    def __init__(self, out_dir: Optional[str], *, enabled: bool = True, tensorboard: bool = True):
        self.records = []
        self.enabled = enabled and out_dir is not None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self._jsonl = open(os.path.join(out_dir, "metrics.jsonl"), "a")
        csv_path = os.path.join(out_dir, "metrics.csv")
        new = not os.path.exists(csv_path) or os.path.getsize(csv_path) == 0
        self._csv_file = open(csv_path, "a", newline="")
        self._csv = csv.DictWriter(self._csv_file, CSV_COLUMNS, extrasaction="ignore")
        if new:
            self._csv.writeheader()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(os.path.join(out_dir, "tb"))
            except ImportError:  # tensorboard is optional
                self._tb = None

    def log(self, record: Dict[str, Any]) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if "step" in record:  # training rows; eval records go to JSONL/TensorBoard only
            self._csv.writerow(record)
            self._csv_file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "global_step":
                    self._tb.add_scalar(f"{record.get('phase', '')}/{k}", v,
                                        record.get("global_step", 0))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._csv_file.close()
            if self._tb is not None:
                self._tb.close()


class PhaseProgress:
    """``tqdm`` bar for one phase when tqdm is installed and ``bar`` is set; else an INFO
    log line every ``log_every`` steps."""

    def __init__(self, name: str, total: int, initial: int = 0, *, bar: bool = True,
                 log_every: int = 10):
        self.name, self.total, self.log_every, self._bar = name, total, log_every, None
        if bar:
            try:
                from tqdm.auto import tqdm
                self._bar = tqdm(total=total, initial=initial, desc=name, leave=False,
                                 dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, step: int, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        elif self.log_every and (step % self.log_every == 0 or step == self.total):
            log.info("%s: step %d/%d loss %.6g", self.name, step, self.total, loss)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
