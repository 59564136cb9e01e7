// out = a @ b (or out += a @ b) on the CPU, through the fastest GEMM PyTorch ships.
#pragma once
#include <ATen/ATen.h>

namespace cex {
namespace cpu {

// Writes a @ b into `out` (adds it when `accumulate`). a (M, K), b (K, N), out (M, N), one
// dtype, CPU. fp32 operands go to oneDNN's matmul primitive (through PyTorch's own
// at::native::mkldnn_matmul) when PyTorch has it, the user has not turned it off
// (torch.backends.mkldnn.enabled, CEX_DISABLE_ONEDNN=1) and every operand is laid out as
// oneDNN reads it without a copy (out contiguous; a and b contiguous or transposes of
// contiguous matrices); everything else goes to at::mm_out / addmm_ (MKL for fp32/fp64).
// Both are IEEE fp32 GEMMs unless the user lowered fp32 matmul precision for oneDNN.
void matmul_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate);

// Whether fp32 products take the oneDNN route now (see matmul_into).
bool onednn_matmul_enabled();

}  // namespace cpu
}  // namespace cex
