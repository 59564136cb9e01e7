"""``cex distill --config``: JSON always, YAML with PyYAML, and clear errors."""
import json
import re

import pytest

from cex_kernels import cli


def base_config(out_dir):
    return {
        "teacher": {"model": "mlp", "kwargs": {"d_in": 8, "widths": [32, 32], "n_out": 2}, "seed": 0},
        "student": {"model": "mlp", "kwargs": {"d_in": 8, "widths": [6, 6], "n_out": 2}, "seed": 1},
        "data": {"dataset": "sparse_parity", "kwargs": {"n": 128, "d": 8, "k": 2}},
        "method": {"name": "curriculum_extraction",
                   "layer_map": {"student": ["blocks.0", "blocks.1"],
                                 "teacher": ["blocks.0", "blocks.1"]},
                   "hidden_budget": 2, "final_budget": {"samples": 48}, "temperature": 2.0,
                   "projection_kind": "orthogonal"},
        "optimizer": {"name": "SGD", "lr": 0.05, "momentum": 0.9},
        "train": {"batch_size": 16, "out_dir": str(out_dir), "progress_bar": False,
                  "tensorboard": False, "log_every": 1},
    }


def run(tmp_path, cfg, name="run.json", capsys=None):
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(json.dumps(cfg))
    else:
        yaml = pytest.importorskip("yaml")
        path.write_text(yaml.safe_dump(cfg))
    return cli.main(["distill", "--config", str(path)])


@pytest.mark.parametrize("name", ["run.json", "run.yaml"])
def test_cli_runs_a_config(tmp_path, capsys, name):
    assert run(tmp_path, base_config(tmp_path / "out"), name) == 0
    out = capsys.readouterr().out
    assert "curriculum_extraction schedule" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["global_step"] == 7 and len(summary["phase_flops"]) == 3
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 7


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["method"].update(layer_map={"block.0": "blocks.0"}),
     r"student has no module named 'block.0'; close matches: \['blocks.0'"),
    (lambda c: c["train"].update(bach_size=3), r"unknown train option 'bach_size'; did you mean \['batch_size'\]"),
    (lambda c: c["method"].update(hidden_budget=0), r"phase 'layer 1: blocks.0 <- blocks.0' is empty"),
    (lambda c: c["student"].update(model="mpl"), r"unknown model 'mpl'"),
    (lambda c: c["student"]["kwargs"].update(n_out=3), r"student logits \(16, 3\) and teacher logits \(16, 2\)"),
])
def test_cli_errors_are_clear(tmp_path, capsys, edit, message):
    cfg = base_config(tmp_path / "out")
    edit(cfg)
    assert run(tmp_path, cfg) == 2

    assert re.search(message, capsys.readouterr().err)
