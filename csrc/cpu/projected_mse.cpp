// Fused projected MSE on the CPU.
//
// Math: Y = T @ P (N x d_s, never materialized in full), D = S - Y,
//   row_sq_err[r] = sum_c D[r, c]^2,   grad = grad_scale * D  (optional).
// FLOPs: 2 * N * d_t * d_s (the product) + 4 * N * d_s (epilogue).
// Minimal bytes: read S, T, P once; write grad (N * d_s) and row_sq_err (4 * N).
//
// Strategy. With a gradient (fp32, fp64, bf16: projected_mse_into_grad below) the product
// is formed in the gradient's own memory by one GEMM over all rows, then each row's
// epilogue turns it into the gradient in place: no memory beyond the gradient, and one
// GEMM threaded by the library beats per-thread tiles (fp32 fwd+bwd at N=8192 d_t=1024
// d_s=256: 24.1 vs 24.5 ms; N=2048 d_t=512 d_s=128: 2.33 vs 2.67 ms; bf16 12.6 vs 13.3 ms;
// 2-core EPYC, 2026-12-02). Without a gradient (or for fp16, whose product is formed in
// fp32) rows are processed in blocks of `rows_per_block`, sized so that the product tile
// (rows_per_block x d_s) plus its teacher rows stay in L2: each block's tile comes from a
// single-threaded GEMM into a per-thread scratch buffer and is consumed while hot by a
// fused epilogue that subtracts, squares and reduces in one sweep. Blocks run in
// parallel with at::parallel_for (OpenMP). Extra memory: one tile per thread.
// GEMMs go through matmul_into (matmul.h): oneDNN for fp32, at::mm_out otherwise.
#include "projected_mse.h"

#include "huge_pages.h"
#include "matmul.h"

#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace cex {
namespace cpu {
namespace {

// About 256 KiB of fp32 tile per block (at least 16 rows so the GEMM stays efficient),
// then evened out so the number of blocks is a multiple of the thread count: with few
// cores one extra block on one thread is a visible share of the time.
int64_t rows_per_block(int64_t d_s, int64_t n_rows) {
  const int64_t target_tile_floats = 64 * 1024;
  int64_t rows = std::max<int64_t>(16, target_tile_floats / std::max<int64_t>(d_s, 1));
  rows = std::min<int64_t>(rows, 512);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t n_blocks = (n_rows + rows - 1) / rows;
  n_blocks = ((n_blocks + threads - 1) / threads) * threads;
  rows = (n_rows + n_blocks - 1) / n_blocks;
  return std::max<int64_t>(1, std::min(rows, n_rows));
}

// Element conversions. c10's bf16 <-> float conversions branch (NaN checks), which stops
// `omp simd` from vectorizing the epilogue; these are the same roundings written as
// straight-line bit arithmetic (round to nearest even; NaN -> the canonical bf16 NaN).
template <typename acc_t, typename T>
inline acc_t widen(T x) { return static_cast<acc_t>(x); }
template <>
inline float widen<float, c10::BFloat16>(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
template <typename T, typename acc_t>
inline T narrow(acc_t x) { return static_cast<T>(x); }
template <>
inline c10::BFloat16 narrow<c10::BFloat16, float>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const uint16_t out = (x != x) ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
  return c10::BFloat16(out, c10::BFloat16::from_bits());
}

// One row of the epilogue: returns sum (s - y)^2 and writes grad_scale * (s - y).
template <typename scalar_t, typename tile_t, typename acc_t>
acc_t epilogue_row(const scalar_t* s, const tile_t* y, scalar_t* grad, int64_t d_s,
                   acc_t grad_scale) {
  acc_t acc = 0;
  if (grad != nullptr) {
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < d_s; ++c) {
      const acc_t d = widen<acc_t>(s[c]) - widen<acc_t>(y[c]);
      acc += d * d;
      grad[c] = narrow<scalar_t>(grad_scale * d);
    }
  } else {
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < d_s; ++c) {
      const acc_t d = widen<acc_t>(s[c]) - widen<acc_t>(y[c]);
      acc += d * d;
    }
  }
  return acc;
}

// acc_t is the accumulation type: float for fp32/fp16/bf16, double for float64.
// tile_t is the GEMM's type: the input's own for fp32/fp64 and for bf16 (the CPU's native
// bf16 GEMM accumulates in fp32 and rounds the product to bf16, as eager PyTorch does; it
// is ~3x faster than widening), fp32 for fp16 (no fast fp16 GEMM on CPUs).
template <typename scalar_t, typename tile_t, typename acc_t>
void projected_mse_blocks(const at::Tensor& student, const at::Tensor& teacher,
                          const at::Tensor& projection_tile, at::Tensor& row_sq_err,
                          at::Tensor& grad, acc_t grad_scale) {
  const int64_t n_rows = student.size(0);
  const int64_t d_t = teacher.size(1);
  const int64_t d_s = student.size(1);
  const int64_t block = rows_per_block(d_s, n_rows);
  const int64_t n_blocks = (n_rows + block - 1) / block;
  const bool widen_teacher = !std::is_same<scalar_t, tile_t>::value;
  const auto tile_dtype = projection_tile.scalar_type();
  const bool write_grad = grad.defined() && grad.numel() > 0;

  const scalar_t* s_base = student.data_ptr<scalar_t>();
  const int64_t s_stride = student.stride(0);
  scalar_t* g_base = write_grad ? grad.data_ptr<scalar_t>() : nullptr;
  const int64_t g_stride = write_grad ? grad.stride(0) : 0;
  acc_t* loss = row_sq_err.data_ptr<acc_t>();

  at::parallel_for(0, n_blocks, 1, [&](int64_t b_begin, int64_t b_end) {
    c10::InferenceMode no_autograd;  // worker threads do not inherit the caller's dispatch state
    auto tile_opts = teacher.options().dtype(tile_dtype);
    at::Tensor tile = at::empty({block, d_s}, tile_opts);
    at::Tensor teacher_wide = widen_teacher ? at::empty({block, d_t}, tile_opts) : at::Tensor();
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t r0 = b * block;
      const int64_t rows = std::min(block, n_rows - r0);
      at::Tensor t_rows = teacher.narrow(0, r0, rows);
      if (widen_teacher) {  // fp16: widen the block once, multiply in fp32
        t_rows = teacher_wide.narrow(0, 0, rows).copy_(t_rows);
      }
      at::Tensor y = tile.narrow(0, 0, rows);
      matmul_into(y, t_rows, projection_tile, /*accumulate=*/false);
      const tile_t* y_base = y.data_ptr<tile_t>();
      for (int64_t r = 0; r < rows; ++r) {
        loss[r0 + r] = epilogue_row<scalar_t, tile_t, acc_t>(
            s_base + (r0 + r) * s_stride, y_base + r * d_s,
            write_grad ? g_base + (r0 + r) * g_stride : nullptr, d_s, grad_scale);
      }
    }
  });
}

// With a gradient (the strategy above): one GEMM into the gradient's memory, then the
// epilogue in place. The product is rounded to the input dtype first (bf16: as eager).
template <typename scalar_t, typename acc_t>
void projected_mse_into_grad(const at::Tensor& student, const at::Tensor& teacher,
                             const at::Tensor& projection_tile, at::Tensor& row_sq_err,
                             at::Tensor& grad, acc_t grad_scale) {
  matmul_into(grad, teacher, projection_tile, /*accumulate=*/false);
  const int64_t n_rows = student.size(0), d_s = student.size(1);
  const scalar_t* s_base = student.data_ptr<scalar_t>();
  const int64_t s_stride = student.stride(0);
  scalar_t* g_base = grad.data_ptr<scalar_t>();
  acc_t* loss = row_sq_err.data_ptr<acc_t>();
  at::parallel_for(0, n_rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(d_s, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* g = g_base + r * d_s;  // holds the product's row, read before overwritten
      loss[r] = epilogue_row<scalar_t, scalar_t, acc_t>(s_base + r * s_stride, g, g, d_s,
                                                        grad_scale);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> projected_mse_fwd(const at::Tensor& student,
                                                     const at::Tensor& teacher,
                                                     const at::Tensor& projection,
                                                     double grad_scale, bool compute_grad) {
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu() && projection.device().is_cpu(),
              "cex cpu projected_mse: all tensors must be on the CPU");
  TORCH_CHECK(student.dim() == 2 && teacher.dim() == 2 && projection.dim() == 2,
              "cex cpu projected_mse: expected 2-D student, teacher and projection");
  TORCH_CHECK(student.size(0) == teacher.size(0) && projection.size(0) == teacher.size(1) &&
                  projection.size(1) == student.size(1),
              "cex cpu projected_mse: shapes do not chain: student ", student.sizes(),
              ", teacher ", teacher.sizes(), ", projection ", projection.sizes());
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type() &&
                  teacher.scalar_type() == projection.scalar_type(),
              "cex cpu projected_mse: dtypes differ");
  TORCH_CHECK(student.stride(1) == 1 || student.size(1) <= 1,
              "cex cpu projected_mse: student needs unit stride in its last dimension");

  const int64_t n_rows = student.size(0);
  // float64 inputs keep float64 throughout (gradcheck); everything else accumulates in fp32.
  const auto acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor row_sq_err = at::zeros({n_rows}, student.options().dtype(acc_dtype));
  at::Tensor grad = compute_grad ? empty_huge_pages(student.sizes(), student.options())
                                 : at::empty({0}, student.options());
  if (n_rows == 0) return {row_sq_err, grad};
  if (student.size(1) == 0) {  // nothing to compare: zero loss, empty gradient
    return {row_sq_err, grad};
  }
  if (teacher.size(1) == 0) {  // empty product: Y = 0
    at::Tensor zeros_t = at::zeros({n_rows, 1}, teacher.options());
    at::Tensor zeros_p = at::zeros({1, student.size(1)}, projection.options());
    return projected_mse_fwd(student, zeros_t, zeros_p, grad_scale, compute_grad);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(),
                                  "cex_projected_mse_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using tile_t = std::conditional_t<std::is_same<scalar_t, at::Half>::value, float, scalar_t>;
    const at::Tensor projection_tile =
        projection.to(c10::CppTypeToScalarType<tile_t>::value).contiguous();
    if constexpr (std::is_same<scalar_t, tile_t>::value) {
      if (compute_grad) {
        projected_mse_into_grad<scalar_t, acc_t>(student, teacher, projection_tile, row_sq_err,
                                                 grad, static_cast<acc_t>(grad_scale));
        return;
      }
    }
    projected_mse_blocks<scalar_t, tile_t, acc_t>(student, teacher, projection_tile, row_sq_err,
                                                  grad, static_cast<acc_t>(grad_scale));
  });
  return {row_sq_err, grad};
}

}  // namespace cpu
}  // namespace cex
