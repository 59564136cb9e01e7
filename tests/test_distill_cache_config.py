"""The two-command workflow (cex cache-teacher, then cex distill --from-cache) from one config
file, and the config errors of the cache section."""
import json
import os
import shutil

import pytest

pytest.importorskip("transformers")

from cex_kernels import cli  # noqa: E402
from cex_kernels.distill.cache import TeacherCache  # noqa: E402
from cex_kernels.distill.config import build_cache_run, build_run  # noqa: E402
from cex_kernels.distill._validate import ConfigError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def gpt2(layers, width):
    return {"model": "hf_from_config", "seed": layers,
            "kwargs": {"model_type": "gpt2", "task": "causal_lm", "vocab_size": 48,
                       "n_positions": 16, "n_layer": layers, "n_embd": width, "n_head": 2}}


def config(tmp_path, **sections):
    cfg = {"teacher": gpt2(2, 16), "student": gpt2(1, 8),
           "data": {"dataset": "token_rows",
                    "kwargs": {"n": 12, "min_len": 3, "max_len": 9, "vocab_size": 48}},
           "method": {"name": "curriculum_extraction", "hidden_budget": 1, "final_budget": 2,
                      "layer_map": {"transformer.h.0": "transformer.h.1"}, "temperature": 2.0,
                      "top_k_loss": "tail"},
           "cache": {"dir": str(tmp_path / "cache"), "k": 6, "batch_size": 5,
                     "rows_per_shard": 4},
           "train": {"batch_size": 4, "out_dir": str(tmp_path / "run"), "progress_bar": False,
                     "print_schedule": False, "tensorboard": False, "log_every": 1}}
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    return str(path), cfg


def test_the_example_runs_as_the_readme_says(tmp_path, monkeypatch, capsys):
    """examples/offline_causal_lm.yaml: dry run (writes nothing), cache, distill --from-cache."""
    pytest.importorskip("yaml")
    name = "offline_causal_lm.yaml"
    shutil.copy(os.path.join(os.path.dirname(__file__), os.pardir, "examples", name), tmp_path)
    monkeypatch.chdir(tmp_path)  # cache.dir and out_dir are relative: runs/...
    assert cli.main(["cache-teacher", "--config", name, "--dry-run", "--no-progress"]) == 0
    dry = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert dry["dry_run"] and dry["shards_written"] == 0 and not os.path.exists("runs")
    # per token: 16 ids x (2 B bf16 log-prob + 4 B int32); 64-wide bf16 projected states
    assert dry["bytes_per_token"] == {"logits": 96, "hidden.0": 128, "hidden.1": 128}
    assert dry["total_bytes"] == 352 * dry["tokens"]["logits"]
    assert cli.main(["cache-teacher", "--config", name, "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cache = TeacherCache("runs/offline-causal-lm/cache")
    assert report["shards_written"] == cache.index["num_shards"] == 2
    assert sum(cache.row(r)["logits"]["logprobs"].shape[0] for r in range(cache.num_rows)) == \
        dry["tokens"]["logits"]
    assert cli.main(["distill", "--config", name, "--from-cache"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["global_step"] == 10 and result["final"]["kd"] > 0
    assert os.path.isdir(result["student_dir"])


def test_cache_config_errors(tmp_path, capsys):
    bad = [({"cache": {"kk": 3}}, "unknown key in cache: 'kk'; did you mean \\['k'\\]"),
           ({"cache": {"k": 0}}, "cache.k must be a positive int"),
           ({"cache": {"logprob_dtype": "int8"}}, "cache.logprob_dtype must be"),
           ({"cache": {"storage": "zip"}}, "storage must be 'auto', 'safetensors' or 'numpy'"),
           ({"cache": {"sampled_rounds": -2}}, "cache.sampled_rounds must be a positive int"),
           ({"method": {"top_k_loss": "exact"}}, "top_k_loss must be one of")]
    for change, match in bad:
        path, cfg = config(tmp_path, **change)
        with pytest.raises(ConfigError, match=match):
            build_cache_run(cfg)()
    _, cfg = config(tmp_path)
    del cfg["cache"]["dir"]
    with pytest.raises(ConfigError, match="cache.dir is required"):
        build_cache_run(cfg)
    _, cfg = config(tmp_path, teacher={"cache": str(tmp_path)})
    with pytest.raises(ConfigError, match="cex cache-teacher needs the teacher model"):
        build_cache_run(cfg)
    path, cfg = config(tmp_path)
    with pytest.raises(ConfigError, match="not a teacher cache"):
        build_run(cfg, from_cache=True)
    assert cli.main(["distill", "--config", path, "--from-cache"]) == 2
    assert "not a teacher cache" in capsys.readouterr().err
    build_cache_run(cfg, progress_bar=False)()
    _, cfg = config(tmp_path, data={"eval_dataset": "token_rows"})
    with pytest.raises(ConfigError, match="eval_dataset cannot be used when training from a"):
        build_run(cfg, from_cache=True)
    _, cfg = config(tmp_path, method={"temperature": 1.0})
    with pytest.raises(ConfigError, match="needs the cache's temperature"):
        build_run(cfg, from_cache=True)
    _, cfg = config(tmp_path, method={"projection_seed": 3})
    with pytest.raises(ConfigError, match="layer map / projections"):
        build_run(cfg, from_cache=True)
