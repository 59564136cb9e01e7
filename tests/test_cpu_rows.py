"""The CPU row kernels' memory paths (issue 18): the student's gradient written into a given
buffer or over the student's own logits (the fused-linear driver's in-place chunk), the
16-bit rows' vectorized conversions, and fresh gradients advised onto huge pages (opt-in).

The accuracy of the gradients themselves is tested against float64 oracles in
test_softmax_kl.py / test_tvd.py / test_symmetric_kl.py; here the property is that these
paths change nothing: the same bits as the fresh-gradient path, on the AVX2 and (rerun in
a subprocess) the portable path."""
import os
import subprocess
import sys

import pytest
import torch

import cex_kernels
from cex_kernels import _backends

from conftest import CPU_PATHS, rerun_cpu_cases_on_path

pytestmark = pytest.mark.skipif(not cex_kernels.backends()["cpu"],
                                reason="compiled extension not built")

# (label, slot, extra args before grad_student/grad_teacher, grad_teacher)
MODES = [
    ("kl", "softmax_kl", (0.0, False), False),
    ("kl+teacher", "softmax_kl", (0.0, False), True),
    ("jsd", "softmax_kl", (0.3, False), True),
    ("symmetric", "softmax_kl", (0.4, True), False),
    ("tvd", "tvd", (), True),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _logits(n, v, dtype, seed, row_stride=None):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(n, row_stride or v, generator=gen, dtype=torch.float64) * 3
    t = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2
    s[1, 3] = float("nan")       # a NaN row: NaN in every gradient entry
    t[2, :v // 2] = float("-inf")  # teacher probability 0 on half the row
    return s.to(dtype)[:, :v], t.to(dtype)


def _run(slot, s, t, w, extra, grad_teacher, **kw):
    return _backends.kernel("cpu", slot)(s, t, w, 0.5, *extra, True, grad_teacher, **kw)


def _same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0))


@pytest.mark.parametrize("vocab", [37, 1030])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES, ids=[m[0] for m in MODES])
def test_cpu_gradient_into_buffer_or_over_the_logits(mode, dtype, vocab):
    _, slot, extra, grad_teacher = mode
    s, t = _logits(5, vocab, dtype, seed=vocab, row_stride=vocab + 3)  # strided rows
    w = torch.tensor([0.5, 1.0, 2.0, 0.0, 0.25])  # row 3 dropped
    rows, gs, gt = _run(slot, s, t, w, extra, grad_teacher)
    assert gs[1].isnan().all() and (gs[3] == 0).all()

    buf = torch.full((5, vocab), 7.0, dtype=dtype)
    rows_b, gs_b, gt_b = _run(slot, s, t, w, extra, grad_teacher, grad_student_out=buf)
    assert gs_b.data_ptr() == buf.data_ptr()
    _same_bits(gs_b, gs)
    _same_bits(rows_b, rows)

    base = s._base.clone()                  # the student's (5, vocab + 3) storage
    over = base[:, :vocab]
    rows_i, gs_i, gt_i = _run(slot, over, t, w, extra, grad_teacher, grad_student_out=over)
    assert gs_i.data_ptr() == over.data_ptr()
    _same_bits(over, gs)                     # the logits were overwritten by the gradient
    _same_bits(rows_i, rows)
    _same_bits(base[:, vocab:], s._base[:, vocab:])  # the padding columns are untouched
    if grad_teacher:
        _same_bits(gt_i, gt)
        _same_bits(gt_b, gt)


def test_cpu_grad_student_out_rejects_bad_buffers():
    s, t = _logits(4, 16, torch.float32, seed=0)
    s, w = s.contiguous(), torch.ones(4)
    kernel = _backends.kernel("cpu", "softmax_kl")
    bad = {
        "wrong shape": torch.empty(4, 15),
        "wrong dtype": torch.empty(4, 16, dtype=torch.float64),
        "overlaps the student": torch.empty(0).set_(s.untyped_storage(), 8, (4, 16), (16, 1)),
        "is the teacher": t,
        "is the student, which is the teacher": s,  # (called with teacher=s below)
        "not contiguous": torch.empty(16, 4).T,
    }
    for why, out in bad.items():
        teacher = s if "which is the teacher" in why else t
        with pytest.raises(RuntimeError, match="grad_student_out"):
            kernel(s, teacher, w, 1.0, 0.0, False, True, False, grad_student_out=out)
            pytest.fail(why)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_16bit_rows_round_like_torch(dtype):
    """A 16-bit row is widened to fp32, run, and its gradient narrowed: the result must be
    the fp32 kernel's on the widened inputs, rounded by torch (nearest even; many ties over
    this many entries), bit for bit, NaN rows included."""
    s, t = _logits(64, 4099, dtype, seed=3)
    w = torch.full((64,), 1.0)
    for slot, extra in (("softmax_kl", (0.0, False)), ("softmax_kl", (0.3, False)), ("tvd", ())):
        rows, gs, gt = _run(slot, s, t, w, extra, True)
        rows32, gs32, gt32 = _run(slot, s.float(), t.float(), w, extra, True)
        _same_bits(gs, gs32.to(dtype))
        _same_bits(gt, gt32.to(dtype))
        _same_bits(rows, rows32)


def _vm_flags_of(address: int) -> str:
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("VmFlags:"):
                return line
    raise AssertionError(f"no mapping holds {address:#x}")


_THP = "/sys/kernel/mm/transparent_hugepage/enabled"
_SMAPS_SCRIPT = """
import torch
from cex_kernels import _backends
from test_cpu_rows import _vm_flags_of
s = torch.randn(256, 16384)
_, g, _ = _backends.kernel("cpu", "softmax_kl")(s, s.flip(1), torch.ones(256), 1.0, 0.0,
                                                 False, True, False)
print(" hg" in _vm_flags_of(g.data_ptr() + g.nbytes // 2))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.exists(_THP),
                    reason="transparent huge pages are a Linux feature")
def test_cpu_fresh_gradient_is_advised_onto_huge_pages():
    """With CEX_HUGE_PAGES=1 a 16 MiB fresh gradient's pages carry MADV_HUGEPAGE (smaps
    VmFlags "hg": set by the advice whether or not the system then grants huge pages);
    without it (the default) they do not."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    out = {}
    for on in ("", "1"):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests_dir, os.environ.get(
            "PYTHONPATH", "")]))
        env.pop("CEX_HUGE_PAGES", None)
        if on:
            env["CEX_HUGE_PAGES"] = on
        proc = subprocess.run([sys.executable, "-c", _SMAPS_SCRIPT], env=env, cwd=tests_dir,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[on] = proc.stdout.split()[-1]
    assert out == {"": "False", "1": "True"}


@pytest.mark.parametrize("path", sorted(CPU_PATHS))
def test_cpu_cases_on_other_cpu_paths(path):
    """The cpu cases above again on the portable (CEX_DISABLE_AVX2=1) and the AVX2
    (CEX_DISABLE_AVX512=1) paths; in-process they ran on the widest this CPU has."""
    rerun_cpu_cases_on_path(__file__, path, select="cpu_gradient or cpu_16bit")
