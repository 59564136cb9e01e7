// Why not at::mm_out for fp32: PyTorch's CPU fp32 GEMM is MKL's sgemm, and oneDNN's matmul
// (also inside every PyTorch with MKLDNN) ran the products of these kernels 1.04-1.5x faster
// on the 2-core AMD EPYC (Zen 4) this project is tuned on: logits h @ W^T with
// N=1024 H=256 V=32000 92 ms vs 139 ms, square 2048^3 at ~210 vs ~155 GFLOP/s, teacher
// @ projection at N=8192 d_t=1024 d_s=256 20 vs 25 ms (2026-12-02). bf16 products already
// go to oneDNN inside at::mm_out (fp16 ones where the CPU computes fp16), so only fp32 is
// rerouted.
//
// PyTorch does not ship the header of at::native::mkldnn_matmul, and builds without
// MKLDNN (some macOS/ARM wheels) lack the symbol, so it is declared here as a weak
// reference: null when the loaded libtorch_cpu does not export it (a build without
// MKLDNN, or a future signature change), and then at::mm_out runs instead. A call that
// throws (an older PyTorch that refuses fp32 there) turns the route off for the process.
// x86-64 Linux only: measured there (AMD Zen 4; not on Intel, where MKL is at home); on
// ARM, oneDNN's fp32 matmul goes through ACL, not measured against OpenBLAS.
#include "matmul.h"

#include <ATen/Context.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__linux__) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CEX_ONEDNN_WEAK 1
namespace at {
namespace native {
// aten/src/ATen/native/mkldnn/Matmul.h: result = alpha * mat1 @ mat2 + beta * result.
__attribute__((weak)) void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2,
                                         const Tensor& result, float beta, float alpha);
}  // namespace native
}  // namespace at
#endif

namespace cex {
namespace cpu {
namespace {

std::atomic<bool> onednn_failed{false};

bool disabled_by_env() {
  static const bool disabled = [] {
    const char* v = std::getenv("CEX_DISABLE_ONEDNN");
    return v != nullptr && std::strcmp(v, "") != 0 && std::strcmp(v, "0") != 0;
  }();
  return disabled;
}

// oneDNN reads a 2-D operand in place when it is row-major or the transpose of a
// row-major matrix; anything else (a strided row view) it would first copy.
bool plain_or_transposed(const at::Tensor& t) {
  if (t.is_contiguous()) return true;
  return t.stride(0) == 1 && t.stride(1) == t.size(0);
}

bool takes_onednn_route(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (!onednn_matmul_enabled()) return false;
  if (a.scalar_type() != at::kFloat || b.scalar_type() != at::kFloat ||
      out.scalar_type() != at::kFloat) {
    return false;
  }
  if (a.numel() == 0 || b.numel() == 0 || out.numel() == 0) return false;
  return out.is_contiguous() && plain_or_transposed(a) && plain_or_transposed(b);
}

}  // namespace

bool onednn_matmul_enabled() {
#ifdef CEX_ONEDNN_WEAK
  return &at::native::mkldnn_matmul != nullptr && !onednn_failed.load() &&
         !disabled_by_env() && at::globalContext().userEnabledMkldnn() &&
         at::hasMKLDNN();
#else
  return false;
#endif
}

void matmul_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 2 && a.size(1) == b.size(0) &&
                  out.size(0) == a.size(0) && out.size(1) == b.size(1),
              "cex cpu matmul_into: shapes do not chain: out ", out.sizes(), ", a ", a.sizes(),
              ", b ", b.sizes());
#ifdef CEX_ONEDNN_WEAK
  if (takes_onednn_route(out, a, b)) {
    try {
      at::native::mkldnn_matmul(a, b, out, accumulate ? 1.0f : 0.0f, 1.0f);
      return;
    } catch (const c10::Error& e) {
      onednn_failed.store(true);
      TORCH_WARN_ONCE("cex_kernels: oneDNN's fp32 matmul failed (", e.what_without_backtrace(),
                      "); using at::mm from now on");
    }
  }
#endif
  if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

}  // namespace cpu
}  // namespace cex
