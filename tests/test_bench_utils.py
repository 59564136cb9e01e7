"""Checks of the measurement helpers on toy cases with known answers (CPU, seconds)."""
import torch

from cex_kernels import benchmarking as bench_specs
from cex_kernels.benchmarking import measure as bench_utils


def _bytes(n):
    return torch.empty(n, dtype=torch.uint8)


def test_peak_extra_memory_counts_one_known_allocation():
    assert bench_utils.peak_extra_memory(lambda: _bytes(1 << 20), "cpu") == 1 << 20


def test_peak_extra_memory_is_the_running_maximum():
    def alloc_free_alloc():
        a, b = _bytes(4 << 20), _bytes(1 << 20)
        del a  # peak was 5 MiB; 1 MiB is alive now
        return b, _bytes(2 << 20)  # 3 MiB alive at the end
    assert bench_utils.peak_extra_memory(alloc_free_alloc, "cpu") == 5 << 20


def test_peak_extra_memory_sees_allocations_inside_kernels():
    x = torch.randn(256, 1024)
    # (x * 2) allocates 1 MiB inside the mul kernel; .sum() a 4-byte scalar.
    peak = bench_utils.peak_extra_memory(lambda: (x * 2).sum(), "cpu")
    assert 1 << 20 <= peak <= (1 << 20) + 64


def test_freeing_baseline_memory_never_raises_the_peak():
    # On the CPU the free of a block allocated before profiling started is seen only when the
    # allocator recorded its size, so the result is 0 (free seen) or 1 MiB (not seen).
    held = [_bytes(3 << 20)]
    peak = bench_utils.peak_extra_memory(lambda: (held.clear(), _bytes(1 << 20)), "cpu")
    assert peak in (0, 1 << 20)


def test_time_fn_summary():
    t = bench_utils.time_fn(lambda: None, warmup=1, repeats=5, device="cpu")
    assert t["repeats"] == 5 and len(t["times"]) == 5
    assert t["min"] <= t["median"] <= t["max"] and t["iqr"] >= 0


def test_grid_is_shared_and_quick_is_smallest():
    spec = bench_specs.PROJECTED_MSE
    full, quick = spec.cases("cpu"), spec.cases("cpu", quick=True)
    assert {c.sizes["N"] for c in quick} == {2048} and {c.mode for c in quick} == {"fwd", "fwd+bwd"}
    assert set(quick) <= set(full) and len(full) == 3 * len(bench_specs.MODES)
    assert spec.flops(full[0]) == 2 * 8192 * 1024 * 256


def test_every_op_is_registered_with_a_grid_per_device():
    assert set(bench_specs.OPS) == {"projected_mse", "softmax_kl", "tvd", "linear_kl",
                                    "train_step"}
    for spec in bench_specs.OPS.values():
        for kind in ("cpu", "cuda"):
            assert spec.cases(kind) and all(c.op == spec.name for c in spec.cases(kind))
        assert set(spec.metrics) <= set(bench_specs.METRICS)


def test_kl_grids():
    sk, lk = bench_specs.SOFTMAX_KL, bench_specs.LINEAR_KL
    assert {tuple(c.sizes.values()) for c in sk.cases("cpu")} == {
        (4096, 32000), (1024, 50257), (2048, 128256)}
    # CUDA: bf16 and fp32, forward KL and JSD
    assert len(sk.cases("cuda")) == 3 * 2 * 2 * len(bench_specs.MODES)
    assert {c.variant for c in sk.cases("cuda")} == {"kl", "jsd"}
    quick = sk.cases("cpu", quick=True)
    assert {c.sizes["N"] for c in quick} == {1024} and len(quick) == len(bench_specs.MODES)
    cuda = lk.cases("cuda")
    assert {c.variant for c in cuda} == {"teacher_logits", "teacher_hidden"}
    assert "teacher_hidden" in str(next(c for c in cuda if c.variant == "teacher_hidden"))
    fwd, both = (next(c for c in lk.cases("cpu") if c.sizes["N"] == 2048 and c.mode == m)
                 for m in ("fwd", "fwd+bwd"))
    assert lk.flops(fwd) == 2 * 2048 * 256 * 32000 and lk.flops(both) == 3 * lk.flops(fwd)
    assert sk.min_bytes(sk.cases("cpu")[1]) == 3 * 4096 * 32000 * 4  # fwd+bwd: + gradient
    for impl in ("liger", "triton", "triton/64MiB"):
        assert sk.skip_reason(impl.split("/")[0], bench_utils.torch.device("cpu"))
    assert lk.case_skip_reason("liger", fwd)  # Liger's fused loss needs the teacher's head


def _tiny(spec, impl, sizes, mode, variant=""):
    case = bench_specs.Case(spec.name, tuple(sizes.items()), torch.float64, mode, variant)
    inputs = spec.make_inputs(case, torch.device("cpu"))
    step = spec.make_step(impl, case, inputs)
    out = step()
    grads = [v.grad.clone() for v in inputs.values()
             if isinstance(v, torch.Tensor) and v.requires_grad]
    return out, grads


def test_kl_steps_agree_with_eager_on_tiny_cells():
    """Every impl runnable here computes the eager loss/gradients (float64, tiny shapes)."""
    spec = bench_specs.SOFTMAX_KL
    loss_eager, _ = _tiny(spec, "eager", {"N": 4, "V": 33}, "fwd")
    _, grad_eager = _tiny(spec, "eager", {"N": 4, "V": 33}, "fwd+bwd")
    for impl in ("cpu", "reference"):
        loss, _ = _tiny(spec, impl, {"N": 4, "V": 33}, "fwd")
        _, grad = _tiny(spec, impl, {"N": 4, "V": 33}, "fwd+bwd")
        torch.testing.assert_close(loss, loss_eager)
        torch.testing.assert_close(grad[0], grad_eager[0])
    spec = bench_specs.LINEAR_KL
    for variant in ("teacher_logits", "teacher_hidden"):
        sizes = {"N": 6, "H": 8, "V": 40}
        loss_eager, _ = _tiny(spec, "eager", sizes, "fwd", variant)
        _, grads_eager = _tiny(spec, "eager", sizes, "fwd+bwd", variant)
        assert len(grads_eager) == 2  # hidden and weight
        for impl in ("cpu", "cpu/64MiB", "reference"):
            loss, _ = _tiny(spec, impl, sizes, "fwd", variant)
            _, grads = _tiny(spec, impl, sizes, "fwd+bwd", variant)
            torch.testing.assert_close(loss, loss_eager)
            for g, g_eager in zip(grads, grads_eager):
                torch.testing.assert_close(g, g_eager)


def _fake_report(op, shape, variant=None):
    row = {"op": op, "impl": "eager", "device": "cpu", "dtype": "float32", "shape": shape,
           "mode": "fwd", "flops": 10, "min_bytes": 8, "peak_extra_memory_bytes": 1 << 20,
           "time_s": bench_utils.summarize([1e-3, 2e-3]), "flops_per_s": 1e10,
           "min_bytes_per_s": 2e9, "gemm_peak_fraction": 0.5, "bandwidth_fraction": 0.25,
           "speedup_vs_eager": 1.0, "memory_vs_eager": 1.0}
    if variant:
        row["variant"] = variant
    env = {"device": "cpu", "device_name": "test cpu", "torch": "x", "triton": "y",
           "python": "z", "torch_num_threads": 2, "date": "today"}
    return {"environment": env, "peaks": {"copy_bytes_per_s": 3e10},
            "settings": {"op": op, "quick": True, "warmup": 1, "repeats": 2},
            "skipped": [{"impl": "liger", "reason": "not here"}], "rows": [row]}


def test_markdown_columns_follow_the_op():
    mse = bench_specs.report_markdown(_fake_report("projected_mse", {"N": 1, "d_t": 2, "d_s": 3}))
    assert "| shape N x d_t x d_s | dtype |" in mse and "% peak GEMM" in mse
    kl = bench_specs.report_markdown(_fake_report("softmax_kl", {"N": 1, "V": 2}))
    assert "| shape N x V | dtype |" in kl and "| GB/s | % copy BW |" in kl
    assert "| 2.0 | 25% | 1.00 | 1.00x | 1.00x |" in kl and "Skipped `liger`" in kl
    lin = bench_specs.report_markdown(
        _fake_report("linear_kl", {"N": 1, "H": 2, "V": 3}, "teacher_logits"))
    assert "| shape N x H x V | teacher |" in lin and "| logits |" in lin
    assert "| peak extra MiB | mem vs eager | GFLOP/s |" in lin


def test_op_paths_for_all():
    from cex_kernels.cli import _op_path
    assert _op_path("r/x.json", "softmax_kl", True) == "r/x-softmax_kl.json"
    assert _op_path("r/x-{op}.md", "linear_kl", False) == "r/x-linear_kl.md"
    assert _op_path("r/x.json", "linear_kl", False) == "r/x.json"
    assert _op_path(None, "a", True) is None


def test_analytic_flops_match_flop_counter_for_matmul_ops():
    """The analytic FLOPs the tables divide by agree with FlopCounterMode on eager code."""
    for spec in (bench_specs.PROJECTED_MSE, bench_specs.LINEAR_KL):
        cases = spec.cases("cpu", quick=True)
        tiny = [bench_specs.Case(c.op, tuple((k, min(v, 64)) for k, v in c.shape), c.dtype,
                                 c.mode, *([c.variant] if c.variant else [])) for c in cases]
        for check in bench_specs.check_flops(spec, tiny, torch.device("cpu")):
            assert check["matches"], check
