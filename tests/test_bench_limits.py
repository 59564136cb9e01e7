"""The report's exp-throughput limit, "% exp limit" and "vs torch.compile" figures, and
``bench/cpu_vs_compile.py`` end to end (a --quick smoke run). No timing is asserted: every
check recomputes a figure from the numbers the report holds."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cex_kernels import benchmarking
from cex_kernels.benchmarking import measure, report, spec

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "cpu_vs_compile.py"


def test_peak_exp_rate_is_positive_and_finite():
    rate = measure.measure_peak_exp_rate("cpu", n=4096, calls=4, repeats=2)
    assert rate > 0 and math.isfinite(rate)
    with pytest.raises(ValueError, match="n and calls"):
        measure.measure_peak_exp_rate("cpu", n=0)


def test_exp_fraction_is_exps_per_second_over_the_rate():
    out = spec.rates(flops=10, min_bytes=8, seconds=0.5, peaks={"exp_per_s": 4e9},
                     dtype_name="float32", exps=1_000_000_000)
    assert out["exps"] == 1_000_000_000 and out["exp_per_s"] == 2e9
    assert out["exp_fraction"] == pytest.approx(1e9 / 0.5 / 4e9)
    assert "exp_fraction" not in spec.rates(10, 8, 0.5, {}, "float32", exps=100)  # no limit
    assert "exp_per_s" not in spec.rates(10, 8, 0.5, {"exp_per_s": 4e9}, "float32")


def test_exps_per_op_and_bf16_cpu_grids():
    sk, tvd = benchmarking.SOFTMAX_KL, benchmarking.OPS["tvd"]

    def case(op, variant, mode):
        return spec.Case(op, (("N", 3), ("V", 5)), torch.float32, mode, variant)
    for mode in benchmarking.MODES:
        assert sk.exps(case("softmax_kl", "kl", mode)) == 2 * 15
        assert tvd.exps(case("tvd", "", mode)) == 2 * 15
    assert sk.exps(case("softmax_kl", "jsd", "fwd")) == 4 * 15  # + the mixture's exp, log1p
    assert sk.exps(case("softmax_kl", "jsd", "fwd+bwd")) == 6 * 15  # mixture pass twice
    for gemm_bound in (benchmarking.LINEAR_KL, benchmarking.PROJECTED_MSE):
        assert gemm_bound.exps is None and "exp_fraction" not in gemm_bound.metrics
        assert "gemm_fraction" in gemm_bound.metrics and "vs_compile" in gemm_bound.metrics
    for op in (sk, tvd, benchmarking.LINEAR_KL):
        assert op.dtypes["cpu"] == (torch.float32, torch.bfloat16)
        assert {c.dtype for c in op.cases("cpu", quick=True)} == {torch.float32}
    for op in (sk, tvd):
        assert op.metrics.index("exp_fraction") == op.metrics.index("bandwidth_fraction") + 1


def test_measure_peaks_has_the_exp_rate_for_the_logits_ops_on_the_cpu():
    cases = benchmarking.SOFTMAX_KL.cases("cpu", quick=True)
    peaks = report.measure_peaks(benchmarking.SOFTMAX_KL, "cpu", cases, small=True)
    assert peaks["exp_per_s"] > 0 and not any(k.startswith("gemm") for k in peaks)
    cases = benchmarking.LINEAR_KL.cases("cpu", quick=True)
    peaks = report.measure_peaks(benchmarking.LINEAR_KL, "cpu", cases, small=True)
    assert "exp_per_s" not in peaks and peaks["gemm_flops_per_s_float32"] > 0


def _row(impl, times, shape=None):
    return {"op": "softmax_kl", "impl": impl, "dtype": "float32", "mode": "fwd+bwd",
            "shape": shape or {"N": 1, "V": 2}, "time_s": measure.summarize(times),
            "peak_extra_memory_bytes": 1 << 20}


def test_vs_compile_is_the_paired_ratio_for_our_rows_only():
    rows = [_row("cpu", [1.0, 2.0, 4.0, 1.0]), _row("cpu/64MiB", [2.0, 2.0, 2.0, 2.0]),
            _row("torch.compile", [1.5, 2.0, 2.0, 3.0]), _row("eager", [3.0, 3.0, 3.0, 3.0]),
            _row("cpu", [1.0], shape={"N": 9, "V": 2})]  # another cell: no compile there
    report.add_paired_ratios(rows)
    ours, ours64, compiled, eager, other = rows
    # compile / ours per round: 1.5, 1.0, 0.5, 3.0 -> sorted 0.5, 1.0, 1.5, 3.0
    assert ours["vs_compile"]["median"] == pytest.approx(1.25)
    assert ours["vs_compile"]["p25"] == pytest.approx(0.875)
    assert ours["vs_compile"]["p75"] == pytest.approx(1.875)
    assert (ours["vs_compile"]["min"], ours["vs_compile"]["max"]) == (0.5, 3.0)
    assert ours64["vs_compile"]["median"] == pytest.approx(1.0)
    assert "vs_compile" not in compiled and "vs_compile" not in eager
    assert "vs_compile" not in other and "speedup_vs_eager" not in other
    assert ours["speedup_vs_eager"] == pytest.approx(2.25)  # eager / ours: 3, 1.5, .75, 3


def _fake_report(rows, peaks):
    env = {"device": "cpu", "device_name": "test cpu", "torch": "x", "triton": "y",
           "python": "z", "torch_num_threads": 2, "date": "today"}
    return {"environment": env, "peaks": peaks, "rows": rows, "skipped": [],
            "settings": {"op": "softmax_kl", "quick": True, "warmup": 1, "repeats": 2}}


def test_markdown_shows_exp_limit_and_vs_compile_from_the_row():
    peaks = {"copy_bytes_per_s": 3e10, "exp_per_s": 2e9}
    row = _row("cpu", [1e-3, 1e-3])
    row.update(spec.rates(10, 8, 1e-3, peaks, "float32", exps=800_000))
    row["vs_compile"] = {"median": 1.5, "p25": 1.25, "p75": 1.75, "min": 1.0, "max": 2.0}
    md = report.report_markdown(_fake_report([row], peaks))
    assert "| % copy BW | % exp limit | peak extra MiB |" in md
    assert "| vs torch.compile |" in md and "| 1.50x (1.25-1.75) |" in md
    assert "| 40% |" in md  # 8e5 exps in 1 ms = 8e8/s, over 2e9/s
    assert "exp 2.00 G/s" in md
    plain = _row("cpu", [1e-3, 1e-3])  # e.g. a GPU report: neither figure, neither column
    plain.update(spec.rates(10, 8, 1e-3, {"copy_bytes_per_s": 3e10}, "float32", exps=10))
    md = report.report_markdown(_fake_report([plain], {"copy_bytes_per_s": 3e10}))
    header = next(line for line in md.splitlines() if line.startswith("| shape"))
    assert "% exp limit" not in header and "vs torch.compile" not in header
    assert header.endswith("| % copy BW | peak extra MiB | mem vs eager | vs eager |")


def _script():
    loader = importlib.util.spec_from_file_location("cpu_vs_compile", SCRIPT)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


def test_script_cells_and_eager_limit():
    script = _script()
    full = script.cells(quick=False)
    issue = [c for c, is_issue in full if is_issue]
    assert [(c.op, c.sizes, c.dtype) for c in issue] == [
        (op, shape, dtype) for op, shape, dtype in script.ISSUE_CELLS]
    assert all(c.mode == "fwd+bwd" for c, _ in full) and len({c for c, _ in full}) == len(full)
    for op in script.OPS_RUN:  # every CPU grid shape, fp32 and bf16
        grid = benchmarking.OPS[op].shapes["cpu"]
        for dtype in (torch.float32, torch.bfloat16):
            got = [c.sizes for c, _ in full if c.op == op and c.dtype == dtype]
            assert all(s in got for s in grid)
    case = script.cells(quick=True)[0][0]
    assert "eager call took" in script.eager_too_slow(case, 1e-12)
    assert script.eager_too_slow(case, 1e6) is None


def test_quick_script_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [json_path] = tmp_path.glob("cpu-vs-compile-*-quick.json")
    [md_path] = tmp_path.glob("cpu-vs-compile-*-quick.md")
    data = json.loads(json_path.read_text())
    peaks = data["peaks"]
    assert {"copy_bytes_per_s", "exp_per_s", "gemm_flops_per_s_float32",
            "gemm_flops_per_s_bfloat16"} <= set(peaks)
    assert data["environment"]["torch_num_threads"] == 1 and data["settings"]["quick"]
    script = _script()
    assert len(data["cells"]) == len(script.cells(quick=True))
    assert sum(c["issue_18"] for c in data["cells"]) == 3  # (their grid twins are dropped)
    md = md_path.read_text()
    assert ("| torch.compile / ours | ceiling: torch.compile / GEMMs alone | ours % copy BW "
            "| ours % exp limit | ours % peak GEMM |") in md
    for cell in data["cells"]:
        assert len(cell["load_1min"]) == 2
        rows = {r["impl"]: r for r in cell["rows"]}
        gemm_bound = cell["op"] in script.GEMM_BOUND
        assert set(rows) == {"cpu", "torch.compile", "eager"} | (
            {script.GEMMS_ALONE} if gemm_bound else set()), (cell["skipped"], rows)
        ours, compiled = rows["cpu"], rows["torch.compile"]
        if gemm_bound:  # the ceiling: torch.compile over the op's products alone
            alone = rows[script.GEMMS_ALONE]
            assert alone["ceiling_vs_compile"] == pytest.approx(
                measure.paired_ratio(compiled["time_s"], alone["time_s"]))
            assert report.paired_text(alone["ceiling_vs_compile"]) in md
        paired = measure.paired_ratio(compiled["time_s"], ours["time_s"])
        assert ours["vs_compile"] == pytest.approx(paired)
        assert ours["bandwidth_fraction"] == pytest.approx(
            ours["min_bytes"] / ours["time_s"]["median"] / peaks["copy_bytes_per_s"])
        if cell["op"] in ("softmax_kl", "tvd"):
            assert ours["exps"] == 2 * cell["shape"]["N"] * cell["shape"]["V"]
            assert ours["exp_fraction"] == pytest.approx(
                ours["exps"] / ours["time_s"]["median"] / peaks["exp_per_s"])
            assert "gemm_peak_fraction" not in ours
        else:
            assert "exp_fraction" not in ours
            assert ours["gemm_peak_fraction"] == pytest.approx(
                ours["flops"] / ours["time_s"]["median"]
                / peaks[f"gemm_flops_per_s_{cell['dtype']}"])
        assert report.paired_text(paired) in md


def test_grid_runner_reports_both_figures_on_a_tiny_cell():
    out = report.run_report("tvd", "cpu", quick=True, shapes=[{"N": 4, "V": 64}],
                            impls=["cpu", "torch.compile"], repeats=2, budget_s=0.0)
    assert out["peaks"]["exp_per_s"] > 0
    ours = [r for r in out["rows"] if r["impl"] == "cpu"]
    assert len(ours) == len(benchmarking.MODES)
    for row in ours:
        compiled = next(r for r in out["rows"] if r["impl"] == "torch.compile"
                        and r["mode"] == row["mode"])
        assert row["vs_compile"] == pytest.approx(
            measure.paired_ratio(compiled["time_s"], row["time_s"]))
        assert row["exp_fraction"] == pytest.approx(
            2 * 4 * 64 / row["time_s"]["median"] / out["peaks"]["exp_per_s"])
    md = report.report_markdown(out)
    assert "| % copy BW | % exp limit |" in md and "| vs torch.compile |" in md


def test_script_records_a_failing_cell_and_goes_on(monkeypatch):
    script = _script()

    def boom(*args, **kwargs):
        raise MemoryError("no room")
    monkeypatch.setattr(script.grid_report, "measure_cell", boom)
    args = SimpleNamespace(impls=["cpu", "eager"], eager_limit=0.0, warmup=1, repeats=1,
                           budget=0.0)
    case = script.cells(quick=True)[0][0]
    cell = script.run_cell(case, True, {}, args)
    assert cell["rows"] == [{"impl": "cpu", "error": "MemoryError: no room"},
                            {"impl": "eager", "error": "MemoryError: no room"}]
    assert len(cell["load_1min"]) == 2 and cell["skipped"] == []
    env = {"date": "today", "device_name": "test cpu", "cpu_count": 2, "torch": "x",
           "cex_kernels": "y", "python": "z"}
    md = script.markdown({"environment": env, "peaks": {"copy_bytes_per_s": 1e10},
                          "settings": {"quick": True, "threads": 1, "impls": ["cpu", "eager"],
                                       "warmup": 1, "repeats": 1, "budget_s": 0.0},
                          "cells": [cell]})
    assert md.count("error: MemoryError: no room") == 2
