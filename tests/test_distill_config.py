"""Strict configs: every bad-config class gives exit status 2 and a message naming the key,
before the first step; the shipped examples run as they are; --help shows the schema."""
import json
import os
import re
import shutil

import pytest
import torch
from torch import nn

from cex_kernels import cli
from cex_kernels.distill.registry import MLP


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared machine

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


class UnusedBlockMLP(MLP):
    """An MLP with a block that forward never calls."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.unused = nn.Linear(2, 2)


def base_config(out_dir):
    return {
        "teacher": {"model": "mlp", "kwargs": {"d_in": 8, "widths": [32, 32], "n_out": 2}},
        "student": {"model": "mlp", "kwargs": {"d_in": 8, "widths": [6, 6], "n_out": 2}, "seed": 1},
        "data": {"dataset": "sparse_parity", "kwargs": {"n": 64, "d": 8, "k": 2}},
        "method": {"name": "curriculum_extraction",
                   "layer_map": {"blocks.0": "blocks.0", "blocks.1": "blocks.1"},
                   "hidden_budget": 1, "final_budget": 1},
        "train": {"batch_size": 16, "out_dir": str(out_dir), "progress_bar": False,
                  "tensorboard": False, "print_schedule": False},
    }


def run(tmp_path, cfg, name="run.yaml", text=None):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    elif name.endswith(".json"):
        path.write_text(json.dumps(cfg))
    else:
        yaml = pytest.importorskip("yaml")
        path.write_text(yaml.safe_dump(cfg))
    return cli.main(["distill", "--config", str(path)])


def _set(section, **kv):
    return lambda c: c.setdefault(section, {}).update(kv)


BAD = [  # (edit, message): one per class of mistake
    (_set("teacher", chekpoint="t.pt"), r"unknown key in teacher: 'chekpoint'; did you mean \['checkpoint'\]"),
    (lambda c: c["student"].update(kwarg=c["student"].pop("kwargs")),
     r"unknown key in student: 'kwarg'; did you mean \['kwargs'\]"),
    (_set("data", datset="x"), r"unknown key in data: 'datset'"),
    (_set("method", temprature=2.0), r"unknown curriculum_extraction option 'temprature'; did you mean \['temperature'\]"),
    (_set("optimizer", name="AdamW", lrr=0.1), r"unknown AdamW option 'lrr'; did you mean \['lr'\]"),
    (_set("optimizer", name="Adamw"), r"unknown optimizer 'Adamw'; did you mean \['AdamW'"),
    (_set("train", bach_size=3), r"unknown train option 'bach_size'; did you mean \['batch_size'\]"),
    (lambda c: c.update(trian={}), r"unknown section 'trian'; did you mean \['train'\]"),
    (_set("train", grad_accum_steps=0), r"train.grad_accum_steps must be >= 1, got 0"),
    (_set("train", batch_size=0), r"train.batch_size must be >= 1"),
    (_set("train", batch_size=2.5), r"train.batch_size: expected an integer, got 2.5"),
    (_set("train", lr="fast"), r"train.lr: expected a number, got 'fast'"),
    (_set("train", amp="yes"), r"train.amp: expected true or false"),
    (_set("train", device="tpu"), r"train.device 'tpu' is not a device"),
    (_set("train", lr_schedule="cosin"), r"train.lr_schedule must be one of"),
    (_set("train", batch_size=128), r"64 samples, fewer than one batch \(128\)"),
    (_set("train", resume="nowhere.pt"), r"checkpoint 'nowhere.pt' does not exist"),
    (_set("method", hidden_budget={"step": 3}), r"budget \{'step': 3\}: unknown key\(s\) \['step'\]"),
    (_set("method", final_budget="lots"), r"method.final_budget: expected int or float, got 'lots'"),
    (_set("method", temperature=0), r"temperature must be a finite number > 0"),
    (_set("method", temperature="hot"), r"method.temperature: expected a number, got 'hot'"),
    (_set("method", hard_label_weight=2), r"hard_label_weight must be in \[0, 1\]"),
    (_set("method", projection_kind="gausian"), r"projection_kind must be one of"),
    (_set("method", projection_kind="identity"), r"identity' needs equal widths, got teacher 32 and student 6"),
    (_set("method", name="curriculum"), r"unknown method 'curriculum'; did you mean \['curriculum_extraction'\]"),
    (lambda c: c["method"].pop("layer_map"), r"method 'curriculum_extraction' needs \['layer_map'\]"),
    (lambda c: c["teacher"].pop("model"), r"teacher.model is required"),
    (lambda c: c.pop("data"), r"missing section 'data'"),
    (_set("student", model="mpl"), r"unknown model 'mpl'; did you mean \['mlp'\]"),
    (_set("student", model="no_such_pkg.models:make"), r"cannot import 'no_such_pkg.models'"),
    (_set("teacher", model="transformers:AutoModelForCausalLM.from_pretrainedd"),
     r"has no attribute 'from_pretrainedd'; did you mean \['from_pretrained'\]"),
    (_set("teacher", model="./no/such/dir"), r"no such directory"),
    (_set("teacher", checkpoint="missing.pt"), r"teacher.checkpoint 'missing.pt' does not exist"),
    (lambda c: c["student"]["kwargs"].update(widthz=[3]), r"student \(mlp\).*unexpected keyword argument 'widthz'"),
    (_set("data", dataset="sparse_parity", kwargs={"nn": 3}), r"data.dataset \(sparse_parity\).*'nn'"),
    (_set("student", model="test_distill_config:UnusedBlockMLP"), None),  # fine by itself
    (lambda c: (c["student"].update(model="test_distill_config:UnusedBlockMLP"),
                c["method"].update(layer_map={"unused": "blocks.0"})),
     r"student module 'unused' is never called in the forward pass"),
    (_set("method", layer_map={"blocks.0": "blocks.0@1"}), r"'blocks.0@1': the module is called only 1 time"),
]


@pytest.mark.parametrize("edit, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_configs_exit_2_with_a_message(tmp_path, capsys, edit, message):
    cfg = base_config(tmp_path / "out")
    edit(cfg)
    code = run(tmp_path, cfg)
    err = capsys.readouterr().err
    if message is None:
        assert code == 0, err
        return
    assert code == 2 and "Traceback" not in err, err
    assert re.search(message, err), err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # nothing ran


def test_yaml_strings_are_coerced_and_hf_config_fields_checked(tmp_path, capsys):
    cfg = base_config(tmp_path / "out")
    cfg["optimizer"] = {"name": "AdamW", "lr": "1e-3", "betas": [0.9, 0.95]}
    cfg["train"].update(lr="2e-3", max_grad_norm="1.0")
    assert run(tmp_path, cfg) == 0
    pytest.importorskip("transformers")
    cfg = base_config(tmp_path / "out2")
    cfg["student"] = {"model": "hf_from_config",
                      "kwargs": {"model_type": "gpt2", "n_layr": 2, "n_embd": 16}}
    assert run(tmp_path, cfg) == 2
    assert re.search(r"gpt2 config has no field 'n_layr'; did you mean \['n_layer'\]",
                     capsys.readouterr().err)
    assert run(tmp_path, {}, text="teacher: [unclosed\n") == 2
    assert "cannot parse" in capsys.readouterr().err


def test_help_documents_the_schema(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["distill", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for key in ("teacher:", "checkpoint:", "layer_map", "grad_accum_steps", "lr_schedule",
                "warmup_steps", "num_workers", "keep_checkpoints", "hf_from_config",
                "save_pretrained", "projection_kind", "vocab_size", "examples/hf_causal_lm.yaml"):
        assert key in out, key


@pytest.mark.parametrize("name", ["sparse_parity.yaml", "hf_causal_lm.yaml"])
def test_example_configs_run_as_they_are(tmp_path, monkeypatch, capsys, name):
    if name.startswith("hf"):
        pytest.importorskip("transformers")
    pytest.importorskip("yaml")
    shutil.copy(os.path.join(EXAMPLES, name), tmp_path / name)
    monkeypatch.chdir(tmp_path)  # out_dir is relative: runs/...
    assert cli.main(["distill", "--config", name]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not summary["stopped_early"] and os.path.isdir(summary["student_dir"])
    assert "eval_loss" in summary["final"]
    # Run again: the old run is refused; --overwrite starts over.
    assert cli.main(["distill", "--config", name]) == 2
    assert "holds a previous run" in capsys.readouterr().err
    if name.startswith("sparse"):
        assert cli.main(["distill", "--config", name, "--overwrite"]) == 0
