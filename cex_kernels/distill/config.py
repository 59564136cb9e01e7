"""``cex distill --config run.yaml|run.json``: a run described as data, over the same API.

Every key of every section is checked (an unknown one is an error with a did-you-mean),
every value is type-checked and coerced (YAML reads ``1e-3`` as a string), and the whole run
is built and validated before the first step. :data:`SCHEMA` is the reference (also printed
by ``cex distill --help``).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import typing
from typing import Any, Callable, Dict, Optional

import torch

from cex_kernels.distill import registry
from cex_kernels.distill._validate import ConfigError, coerce, coerce_like, did_you_mean
from cex_kernels.distill.methods import (CurriculumExtraction, OneShotDistillation,
                                         ProgressiveDistillation)
from cex_kernels.distill.trainer import Trainer, TrainConfig, TrainResult

METHODS = {"curriculum_extraction": CurriculumExtraction, "one_shot": OneShotDistillation,
           "progressive": ProgressiveDistillation}
SECTIONS = ("teacher", "student", "data", "method", "optimizer", "train", "cache")
MODEL_KEYS = {"model": str, "kwargs": dict, "seed": int, "checkpoint": typing.Optional[str]}
TEACHER_KEYS = {**MODEL_KEYS, "cache": typing.Optional[str]}
# cex cache-teacher: keyword arguments of cex_kernels.distill.offline.cache_teacher
CACHE_KEYS = {"dir": str, "k": int, "batch_size": int, "rows_per_shard": int,
              "logprob_dtype": str, "hidden_dtype": str, "sampled_rounds": typing.Optional[int],
              "proposal_temperature": float, "seed": int, "storage": str,
              "tokenizer": typing.Optional[str]}
DATA_KEYS = {"dataset": str, "kwargs": dict, "eval_dataset": typing.Optional[str],
             "eval_kwargs": dict}
BUDGET_KEYS = ("hidden_budget", "final_budget", "budget", "checkpoint_budget")

SCHEMA = """\
config file schema (YAML or JSON; every key is checked, unknown keys are errors):

  teacher:                       # and student: (same keys)
    model: NAME                  # required. a registry name (mlp, tiny_gpt2, hf_from_config,
                                 #   hf_pretrained), an import path 'pkg.mod:fn' (dotted attrs
                                 #   allowed: 'transformers:AutoModelForCausalLM.from_pretrained')
                                 #   or a save_pretrained directory
    kwargs: {...}                # keyword arguments of that function, e.g. for hf_from_config:
                                 #   {model_type: gpt2, task: causal_lm, n_layer: 4, n_embd: 128}
                                 #   (config fields are checked); for a directory or
                                 #   hf_pretrained: from_pretrained kwargs
    seed: 0                      # torch seed before building (random init)
    checkpoint: PATH             # optional torch.save'd state dict loaded after building
    cache: DIR                   # teacher only: train from this teacher cache (no teacher
                                 #   model is built; = cex distill --from-cache with cache.dir)
  data:
    dataset: NAME                # required. sparse_parity, random_tokens, token_rows, or 'pkg.mod:fn'
                                 #   returning a map-style dataset (rows: tensors, tuples, or dicts
                                 #   of lists) or an IterableDataset (streaming)
    kwargs: {...}
    eval_dataset: NAME           # optional, same forms; logs eval_loss (+ eval_ce, eval_ppl)
    eval_kwargs: {...}
  method:
    name: curriculum_extraction  # or one_shot, progressive
    # curriculum_extraction: layer_map (required; {student: [...], teacher: [...]} evenly
    #   spaced, or {student_module: teacher_module}; 'name@k' = k-th call of a shared module),
    #   hidden_budget, final_budget, projection_kind (gaussian, rademacher, orthogonal,
    #   identity), projection_seed, freeze_earlier
    # one_shot: budget. progressive: teacher_checkpoints (paths, earliest first) and either
    #   schedule: phases (default; checkpoint_budget, final_budget) or schedule: timeline
    #   (checkpoint_steps: the teacher step of each checkpoint, multiplier: teacher steps per
    #   student step, total_steps: the student's budget; step t uses the first checkpoint at
    #   or after t * multiplier, then the final teacher)
    # all: temperature (> 0), hard_label_weight (0..1), vocab_size, shift_labels, backend,
    #   top_k_loss (from a top-k cache: renormalized or tail; a sampled cache: sampled)
    # budgets: an int (steps), a float in (0, 1] (fraction of train.total_steps/total_samples)
    #   or {steps: N} / {samples: N} / {fraction: F}
  optimizer:
    name: AdamW                  # any torch.optim class; other keys are its keyword arguments
    lr: 1e-3                     #   (checked against its signature)
  train:                         # TrainConfig
    batch_size: 32               # global rows per micro-step (split over DDP ranks)
    grad_accum_steps: 1          # micro-steps per optimizer step
    total_steps / total_samples  # what fractional budgets are fractions of
    lr: 1e-3, weight_decay: 0.0  # for the default AdamW (when no optimizer section)
    max_grad_norm: 1.0           # null: no clipping
    lr_schedule: constant        # per phase: constant, cosine or linear (decay to lr * min_lr_ratio)
    warmup_steps: 0              # per phase linear warmup
    min_lr_ratio: 0.0
    amp: false                   # bf16 autocast
    device: auto                 # auto, cpu, cuda, cuda:1
    fsdp: false                  # under torchrun: FSDP2 (fully_shard) instead of DDP
    fsdp_param_dtype: null       # FSDP2 mixed precision: bfloat16 / float16 compute, fp32 grads
    seed: 0                      # data order (and seed + rank for the torch RNG)
    num_workers: 0               # DataLoader workers for the training data
    pad_token_id: null           # default collator's pad id (null: the student config's, or 0)
    out_dir: null                # metrics.jsonl/csv, tb/, checkpoint-<step>.pt, student/
    overwrite: false             # start over in an out_dir that holds a previous run
    resume: null                 # 'auto' (newest checkpoint in out_dir) or a checkpoint path
    checkpoint_every: 0          # steps (phase ends and stops always checkpoint, except a
                                 #   progressive timeline's teacher switches)
    keep_checkpoints: 2          # newest checkpoints kept
    stop_after_steps: null       # checkpoint and stop after this global step
    save_student: true           # save_pretrained (safetensors) to out_dir/student at the end
    eval_every: 0                # steps (0: at phase ends only); eval_batches: null = all
    log_every: 10, progress_bar: true, tensorboard: true, print_schedule: true
  cache:                         # cex cache-teacher (offline distillation), then
    dir: PATH                    #   cex distill --from-cache trains from it, no teacher in memory
    k: 32                        # top-k ids per token (log-probs at method.temperature)
    sampled_rounds: null         # N: Random-Sampling KD instead (N draws per token, unbiased)
    proposal_temperature: 1.0    #   sampling from q ~ p^(1/t)
    batch_size: 8                # teacher batch size; rows_per_shard: 256 (the resume unit)
    logprob_dtype: bfloat16      # or float16, float32; hidden_dtype: bfloat16 (projected states)
    storage: auto                # safetensors if installed, else numpy (memory-mapped .npy)
    seed: 0, tokenizer: null     # sampling seed; tokenizer name recorded in the index
"""


def load_config(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError as exc:
                raise ConfigError(f"{path}: YAML configs need PyYAML (pip install pyyaml); "
                                  "or write the same config as JSON") from exc
            cfg = yaml.safe_load(text)
        else:
            cfg = json.loads(text)
    except ConfigError:
        raise
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError
        raise ConfigError(f"{path}: cannot parse: {exc}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: the config must be a mapping with sections {SECTIONS}")
    for key in cfg:
        if key not in SECTIONS:
            raise _err("", did_you_mean("section", key, SECTIONS))
    for key in ("teacher", "student", "data", "method"):
        if key not in cfg:
            raise ConfigError(f"{path}: missing section {key!r}")
        if not isinstance(cfg[key], dict):
            raise ConfigError(f"{path}: section {key!r} must be a mapping, got {cfg[key]!r}")
    return cfg


def _err(where: str, exc: Exception) -> ConfigError:
    return ConfigError(f"config: {where + ': ' if where else ''}{exc}")


def _check_keys(section: str, spec: Dict[str, Any], schema: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for key, value in spec.items():
        if key not in schema:
            raise _err("", did_you_mean(f"key in {section}:", key, schema))
        out[key] = coerce(value, schema[key], f"{section}.{key}")
    return out


def _call(where: str, fn, kwargs: Dict[str, Any]):
    """``fn(**kwargs)``; a wrong argument or value becomes a ConfigError naming ``where``."""
    try:
        return fn(**kwargs)
    except (TypeError, ValueError, FileNotFoundError, ImportError, OSError) as exc:
        raise _err(where, exc) from None


def _model(section: str, spec: Dict[str, Any]):
    spec = _check_keys(section, spec, MODEL_KEYS)
    if "model" not in spec:
        raise ConfigError(f"config: {section}.model is required (a registry name, an import "
                          "path 'pkg.mod:fn' or a save_pretrained directory)")
    torch.manual_seed(spec.get("seed", 0))
    fn = _call(f"{section}.model", registry.lookup, {"name": spec["model"],
                                                     "table": registry.MODELS, "what": "model"})
    model = _call(f"{section} ({spec['model']})", fn, spec.get("kwargs", {}))
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"config: {section}.model {spec['model']!r} returned "
                          f"{type(model).__name__}, not an nn.Module")
    if spec.get("checkpoint"):
        path = spec["checkpoint"]
        if not os.path.isfile(path):
            raise ConfigError(f"config: {section}.checkpoint {path!r} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        _call(f"{section}.checkpoint {path!r}", model.load_state_dict, {"state_dict": state})
    return model


def _teacher(spec: Dict[str, Any], from_cache: Optional[str] = None):
    """The teacher model, or a TeacherCache (``teacher.cache`` or ``from_cache``)."""
    spec = _check_keys("teacher", spec, TEACHER_KEYS)
    path = from_cache or spec.pop("cache", None)
    if path is None:
        return _model("teacher", spec)
    from cex_kernels.distill.cache import TeacherCache
    return _call(f"teacher cache {path!r}", TeacherCache, {"path": path})


def cache_options(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The ``cache`` section, checked (``dir`` required)."""
    spec = _check_keys("cache", dict(cfg.get("cache") or {}), CACHE_KEYS)
    if "dir" not in spec:
        raise ConfigError("config: cache.dir is required (where the teacher cache is written)")
    return spec


def _dataset(name: str, kwargs: Dict[str, Any], where: str):
    fn = _call(where, registry.lookup, {"name": name, "table": registry.DATASETS,
                                        "what": "dataset"})
    return _call(f"{where} ({name})", fn, kwargs)


def _budget(value, where):
    if isinstance(value, str):
        return coerce(value, typing.Union[int, float], where)
    if isinstance(value, list):
        return [_budget(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _method(spec: Dict[str, Any], teacher, student):
    kwargs = dict(spec)
    name = kwargs.pop("name", "curriculum_extraction")
    if name not in METHODS:
        raise _err("method.name", did_you_mean("method", name, METHODS))
    cls = METHODS[name]
    params = {}
    for c in (cls, *[b for b in cls.__mro__[1:] if "__init__" in vars(b)]):
        sig = inspect.signature(c.__init__)
        hints = typing.get_type_hints(c.__init__)
        for p in list(sig.parameters.values())[3:]:  # self, teacher, student
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "forward_fn":
                params.setdefault(p.name, (p, hints.get(p.name, typing.Any)))
    for key, value in kwargs.items():
        if key not in params:
            raise _err("", did_you_mean(f"{name} option", key, params))
        p, hint = params[key]
        where = f"method.{key}"
        kwargs[key] = _budget(value, where) if key in BUDGET_KEYS else coerce(value, hint, where)
    missing = [n for n, (p, _) in params.items() if p.default is p.empty and n not in kwargs]
    if missing:
        raise ConfigError(f"config: method {name!r} needs {missing}")
    return _call(f"method ({name})", cls, {"teacher": teacher, "student": student, **kwargs})


def _optimizer(spec: Dict[str, Any], train: TrainConfig):
    opt = dict(spec)
    name = opt.pop("name", "AdamW")
    classes = [n for n in dir(torch.optim) if n[0].isupper() and n != "Optimizer"
               and isinstance(getattr(torch.optim, n), type)]
    if name not in classes:
        raise _err("optimizer.name", did_you_mean("optimizer", name, classes))
    cls = getattr(torch.optim, name)
    params = dict(list(inspect.signature(cls.__init__).parameters.items())[2:])
    for key, value in opt.items():
        if key not in params:
            raise _err("", did_you_mean(f"{name} option", key, params))
        default = params[key].default
        opt[key] = tuple(value) if isinstance(default, tuple) and isinstance(value, list) \
            else coerce_like(value, default, f"optimizer.{key}")
    opt.setdefault("lr", train.lr)
    if "weight_decay" in params:
        opt.setdefault("weight_decay", train.weight_decay)
    _call(f"optimizer ({name})", cls, {"params": [torch.zeros(1, requires_grad=True)], **opt})
    return lambda parameters: cls(parameters, **opt)


def _parts(cfg: Dict[str, Any], train: TrainConfig, from_cache: Optional[str] = None):
    """(method, dataset, eval dataset, optimizer factory), built and checked."""
    teacher = _teacher(cfg["teacher"], from_cache)
    student = _model("student", cfg["student"])
    data = _check_keys("data", cfg["data"], DATA_KEYS)
    if "dataset" not in data:
        raise ConfigError("config: data.dataset is required")
    dataset = _dataset(data["dataset"], data.get("kwargs", {}), "data.dataset")
    eval_dataset = None
    if data.get("eval_dataset"):
        eval_dataset = _dataset(data["eval_dataset"], data.get("eval_kwargs", {}),
                                "data.eval_dataset")
    elif data.get("eval_kwargs"):
        raise ConfigError("config: data.eval_kwargs given without data.eval_dataset")
    method = _method(cfg["method"], teacher, student)
    factory = _optimizer(cfg.get("optimizer") or {}, train)
    return method, dataset, eval_dataset, factory


def build_cache_run(cfg: Dict[str, Any], *, overwrite: bool = False, dry_run: bool = False,
                    progress_bar: bool = True) -> Callable[[], Dict[str, Any]]:
    """``cex cache-teacher``: the config's teacher, student, data and method built and
    checked, and the cache options; returns a function that writes the cache."""
    from cex_kernels.distill.cache_write import cache_teacher
    options = cache_options(cfg)
    train = _call("train", TrainConfig, {k: v for k, v in (cfg.get("train") or {}).items()
                                         if k in ("device", "pad_token_id")})
    if (cfg["teacher"] or {}).get("cache"):
        raise ConfigError("config: teacher.cache is set; cex cache-teacher needs the teacher "
                          "model (teacher.model) to run")
    method, dataset, _, _ = _parts(cfg, train)
    out_dir = options.pop("dir")
    from cex_kernels.distill.trainer import default_collator
    collate = default_collator(method, train.pad_token_id)

    def run():
        return _call("cache", cache_teacher, {
            "method": method, "dataset": dataset, "out_dir": out_dir, "collate_fn": collate,
            "device": train.device, "overwrite": overwrite, "dry_run": dry_run,
            "progress_bar": progress_bar, **options})
    return run


def build_run(cfg: Dict[str, Any], *, resume: bool = False, overwrite: bool = False,
              from_cache: bool = False) -> Trainer:
    """The :class:`Trainer` a config describes, every part built and checked;
    ``from_cache``: train from the teacher cache in ``cache.dir`` (no teacher model)."""
    train_spec = dict(cfg.get("train") or {})
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in train_spec:
        if key not in fields:
            raise _err("", did_you_mean("train option", key, fields))
    if resume:
        train_spec["resume"] = "auto"
    if overwrite:
        train_spec["overwrite"] = True
    train = _call("train", TrainConfig, train_spec)
    method, dataset, eval_dataset, factory = _parts(
        cfg, train, cache_options(cfg)["dir"] if from_cache else None)
    if method.offline and eval_dataset is not None:
        raise ConfigError("config: data.eval_dataset cannot be used when training from a "
                          "teacher cache (it holds the training rows only)")
    return _call("trainer", Trainer, {"method": method, "dataset": dataset, "config": train,
                                      "eval_dataset": eval_dataset,
                                      "optimizer_factory": factory})


def run_config(path: str, **kwargs) -> TrainResult:
    return build_run(load_config(path), **kwargs).fit()
