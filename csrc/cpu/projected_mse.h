// CPU projected-MSE kernel (ATen-level interface; see projected_mse.cpp for the math).
#pragma once
#include <ATen/ATen.h>
#include <tuple>

namespace cex {
namespace cpu {

// student (N, d_s), teacher (N, d_t), projection (d_t, d_s); same floating dtype, unit
// stride in the last dimension. Returns (row_sq_err (N,) in float32, float64 for float64 inputs, grad (N, d_s) in the
// student's dtype, or an empty tensor when compute_grad is false), where
// row_sq_err[r] = sum_c (student - teacher @ projection)[r, c]^2 and
// grad = grad_scale * (student - teacher @ projection).
std::tuple<at::Tensor, at::Tensor> projected_mse_fwd(const at::Tensor& student,
                                                     const at::Tensor& teacher,
                                                     const at::Tensor& projection,
                                                     double grad_scale, bool compute_grad);

}  // namespace cpu
}  // namespace cex
