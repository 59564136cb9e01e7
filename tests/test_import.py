"""``import cex_kernels`` is cheap: it loads neither Triton nor the trainer, and both still
load when they are used."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_import_loads_neither_triton_nor_the_trainer():
    out = _run("import sys, cex_kernels\n"
               "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith('triton.')"
               " or m.startswith('cex_kernels.distill') or m.startswith('cex_kernels.triton')))")
    assert out == "[]"


def test_trainer_names_load_on_first_use():
    out = _run("import sys, cex_kernels\n"
               "from cex_kernels import Trainer, TrainConfig, CurriculumExtraction\n"
               "from cex_kernels.distill import Trainer as T\n"
               "print(Trainer is T, 'cex_kernels.distill.trainer' in sys.modules,"
               " 'distill' in dir(cex_kernels), cex_kernels.distill.TrainConfig is TrainConfig)")
    assert out == "True True True True"


def test_unknown_attribute_is_still_an_attribute_error():
    out = _run("import cex_kernels\n"
               "try:\n    cex_kernels.no_such_name\nexcept AttributeError as e:\n    print(e)")
    assert out == "module 'cex_kernels' has no attribute 'no_such_name'"


def test_triton_loads_with_the_first_triton_kernel():
    out = _run("import os, sys\nos.environ['TRITON_INTERPRET'] = '1'\nimport torch, cex_kernels\n"
               "if not cex_kernels.backends()['triton']:\n    print('skip')\nelse:\n"
               "    s = torch.randn(2, 8)\n"
               "    cex_kernels.softmax_kl(s, s.flip(0), backend='triton')\n"
               "    print('triton' in sys.modules)")
    assert out in ("True", "skip")
