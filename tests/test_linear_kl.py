"""linear_kl against the float64 eager reference (logits materialized, then the eager KL)."""
import pytest
import torch

import cex_kernels
from cex_kernels import _backends
import oracle
from conftest import (HAS_CUDA, assert_close_to_reference, backend_cases,
                      math_mode_dtypes, no_triton_reason, skip_unsupported, triton_device)

DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def make(n=23, hidden=16, vocab=37, t_hidden=12, dtype=torch.float32, device="cpu", seed=0,
         lead=None):
    gen = torch.Generator().manual_seed(seed)
    lead = lead or (n,)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    return dict(
        student_hidden=rnd(*lead, hidden), student_weight=rnd(vocab, hidden, scale=0.5),
        student_bias=rnd(vocab, scale=0.1), teacher_logits=rnd(*lead, vocab, scale=2.0),
        teacher_hidden=rnd(*lead, t_hidden), teacher_weight=rnd(vocab, t_hidden, scale=0.5),
        teacher_bias=rnd(vocab, scale=0.1),
        labels=torch.randint(0, vocab, lead, generator=gen).to(device),
        mask=(torch.rand(lead, generator=gen) > 0.25).to(device))


CASES = [
    # (teacher given as, bias, mask, labels-with-ignore, hard-label weight, direction, beta, T)
    ("logits", False, False, False, 0.0, "forward", None, 1.0),
    ("logits", True, True, False, 0.0, "reverse", None, 2.0),
    ("hidden", True, False, True, 0.0, "forward", None, 1.0),
    ("hidden", False, True, True, 0.5, "forward", None, 1.5),
    ("logits", True, False, True, 1.0, "forward", 0.5, 1.0),
    ("hidden", True, True, False, 0.0, "forward", 0.3, 3.0),
]


def _call(fn, inputs, case, reduction, **kw):
    teacher, bias, use_mask, use_labels, hard, direction, beta, temperature = case
    labels = inputs["labels"].clone()
    if use_labels:
        labels[::4] = -100
    args = dict(temperature=temperature, reduction=reduction,
                mask=inputs["mask"] if use_mask else None,
                labels=labels if (use_labels or hard) else None, hard_label_weight=hard)
    if beta is not None:
        args["beta"] = beta
    else:
        args["direction"] = direction
    if bias:
        args["student_bias"] = inputs["student_bias"]
    if teacher == "logits":
        return fn(inputs["student_hidden"], inputs["student_weight"], inputs["teacher_logits"],
                  **args, **kw)
    return fn(inputs["student_hidden"], inputs["student_weight"],
              teacher_hidden=inputs["teacher_hidden"], teacher_weight=inputs["teacher_weight"],
              teacher_bias=inputs["teacher_bias"] if bias else None, **args, **kw)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_loss_and_gradients_match_reference(device, backend, dtype, reduction, case):
    skip_unsupported(device, backend, dtype)
    # chunk_bytes small enough for several chunks (at most 7 rows each, whatever the backend)
    _check_against_oracle(make(dtype=dtype, device=device), case, reduction, dtype, device,
                          backend, chunk_bytes=7 * 37 * 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("chunk_bytes", [1 << 30, 5 * 37 * 4], ids=["one_chunk", "chunks"])
def test_cpu_one_chunk_or_several(dtype, chunk_bytes):
    """The cpu driver's paths: the logits buffer overwritten by its gradient (rows padded to
    a cache line for fp32), the cross-entropy read before that, d weight allocated by the
    first chunk (bf16 with one chunk: its bf16 product is d weight itself)."""
    case = ("hidden", True, True, True, 0.5, "forward", None, 1.5)
    _check_against_oracle(make(dtype=dtype), case, "batchmean", dtype, "cpu", "cpu",
                          chunk_bytes=chunk_bytes)


def _check_against_oracle(inputs, case, reduction, dtype, device, backend, **kw):
    for name in ("student_hidden", "student_weight", "student_bias"):
        inputs[name].requires_grad_()
    loss = _call(cex_kernels.linear_kl, inputs, case, reduction, backend=backend, **kw)
    ref_inputs = {k: (v.detach().double().cpu().requires_grad_(v.requires_grad)
                      if v.dtype.is_floating_point else v.cpu()) for k, v in inputs.items()}
    expected = _call(oracle.linear_kl, ref_inputs, case, reduction)
    assert loss.dtype == dtype and loss.shape == expected.shape
    assert_close_to_reference(loss, expected, dtype, f"{backend} loss")

    upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64)
    names = ["student_hidden", "student_weight"] + (["student_bias"] if case[1] else [])
    grads = torch.autograd.grad(loss, [inputs[n] for n in names], upstream.to(dtype=dtype, device=device))
    ref_grads = torch.autograd.grad(expected, [ref_inputs[n] for n in names], upstream)
    for name, g, rg in zip(names, grads, ref_grads):
        assert_close_to_reference(g, rg, dtype, f"{backend} grad of {name}")


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_gradcheck_float64(reduction):
    inputs = make(n=5, hidden=4, vocab=7, t_hidden=3, dtype=torch.float64)
    h, w, b = (inputs[k].requires_grad_() for k in ("student_hidden", "student_weight", "student_bias"))
    t = inputs["teacher_logits"]
    assert torch.autograd.gradcheck(
        lambda h, w, b: cex_kernels.linear_kl(h, w, t, student_bias=b, temperature=1.7,
                                              reduction=reduction, hard_label_weight=0.3,
                                              labels=inputs["labels"], backend="cpu",
                                              chunk_bytes=2 * 7 * 8),
        (h, w, b))


@pytest.mark.parametrize("device,backend", backend_cases())
def test_opcheck(device, backend):
    inputs = make(n=9, device=device)
    h = inputs["student_hidden"].requires_grad_()
    kd = torch.full((9,), 1 / 9, device=device)
    ce = torch.full((9,), 1 / 9, device=device)
    labels = inputs["labels"].long()
    for reduction, soft, hard, parts in (("batchmean", 1.0, 0.0, False), ("none", 1.0, 0.0, False),
                                         ("sum", 0.5, 0.3, True), ("none", 0.0, 1.0, True)):
        args = (h, inputs["student_weight"], inputs["student_bias"], [inputs["teacher_logits"]],
                kd, ce if hard or parts else None, labels if hard or parts else None, None,
                soft, hard, 2.0, 0.0, False, reduction, True, parts, "logits", "kl", backend, 4)
        torch.library.opcheck(torch.ops.cex.linear_loss_chunked.default, args)
        if backend == "triton":
            torch.library.opcheck(torch.ops.cex.linear_kl_tiled.default, args[:16])


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    inputs = make(n=12, device=device)
    h = inputs["student_hidden"].requires_grad_()

    def step(h, w, t):
        return cex_kernels.linear_kl(h, w, t, temperature=2.0, chunk_bytes=5 * 37 * 4)

    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(h, inputs["student_weight"],
                                                                    inputs["teacher_logits"])
    (grad,) = torch.autograd.grad(loss, h)
    ref_h = h.detach().double().requires_grad_()
    ref = oracle.linear_kl(ref_h, inputs["student_weight"].double(),
                              inputs["teacher_logits"].double(), temperature=2.0)
    (ref_grad,) = torch.autograd.grad(ref, ref_h)
    assert_close_to_reference(loss, ref, torch.float32, "compiled loss")
    assert_close_to_reference(grad, ref_grad, torch.float32, "compiled grad")


def test_leading_dims_and_all_rows_dropped():
    inputs = make(lead=(2, 5))
    h = inputs["student_hidden"].requires_grad_()
    rows = cex_kernels.linear_kl(h, inputs["student_weight"], inputs["teacher_logits"], reduction="none")
    assert rows.shape == (2, 5)
    none_kept = torch.zeros(2, 5, dtype=torch.bool)
    loss = cex_kernels.linear_kl(h, inputs["student_weight"], inputs["teacher_logits"], mask=none_kept)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(h.grad) == 0


def test_bad_input_errors_name_shapes():
    inputs = make()
    h, w, t = inputs["student_hidden"], inputs["student_weight"], inputs["teacher_logits"]
    with pytest.raises(ValueError, match=r"\(37, 16\)"):
        cex_kernels.linear_kl(h[:, :15], w, t)
    with pytest.raises(ValueError, match=r"teacher_logits must be \(23, 37\)"):
        cex_kernels.linear_kl(h, w, t[:, :30])
    with pytest.raises(ValueError, match="not both"):
        cex_kernels.linear_kl(h, w, t, teacher_hidden=inputs["teacher_hidden"],
                              teacher_weight=inputs["teacher_weight"])
    with pytest.raises(ValueError, match="teacher_weight must be"):
        cex_kernels.linear_kl(h, w, teacher_hidden=inputs["teacher_hidden"],
                              teacher_weight=inputs["teacher_weight"][:5])
    with pytest.raises(ValueError, match="needs labels"):
        cex_kernels.linear_kl(h, w, t, hard_label_weight=0.5)
    bad_labels = inputs["labels"].clone()
    bad_labels[3] = 37
    with pytest.raises(ValueError, match=r"\[0, 37\)"):
        cex_kernels.linear_kl(h, w, t, labels=bad_labels, hard_label_weight=0.5)
    with pytest.raises(ValueError, match="temperature"):
        cex_kernels.linear_kl(h, w, t, temperature=0.0)
    with pytest.raises(TypeError, match="bfloat16"):
        cex_kernels.linear_kl(h, w.bfloat16(), t)
    with pytest.raises(ValueError, match="not both"):
        cex_kernels.linear_kl(h, w, t, direction="reverse", beta=0.5)


def test_memory_is_bounded_by_the_chunk():
    """Peak extra memory follows chunk_bytes, not N: the (N, V) logits never exist, and the
    per-chunk buffers stay within chunk_bytes (the cpu backend writes each chunk's gradient
    over its logits, so a chunk is one (rows, V) buffer)."""
    from cex_kernels.benchmarking.measure import peak_extra_memory
    n, hidden, vocab = 512, 32, 4096
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, hidden, generator=gen, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=gen, requires_grad=True)
    t = torch.randn(n, vocab, generator=gen)
    logits_bytes = n * vocab * 4

    def step():
        cex_kernels.linear_kl(h, w, t, backend="cpu", chunk_bytes=1 << 20).backward()
        h.grad = w.grad = None

    peak = peak_extra_memory(step, "cpu")
    grads = (n * hidden + vocab * hidden) * 4
    assert peak < grads + logits_bytes / 4, (peak, logits_bytes)
    # + row vectors, and oneDNN's per-GEMM scratchpad (packing buffers: ~200 KiB here)
    # when fp32 products go there (csrc/cpu/matmul.cpp)
    scratch = (512 << 10) if _backends.onednn_fp32_matmul() else 0
    assert peak <= grads + (1 << 20) + (64 << 10) + scratch, (peak, grads)


def test_default_chunk_budget():
    """chunk_bytes=None (the default): 64 MiB of chunk buffers for fp32 on the CPU, 256 MiB
    otherwise; the same loss and gradients as one big chunk."""
    from cex_kernels.benchmarking.measure import peak_extra_memory
    from cex_kernels.ops._fused_linear import default_chunk_bytes
    assert default_chunk_bytes(torch.empty(1)) == 64 << 20
    assert default_chunk_bytes(torch.empty(1, dtype=torch.float64)) == 64 << 20
    assert default_chunk_bytes(torch.empty(1, dtype=torch.bfloat16)) == 256 << 20
    n, hidden, vocab = 1024, 8, 32768  # fp32 logits: 128 MiB
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, hidden, generator=gen, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=gen, requires_grad=True)
    t = torch.randn(n, vocab, generator=gen)
    grads = {}

    def step(**kwargs):
        loss = cex_kernels.linear_kl(h, w, t, backend="cpu", **kwargs)
        loss.backward()
        grads[kwargs.get("chunk_bytes")] = (loss.detach(), h.grad, w.grad)
        h.grad = w.grad = None

    peak = peak_extra_memory(step, "cpu")
    step(chunk_bytes=1 << 30)
    grad_bytes = (n * hidden + vocab * hidden) * 4
    # + row vectors, and oneDNN's GEMM scratchpad (~1.1 MiB at this shape) when it runs
    scratch = (2 << 20) if _backends.onednn_fp32_matmul() else (64 << 10)
    assert peak <= grad_bytes + (64 << 20) + scratch, peak
    for got, want in zip(grads[None], grads[1 << 30]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_module_front_end():
    inputs = make()
    loss_fn = cex_kernels.LinearKLLoss(temperature=2.0, hard_label_weight=0.25)
    got = loss_fn(inputs["student_hidden"], inputs["student_weight"], inputs["teacher_logits"],
                  labels=inputs["labels"])
    want = cex_kernels.linear_kl(inputs["student_hidden"], inputs["student_weight"],
                                 inputs["teacher_logits"], temperature=2.0,
                                 hard_label_weight=0.25, labels=inputs["labels"])
    torch.testing.assert_close(got, want)
    assert "hard_label_weight=0.25" in repr(loss_fn)


TILED_CASES = [c for c in CASES if c[0] == "logits" and c[6] is None] + [
    ("logits", True, True, True, 0.7, "reverse", None, 1.3),
    ("logits", False, False, False, 0.0, "forward", 1.0, 0.8),  # beta=1: reverse KL
]


@pytest.mark.parametrize("device,backend", [c for c in backend_cases() if c.values[1] == "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("case", TILED_CASES, ids=lambda c: "-".join(map(str, c)))
def test_tiled_algorithm_matches_reference(device, backend, dtype, reduction, case):
    skip_unsupported(device, backend, dtype)
    inputs = make(n=37, vocab=70, dtype=dtype, device=device)  # tails in rows and vocabulary
    for name in ("student_hidden", "student_weight", "student_bias"):
        inputs[name].requires_grad_()
    loss = _call(cex_kernels.linear_kl, inputs, case, reduction, backend=backend,
                 algorithm="tiled")
    ref_inputs = {k: (v.detach().double().cpu().requires_grad_(v.requires_grad)
                      if v.dtype.is_floating_point else v.cpu()) for k, v in inputs.items()}
    expected = _call(oracle.linear_kl, ref_inputs, case, reduction)
    assert_close_to_reference(loss, expected, dtype, "tiled loss")
    upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64)
    names = ["student_hidden", "student_weight"] + (["student_bias"] if case[1] else [])
    grads = torch.autograd.grad(loss, [inputs[n] for n in names],
                                upstream.to(dtype=dtype, device=device))
    ref_grads = torch.autograd.grad(expected, [ref_inputs[n] for n in names], upstream)
    for name, g, rg in zip(names, grads, ref_grads):
        assert_close_to_reference(g, rg, dtype, f"tiled grad of {name}")


@pytest.mark.parametrize("device,backend", [c for c in backend_cases() if c.values[1] == "triton"])
def test_tiled_infinite_teacher_logits(device, backend):
    """-inf teacher logits (a masked vocabulary) are legal: 0 log 0 = 0."""
    inputs = make(n=5, vocab=40, device=device)
    t = inputs["teacher_logits"].clone()
    t[:, 30:] = float("-inf")
    h = inputs["student_hidden"].requires_grad_()
    loss = cex_kernels.linear_kl(h, inputs["student_weight"], t, backend=backend, algorithm="tiled")
    ref_h = h.detach().double().cpu().requires_grad_()
    ref = oracle.linear_kl(ref_h, inputs["student_weight"].double().cpu(), t.double().cpu())
    assert torch.isfinite(loss)
    assert_close_to_reference(loss, ref, torch.float32, "tiled -inf loss")
    loss.backward()
    ref.backward()
    assert_close_to_reference(h.grad, ref_h.grad, torch.float32, "tiled -inf grad")


def test_tiled_algorithm_refuses_what_it_does_not_do():
    inputs = make()
    h, w = inputs["student_hidden"], inputs["student_weight"]
    with pytest.raises(ValueError, match="backend='triton'"):
        cex_kernels.linear_kl(h, w, inputs["teacher_logits"], backend="cpu", algorithm="tiled")
    if not any(c.values[1] == "triton" for c in backend_cases()):
        return
    device = [c.values[0] for c in backend_cases() if c.values[1] == "triton"][0]
    inputs = make(device=device)
    with pytest.raises(ValueError, match="JSD"):
        cex_kernels.linear_kl(inputs["student_hidden"], inputs["student_weight"],
                              inputs["teacher_logits"], beta=0.5, backend="triton",
                              algorithm="tiled")
    with pytest.raises(ValueError, match="teacher_logits"):
        cex_kernels.linear_kl(inputs["student_hidden"], inputs["student_weight"],
                              teacher_hidden=inputs["teacher_hidden"],
                              teacher_weight=inputs["teacher_weight"], backend="triton",
                              algorithm="tiled")


def _tiled_gpu_config_cases():
    if triton_device() is None:  # the kernel modules need a usable Triton to import
        return []
    from cex_kernels.triton.linear_kl import GRAD_CONFIG, STATS_CONFIG
    return [pytest.param(key[0], STATS_CONFIG[key], GRAD_CONFIG[key],
                         id=f"{key[0]}-{'aligned' if key[1] else 'unaligned'}")
            for key in STATS_CONFIG]


@pytest.mark.skipif(triton_device() is None, reason=no_triton_reason())
@pytest.mark.parametrize("mode,stats_config,grad_config", _tiled_gpu_config_cases())
# (N, H, V): sizes divisible by 16 (what the aligned configs are chosen for), then odd ones.
@pytest.mark.parametrize("shape", [(160, 64, 320), (70, 40, 203)], ids=["aligned", "odd"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
# Vocabulary splits merged on the host: the interpreter's default 2, and one per tile (a
# GPU splits a short batch's vocabulary that finely).
@pytest.mark.parametrize("splits", [None, 1000], ids=["2-splits", "split-per-tile"])
def test_tiled_every_gpu_config(mode, stats_config, grad_config, shape, reverse, splits):
    """Each block shape the tiled kernels launch with on a GPU computes the same losses and
    gradients, launched directly with that config (under the interpreter without a GPU)."""
    from cex_kernels.triton.linear_kl import linear_kl_tiled
    device = triton_device()
    n, hidden, vocab = shape
    with math_mode_dtypes(mode, device) as dtypes:
        for dtype, tol in dtypes:
            inputs = make(n=n, hidden=hidden, vocab=vocab, dtype=dtype, device=device, seed=3)
            h, w, b = inputs["student_hidden"], inputs["student_weight"], inputs["student_bias"]
            t, labels = inputs["teacher_logits"], inputs["labels"]
            kd_weight = inputs["mask"].float() * 0.7
            ce_weight = torch.full((n,), 0.3, device=device)
            rows, d_h, d_w, d_b = linear_kl_tiled(
                h, w, b, t, labels, kd_weight, ce_weight, 2.0, reverse, True,
                stats_config=stats_config, grad_config=grad_config, splits=splits)

            h64, w64, b64 = (x.detach().double().cpu().requires_grad_() for x in (h, w, b))
            z = h64 @ w64.T + b64
            log_p = torch.log_softmax(z / 2.0, -1)
            log_q = torch.log_softmax(t.double().cpu() / 2.0, -1)
            kl = ((log_p.exp() * (log_p - log_q)) if reverse else (log_q.exp() * (log_q - log_p))).sum(-1)
            ce = torch.nn.functional.cross_entropy(z, labels.cpu(), reduction="none")
            want = kd_weight.double().cpu() * kl + 0.3 * ce
            want.sum().backward()
            assert_close_to_reference(rows, want, tol, f"{dtype} rows")
            for name, got, ref in (("hidden", d_h, h64.grad), ("weight", d_w, w64.grad),
                                   ("bias", d_b, b64.grad)):
                assert_close_to_reference(got, ref, tol, f"{dtype} d {name}")


@pytest.mark.gpu
@pytest.mark.skipif(triton_device() != "cuda", reason="needs a CUDA GPU with Triton")
def test_tiled_weight_offsets_past_2_31():
    """V x H > 2^31 elements: the weight's offsets need 64 bits (a 4.3 GB bf16 W, 8.6 GB
    fp32 d W). The teacher puts its mass on the last vocabulary entries, past element
    2^31 of W, so a wrapped offset would change the loss and their gradients."""
    from cex_kernels.triton.linear_kl import linear_kl_tiled
    n, hidden, vocab = 16, 2**14, 2**17 + 64
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, hidden, device="cuda", generator=gen).to(torch.bfloat16)
    w = (torch.randn(vocab, hidden, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    t = torch.zeros(n, vocab, device="cuda", dtype=torch.bfloat16)
    t[:, -64:] = 20.0
    kd_weight = torch.ones(n, device="cuda")
    rows, d_h, d_w, _ = linear_kl_tiled(h, w, None, t, None, kd_weight, None, 1.0, False, True)

    w32 = w.float()  # fp32 references (8.6 GB): bf16 tolerances apply anyway
    logits = (h.float() @ w32.T).double()
    log_p = torch.log_softmax(logits, -1)
    q = torch.softmax(t.double(), -1)
    want = (q * (torch.log(q) - log_p)).sum(-1)
    g = (torch.softmax(logits, -1) - q).float()  # d loss / d logits, per row
    assert_close_to_reference(rows, want, torch.bfloat16, "rows")
    assert_close_to_reference(d_h, g @ w32, torch.bfloat16, "d hidden")
    assert_close_to_reference(d_w[-64:], g[:, -64:].T @ h.float(), torch.bfloat16,
                              "d weight, last rows")
