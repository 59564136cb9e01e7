// CPU softmax-KL / generalized-JSD and total-variation kernels (ATen-level interface; see softmax_kl.cpp).
#pragma once
#include <ATen/ATen.h>
#include <tuple>

namespace cex {
namespace cpu {

// student, teacher: (N, V) logits of one floating dtype, unit stride in the last dimension.
// row_weight: (N,) weights w (0 = dropped row, never read). beta in [0, 1) and symmetric pick
// the row divergence L_r (KL for beta == 0, else generalized JSD or symmetric KL); the math
// and the gradients are stated once in cex_kernels/ops/_divergence.py.
// Returns (row_loss (N,) = w * L in float32 (float64 for float64 inputs),
//          grad_student = w * inv_t * dL/dz_s, grad_teacher = w * inv_t * dL/dz_t)
// with the gradients in the logits' dtype, each an empty tensor unless asked for.
// The log-softmax is taken around the raw row max (inv_t (x - max x): exact for any T and
// offset); JSD vs KL is decided on the double beta (one that rounds to 0 in fp32 is still a
// JSD). A kept row whose loss is NaN gets NaN in every entry of each requested gradient.
// grad_student_out: where to write the student's gradient (else a fresh tensor on huge
// pages): the student itself (its logits are overwritten by their gradient) or a
// contiguous tensor of its shape and dtype overlapping neither input.
std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_kl_fwd(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& row_weight,
    double inv_temperature, double beta, bool symmetric, bool grad_student, bool grad_teacher,
    const c10::optional<at::Tensor>& grad_student_out);

// Total variation distance, same inputs and outputs (no beta): L_r = 1/2 sum |p - q|,
// gradients w * inv_t * dL/dz with the subgradient sign(0) = 0 (math in softmax_kl.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> tvd_fwd(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& row_weight,
    double inv_temperature, bool grad_student, bool grad_teacher,
    const c10::optional<at::Tensor>& grad_student_out);

// Exponentials per second of the row kernels' own exp routine (the SIMD path this CPU runs)
// over an L1-resident row of n fp32 entries, `reps` sweeps on each of the intra-op threads
// at once: the exp-throughput limit the benchmarks report these kernels against.
double exp_rate(int64_t n, int64_t reps);

}  // namespace cpu
}  // namespace cex
