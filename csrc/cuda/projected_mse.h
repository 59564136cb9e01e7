// Plain C++ interface of the CUDA projected-MSE kernels: raw pointers, explicit row
// strides and a stream passed as void* so that this header (and the binding that
// includes it) needs neither torch nor the CUDA headers.
#pragma once
#include <cstdint>

#include "common.cuh"  // cex::cuda::DType

namespace cex {
namespace cuda {

// Number of column blocks the forward kernel splits d_s into; the caller allocates
// `row_partial` as a float32 array of shape (num_col_blocks, N), row-major.
int64_t projected_mse_num_col_blocks(int64_t d_s);

// For every row r of the (N, d_s) product Y = teacher @ projection, computed tile by
// tile in registers and never written out:
//   row_partial[cb, r] = sum_{c in column block cb} (student[r, c] - Y[r, c])^2   (fp32)
//   grad[r, c]         = grad_scale * (student[r, c] - Y[r, c])                  (if grad != nullptr)
// All matrices have unit stride along their last dimension; *_row_stride is the
// stride (in elements) between consecutive rows. grad has the student's dtype.
// Accumulation is in fp32 for every dtype. Returns a cudaError_t as int (0 = success).
int projected_mse_fwd(DType dtype,
                      const void* student, int64_t student_row_stride,
                      const void* teacher, int64_t teacher_row_stride,
                      const void* projection, int64_t projection_row_stride,
                      float* row_partial, void* grad, int64_t grad_row_stride,
                      int64_t n_rows, int64_t d_t, int64_t d_s, float grad_scale,
                      void* stream);

}  // namespace cuda
}  // namespace cex
