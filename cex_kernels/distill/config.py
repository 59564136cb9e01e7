"""``cex distill --config run.json|run.yaml``: a run described as data, over the same API.

    {"teacher": {"model": "mlp", "kwargs": {...}, "seed": 0, "checkpoint": "teacher.pt"},
     "student": {"model": "mlp", "kwargs": {...}, "seed": 1},
     "data":    {"dataset": "sparse_parity", "kwargs": {...}},
     "method":  {"name": "curriculum_extraction", "layer_map": {...}, "hidden_budget": 50,
                 "final_budget": 100, "temperature": 2.0, ...},   # the method's kwargs
     "optimizer": {"name": "AdamW", "lr": 1e-3},                   # any torch.optim class
     "train":   {"batch_size": 64, "out_dir": "runs/x", ...}}      # TrainConfig fields

``model``/``dataset`` name a :mod:`registry` entry or an import path ``pkg.mod:fn``. YAML
needs PyYAML; JSON always works.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from typing import Any, Dict

import torch

from cex_kernels.distill import registry
from cex_kernels.distill.methods import (CurriculumExtraction, OneShotDistillation,
                                         ProgressiveDistillation)
from cex_kernels.distill.trainer import Trainer, TrainConfig, TrainResult

METHODS = {"curriculum_extraction": CurriculumExtraction, "one_shot": OneShotDistillation,
           "progressive": ProgressiveDistillation}
SECTIONS = ("teacher", "student", "data", "method", "optimizer", "train")


class ConfigError(ValueError):
    pass


def _unknown(kind: str, name: str, known) -> ConfigError:
    close = difflib.get_close_matches(name, list(known), n=3)
    return ConfigError(f"config: unknown {kind} {name!r}" +
                       (f"; did you mean {close}?" if close else f"; known: {sorted(known)}"))


def load_config(path: str) -> Dict[str, Any]:
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as exc:
            raise ConfigError(f"{path}: YAML configs need PyYAML (pip install pyyaml); "
                              "or write the same config as JSON") from exc
        cfg = yaml.safe_load(text)
    else:
        cfg = json.loads(text)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: the config must be a mapping with sections {SECTIONS}")
    for key in cfg:
        if key not in SECTIONS:
            raise _unknown("section", key, SECTIONS)
    for key in ("teacher", "student", "data", "method"):
        if key not in cfg:
            raise ConfigError(f"{path}: missing section {key!r}")
    return cfg


def _model(spec: Dict[str, Any]):
    torch.manual_seed(int(spec.get("seed", 0)))
    model = registry.lookup(spec["model"], registry.MODELS, "model")(**spec.get("kwargs", {}))
    if spec.get("checkpoint"):
        model.load_state_dict(torch.load(spec["checkpoint"], map_location="cpu", weights_only=True))
    return model


def build_run(cfg: Dict[str, Any]) -> Trainer:
    teacher, student = _model(cfg["teacher"]), _model(cfg["student"])
    data = cfg["data"]
    dataset = registry.lookup(data["dataset"], registry.DATASETS, "dataset")(**data.get("kwargs", {}))
    method_kwargs = dict(cfg["method"])
    name = method_kwargs.pop("name", "curriculum_extraction")
    if name not in METHODS:
        raise _unknown("method", name, METHODS)
    method = METHODS[name](teacher, student, **method_kwargs)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in cfg.get("train", {}):
        if key not in fields:
            raise _unknown("train option", key, fields)
    train = TrainConfig(**cfg.get("train", {}))
    opt = dict(cfg.get("optimizer", {}))
    opt_name = opt.pop("name", "AdamW")
    if not hasattr(torch.optim, opt_name):
        raise _unknown("optimizer", opt_name, [n for n in dir(torch.optim) if n[0].isupper()])
    opt.setdefault("lr", train.lr)
    factory = lambda params: getattr(torch.optim, opt_name)(params, **opt)  # noqa: E731
    return Trainer(method, dataset, train, optimizer_factory=factory)


def run_config(path: str) -> TrainResult:
    return build_run(load_config(path)).fit()
