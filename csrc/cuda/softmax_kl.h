// Plain C++ interface of the CUDA softmax-KL / generalized-JSD kernel: raw pointers,
// explicit row strides and a stream passed as void*, so this header (and the binding that
// includes it) needs neither torch nor the CUDA headers.
#pragma once
#include <cstdint>

#include "common.cuh"  // cex::cuda::DType

namespace cex {
namespace cuda {

// For every row r of the (n_rows, V) logits, beta in [0, 1) and symmetric pick the row
// divergence L (KL for beta == 0, else generalized JSD or symmetric KL; the math and the
// gradients are stated once in cex_kernels/ops/_divergence.py):
//   row_loss[r]     = w[r] * L                       (fp32; 0 where w[r] == 0)
//   grad_student[r] = w[r] * inv_t * dL/dz_student   (if grad_student != nullptr)
//   grad_teacher[r] = w[r] * inv_t * dL/dz_teacher   (if grad_teacher != nullptr)
// Logits have unit stride along V; *_row_stride is the stride between rows (elements).
// The gradients are contiguous (row stride V) in the logits' dtype. Rows with w == 0 are
// not read and get zero gradients. fp32 accumulation, with the log-softmax taken around the
// raw row max (inv_t (x - max x), exact for any T). A kept row whose loss is NaN gets NaN in
// every entry of each requested gradient. beta is a double: JSD vs KL is decided on it (a
// beta that rounds to 0 in fp32 is still a JSD; symmetric with a beta that rounds to 0 in
// fp32 is the forward KL). Returns a cudaError_t as int.
int softmax_kl_fwd(DType dtype,
                   const void* student, int64_t student_row_stride,
                   const void* teacher, int64_t teacher_row_stride,
                   const float* row_weight, float* row_loss,
                   void* grad_student, void* grad_teacher,
                   int64_t n_rows, int64_t V, float inv_temperature, double beta,
                   bool symmetric, void* stream);

}  // namespace cuda
}  // namespace cex
