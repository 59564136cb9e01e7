"""``cex demo``'s output pieces at tiny settings (seconds): the interleaved timer, the summary
table's columns, and a plot whose tick labels never overlap at any number of cells."""
import importlib.util
import itertools

import pytest

from cex_kernels.benchmarking import measure as bench_utils

HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def test_time_interleaved_alternates_and_meets_budget_and_minimum():
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in "abc"}
    out = bench_utils.time_interleaved(fns, device="cpu", warmup=1, min_repeats=7, budget_s=0.0)
    assert order[:6] == list("abcabc")  # warm-up round, then timed rounds, interleaved
    assert all(out[n]["repeats"] == 7 for n in "abc")
    assert all("noisy" in out[n] for n in "abc")


def test_time_interleaved_spends_its_budget():
    import time
    out = bench_utils.time_interleaved({"sleep": lambda: time.sleep(0.002)}, device="cpu",
                                       warmup=0, min_repeats=1, budget_s=0.05)
    times = out["sleep"]["times"]
    # rounds go on until the timed calls add up to the budget, and stop at the first past
    # it (a count of calls would depend on the machine's load)
    assert sum(times[:-1]) < 0.05 <= sum(times)
    assert out["sleep"]["repeats"] == len(times)


def test_time_interleaved_records_a_failure_and_goes_on():
    def boom():
        raise RuntimeError("no")
    out = bench_utils.time_interleaved({"ok": lambda: None, "bad": boom}, device="cpu",
                                       min_repeats=3, budget_s=0.0)
    assert out["bad"] == {"error": "RuntimeError: no"} and out["ok"]["repeats"] == 3


def test_noisy_rule_and_paired_ratio():
    assert not bench_utils.is_noisy(bench_utils.summarize([1.0, 1.0, 1.1, 1.0]))
    assert bench_utils.is_noisy(bench_utils.summarize([1.0, 2.0, 1.0, 2.0, 3.0]))
    r = bench_utils.paired_ratio({"times": [2.0, 4.0, 6.0]}, {"times": [1.0, 2.0, 2.0]})
    assert r["median"] == 2.0 and r["p25"] == 2.0 and r["p75"] == 2.5 and r["rounds"] == 3


def test_peak_extra_memory_prints_nothing(capfd):
    import torch
    assert bench_utils.peak_extra_memory(lambda: torch.empty(1 << 20, dtype=torch.uint8),
                                         "cpu") == 1 << 20
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""  # no profiler start/stop lines


def test_impl_labels_name_our_kernels():
    from cex_kernels.benchmarking.spec import impl_label
    assert impl_label("cpu") == "cex C++" and impl_label("cuda") == "cex CUDA"
    assert impl_label("cpu/64MiB") == "cex C++ (64MiB)" and impl_label("eager") == "eager"


def _fake_parity(n_points=20):
    curve = [{"step": 10 * i, "samples": 1280 * i, "flops": 1e8 * i, "test_acc": 0.5 + i / 60}
             for i in range(1, n_points + 1)]
    phases = [{"name": "projected_mse", "steps": 50}, {"name": "softmax_kl", "steps": 150}]
    students = {m: {"curve": curve, "phases": phases, "phase_flops": [5e8, 1.5e9]}
                for m in ("labels", "one_shot", "progressive", "curriculum_extraction")}
    return {"config": {"device": "cpu", "d": 60, "k": 5, "student_width": 64, "samples": 25600,
                       "batch_size": 128},
            "teacher": {"test_acc": 0.995}, "students": students}


def _fake_reports(n_cells):
    """n_cells non-eager rows with speedups, spread over the three ops."""
    ops = ["projected_mse", "softmax_kl", "linear_kl"]
    impls = ["cpu", "cpu/64MiB", "torch.compile", "reference"]
    reports = {op: {"rows": [], "skipped": []} for op in ops}
    cells = itertools.product(impls * 10, ("fwd", "fwd+bwd"), ops)
    for i, (impl, mode, op) in zip(range(n_cells), cells):
        reports[op]["rows"].append({
            "op": op, "impl": impl, "mode": mode, "dtype": "float32", "shape": {"N": 8},
            "time_s": {"median": 1e-3, "iqr": 5e-4 * (i % 2), "repeats": 9, "noisy": bool(i % 2)},
            "peak_extra_memory_bytes": 1 << 20, "memory_vs_eager": 0.3,
            "speedup_vs_eager": 0.5 + i / 7,
            "speedup_vs_eager_rounds": {"median": 1.0, "p25": 0.4 + i / 7, "p75": 0.6 + i / 7}})
    return reports


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed")
@pytest.mark.parametrize("n_cells", [0, 4, 20, 60])
def test_demo_plot_tick_labels_never_overlap(n_cells):
    import matplotlib.pyplot as plt

    from cex_kernels.experiments.demo import demo_figure
    fig = demo_figure(_fake_parity(), _fake_reports(n_cells))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    try:
        boxes = []
        for ax in fig.axes:
            for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
                lo, hi = min(lo, hi), max(lo, hi)
                for tick in axis.get_major_ticks():  # the drawn ones: inside the view limits
                    label = tick.label1
                    if (lo - 1e-9 * abs(hi - lo) <= tick.get_loc() <= hi + 1e-9 * abs(hi - lo)
                            and label.get_visible() and label.get_text()):
                        boxes.append((ax, label.get_text(), label.get_window_extent(renderer)))
        assert len(boxes) >= n_cells
        for (ax1, t1, b1), (ax2, t2, b2) in itertools.combinations(boxes, 2):
            assert not b1.overlaps(b2), f"tick labels {t1!r} and {t2!r} overlap"
        # chance, the teacher and the shaded projected-MSE phase are marked on each curve
        legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert "chance (0.5)" in legend and "teacher (0.995)" in legend
        assert "CE projected-MSE phase" in legend
    finally:
        plt.close(fig)


def test_summary_table_has_spread_and_memory_and_names_ours():
    from cex_kernels.experiments.demo import format_rows, summary_table_rows
    parity = _fake_parity()
    for r in parity["students"].values():
        r.update(final_test_acc=0.9, best_test_acc=0.9, samples=25600, flops=2e9, seconds=1.0)
    reports = _fake_reports(2)
    rows = summary_table_rows(parity, reports)
    table = format_rows(rows)
    assert "| spread" in table and "| peak memory" in table
    assert "cex C++ fwd" in table and "NOISY" in table and "(0.30x eager)" in table
