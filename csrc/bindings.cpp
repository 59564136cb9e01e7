// The only translation unit that sees both torch and the kernels: it turns tensors into
// raw pointers for the CUDA launchers and exposes everything to Python as cex_kernels._C.
// The CUDA stream comes from Python as an integer (torch.cuda.current_stream().cuda_stream)
// so this file compiles against a CPU-only PyTorch too (CI checks it with CEX_WITH_CUDA).
#include <torch/extension.h>

#include "cpu/projected_mse.h"
#include "cpu/huge_pages.h"
#include "cpu/matmul.h"
#include "cpu/softmax_kl.h"

#ifdef CEX_WITH_CUDA
#include "cuda/projected_mse.h"
#include "cuda/softmax_kl.h"

namespace {

cex::cuda::DType cuda_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cex::cuda::DType::kFloat32;
    case at::kHalf: return cex::cuda::DType::kFloat16;
    case at::kBFloat16: return cex::cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "cex cuda kernels support float32, float16 and bfloat16, got ",
                  t.scalar_type());
  }
}

void check_cuda_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "cex cuda projected_mse: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 2, "cex cuda projected_mse: ", name, " must be 2-D, got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1 || t.size(1) <= 1, "cex cuda projected_mse: ", name,
              " needs unit stride in its last dimension, got strides ", t.strides());
}

// Caller (Python) has set the current device to the tensors' device.
std::tuple<at::Tensor, at::Tensor> projected_mse_fwd_cuda(const at::Tensor& student,
                                                          const at::Tensor& teacher,
                                                          const at::Tensor& projection,
                                                          double grad_scale, bool compute_grad,
                                                          int64_t stream) {
  check_cuda_matrix(student, "student");
  check_cuda_matrix(teacher, "teacher");
  check_cuda_matrix(projection, "projection");
  TORCH_CHECK(student.size(0) == teacher.size(0) && projection.size(0) == teacher.size(1) &&
                  projection.size(1) == student.size(1),
              "cex cuda projected_mse: shapes do not chain: student ", student.sizes(),
              ", teacher ", teacher.sizes(), ", projection ", projection.sizes());
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type() &&
                  teacher.scalar_type() == projection.scalar_type(),
              "cex cuda projected_mse: dtypes differ");
  const auto dtype = cuda_dtype(student);
  const int64_t n_rows = student.size(0), d_t = teacher.size(1), d_s = student.size(1);
  at::Tensor grad = compute_grad ? at::empty({n_rows, d_s}, student.options())
                                 : at::empty({0}, student.options());
  const int64_t n_col_blocks = cex::cuda::projected_mse_num_col_blocks(d_s);
  at::Tensor partial = at::empty({n_col_blocks, n_rows}, student.options().dtype(at::kFloat));
  if (n_rows == 0 || d_s == 0) {
    return {at::zeros({n_rows}, student.options().dtype(at::kFloat)), grad};
  }
  const int err = cex::cuda::projected_mse_fwd(
      dtype, student.data_ptr(), student.stride(0), teacher.data_ptr(), teacher.stride(0),
      projection.data_ptr(), projection.stride(0), partial.data_ptr<float>(),
      compute_grad ? grad.data_ptr() : nullptr, compute_grad ? grad.stride(0) : 0, n_rows, d_t,
      d_s, static_cast<float>(grad_scale), reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == 0, "cex cuda projected_mse: kernel launch failed with CUDA error ", err);
  return {partial.sum(0), grad};
}

// Caller (Python) has set the current device to the tensors' device.
std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_kl_fwd_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& row_weight,
    double inv_temperature, double beta, bool symmetric, bool grad_student, bool grad_teacher,
    int64_t stream) {
  for (const auto* t : {&student, &teacher}) {
    TORCH_CHECK(t->is_cuda() && t->dim() == 2, "cex cuda softmax_kl: logits must be 2-D CUDA "
                "tensors, got ", t->sizes(), " on ", t->device());
    TORCH_CHECK(t->stride(1) == 1 || t->size(1) <= 1, "cex cuda softmax_kl: logits need unit "
                "stride in their last dimension, got strides ", t->strides());
  }
  TORCH_CHECK(student.sizes() == teacher.sizes(), "cex cuda softmax_kl: student ",
              student.sizes(), " and teacher ", teacher.sizes(), " differ");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), "cex cuda softmax_kl: dtypes differ");
  TORCH_CHECK(row_weight.is_cuda() && row_weight.dim() == 1 &&
                  row_weight.size(0) == student.size(0),
              "cex cuda softmax_kl: row_weight must be a CUDA (N,) tensor, got ",
              row_weight.sizes());
  TORCH_CHECK(beta >= 0.0 && beta < 1.0, "cex cuda softmax_kl: beta must be in [0, 1), got ", beta);
  const auto dtype = cuda_dtype(student);
  const int64_t n_rows = student.size(0), V = student.size(1);
  at::Tensor weight = row_weight.to(at::kFloat).contiguous();
  at::Tensor row_loss = at::zeros({n_rows}, student.options().dtype(at::kFloat));
  at::Tensor grad_s = grad_student ? at::empty({n_rows, V}, student.options())
                                   : at::empty({0}, student.options());
  at::Tensor grad_t = grad_teacher ? at::empty({n_rows, V}, teacher.options())
                                   : at::empty({0}, teacher.options());
  const int err = cex::cuda::softmax_kl_fwd(
      dtype, student.data_ptr(), student.stride(0), teacher.data_ptr(), teacher.stride(0),
      weight.data_ptr<float>(), row_loss.data_ptr<float>(),
      grad_student ? grad_s.data_ptr() : nullptr, grad_teacher ? grad_t.data_ptr() : nullptr,
      n_rows, V, static_cast<float>(inv_temperature), beta, symmetric,
      reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == 0, "cex cuda softmax_kl: kernel launch failed with CUDA error ", err);
  return {row_loss, grad_s, grad_t};
}

}  // namespace
#endif  // CEX_WITH_CUDA

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cex-kernels compiled kernels (C++ CPU always; CUDA when built with it)";
  m.def("projected_mse_fwd_cpu", &cex::cpu::projected_mse_fwd,
        "Fused projected MSE on the CPU: returns (row_sq_err, grad)", py::arg("student"),
        py::arg("teacher"), py::arg("projection"), py::arg("grad_scale"),
        py::arg("compute_grad"));
  m.def("softmax_kl_fwd_cpu", &cex::cpu::softmax_kl_fwd,
        "Fused softmax KL / generalized JSD / symmetric KL on the CPU: returns (row_loss, "
        "grad_student, grad_teacher)", py::arg("student"), py::arg("teacher"),
        py::arg("row_weight"), py::arg("inv_temperature"), py::arg("beta"),
        py::arg("symmetric"), py::arg("grad_student"), py::arg("grad_teacher"),
        py::arg("grad_student_out") = py::none());
  m.def("tvd_fwd_cpu", &cex::cpu::tvd_fwd,
        "Fused total variation distance of softmaxes on the CPU: returns (row_loss, "
        "grad_student, grad_teacher)", py::arg("student"), py::arg("teacher"),
        py::arg("row_weight"), py::arg("inv_temperature"), py::arg("grad_student"),
        py::arg("grad_teacher"), py::arg("grad_student_out") = py::none());
  m.def("exp_rate_cpu", &cex::cpu::exp_rate,
        "Exponentials per second of the CPU row kernels' exp routine on every intra-op thread "
        "at once (the benchmarks' exp-throughput limit)", py::arg("n"), py::arg("reps"));
  m.def("advise_huge_pages", &cex::cpu::advise_huge_pages,
        "Advise transparent huge pages for a large CPU buffer about to be written in full "
        "(a hint; see csrc/cpu/huge_pages.h)", py::arg("tensor"));
  m.def("matmul_into_cpu", &cex::cpu::matmul_into,
        "out = a @ b (out += a @ b when accumulate) on the CPU; fp32 through oneDNN when "
        "PyTorch has it (see csrc/cpu/matmul.h)", py::arg("out"), py::arg("a"), py::arg("b"),
        py::arg("accumulate"));
  m.def("onednn_matmul_enabled", &cex::cpu::onednn_matmul_enabled,
        "Whether fp32 CPU products take oneDNN's matmul now (csrc/cpu/matmul.h)");
#ifdef CEX_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("projected_mse_fwd_cuda", &projected_mse_fwd_cuda,
        "Fused projected MSE on CUDA: returns (row_sq_err, grad)", py::arg("student"),
        py::arg("teacher"), py::arg("projection"), py::arg("grad_scale"),
        py::arg("compute_grad"), py::arg("stream"));
  m.def("softmax_kl_fwd_cuda", &softmax_kl_fwd_cuda,
        "Fused softmax KL / generalized JSD / symmetric KL on CUDA: returns (row_loss, "
        "grad_student, grad_teacher)", py::arg("student"), py::arg("teacher"),
        py::arg("row_weight"), py::arg("inv_temperature"), py::arg("beta"),
        py::arg("symmetric"), py::arg("grad_student"), py::arg("grad_teacher"),
        py::arg("stream"));
#else
  m.attr("with_cuda") = false;
#endif
}
