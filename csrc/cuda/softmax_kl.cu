// Fused softmax KL / generalized JSD in CUDA: one thread block per row, gradients in the
// forward pass.
//
// Math: the loss and gradients per row (KL, generalized JSD, symmetric KL, with the names
// used here: ls, lt, p, q, lm, Kt, Ks, F, R; a = 1 - beta) are stated once in
// cex_kernels/ops/_divergence.py. z_s = inv_t * student, z_t = inv_t * teacher.
// Reverse KL is beta == 0 with the inputs swapped (by the caller).
// The log-softmax is taken around the raw row max m, before scaling:
//   ls = (x - m) inv_t - log sum exp((x - m) inv_t)
// so small T, large constant offsets and logits near the float maximum lose nothing.
// JSD vs KL is decided on the double beta; log beta and log(1 - beta) are taken in double.
// Symmetric vs KL is decided on the fp32 beta (a 0 weight must not multiply an infinite R).
// NaN rule: a kept row whose loss is NaN (a NaN logit, or +inf giving inf - inf) gets NaN in
// every entry of each requested gradient (fmaxf and 0 log 0 = 0 would leave some finite).
//
// Passes over the row (the block strides over V with its threads): (1) per-thread online
// max / sum of exp for both rows, merged across the block, (2) the loss terms (and the
// student gradient for KL without a teacher gradient), block-reduced, (3) the gradients
// that need the row totals. Passes 2-3 re-read the row from L2 (a 152k bf16 row pair is
// 600 KiB; with ~2 blocks per SM in flight the working set fits H100's 50 MiB L2).
// FLOPs per element: ~4 exp (KL), ~6 exp (symmetric) or ~6 exp + 2 log1p (JSD) and ~15
// other ops.
// Minimal bytes: read both logits once (2 N V itemsize), write each requested gradient
// once (N V itemsize) and 4 N bytes of row losses.
// Tuned for N = 4096..16384, V = 32k..152k in bf16 (512 threads: 64-300 elements per
// thread per pass).
#include "softmax_kl.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

namespace cex {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

struct MaxSum {
  float m, s;  // running raw max and sum of exp(inv_t (x - m))
};

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b, float inv_t) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, a.s + b.s};  // nothing but -inf so far (0, or a NaN sum)
  return {m, a.s * expf((a.m - m) * inv_t) + b.s * expf((b.m - m) * inv_t)};
}

// NaN in x: fmaxf would skip it, so it goes into the sum (the row's loss is then NaN).
__device__ __forceinline__ MaxSum push(MaxSum a, float x, float inv_t) {
  return merge(a, x == x ? MaxSum{x, 1.f} : MaxSum{-INFINITY, x}, inv_t);
}

__device__ MaxSum block_merge(MaxSum v, float inv_t, float (*shared)[kWarps + 1]) {
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
    v = merge(v, other, inv_t);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // the shared scratch may still be read by an earlier reduction
  if (lane == 0) {
    shared[0][warp] = v.m;
    shared[1][warp] = v.s;
  }
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? MaxSum{shared[0][lane], shared[1][lane]} : MaxSum{-INFINITY, 0.f};
    for (int o = 16; o > 0; o >>= 1) {
      MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
      v = merge(v, other, inv_t);
    }
    if (lane == 0) {
      shared[0][kWarps] = v.m;
      shared[1][kWarps] = v.s;
    }
  }
  __syncthreads();
  return MaxSum{shared[0][kWarps], shared[1][kWarps]};
}

__device__ float block_sum(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? shared[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) shared[kWarps] = v;
  }
  __syncthreads();
  return shared[kWarps];
}

__device__ __forceinline__ float log_mixture(float ls, float lt, float log_b, float log_1mb) {
  const float a = lt + log_b, b = ls + log_1mb;
  const float hi = fmaxf(a, b), lo = fminf(a, b);
  return hi == -INFINITY ? hi : hi + log1pf(expf(lo - hi));
}

enum class Mode { kKl, kJsd, kSymmetric };

template <typename T, Mode kMode>
__global__ void __launch_bounds__(kThreads)
softmax_kl_fwd_kernel(const T* __restrict__ s, int64_t s_stride, const T* __restrict__ t,
                      int64_t t_stride, const float* __restrict__ w, float* __restrict__ loss,
                      T* __restrict__ gs, T* __restrict__ gt, int64_t V, float inv_t,
                      float beta, float one_m_beta, float log_b, float log_1mb) {
  __shared__ float scratch[2][kWarps + 1];
  const int64_t row = blockIdx.x;  // 64-bit row offsets: N * V may exceed 2^31
  s += row * s_stride;
  t += row * t_stride;
  if (gs) gs += row * V;
  if (gt) gt += row * V;
  const float wr = w[row];
  if (wr == 0.f) {  // dropped row: zero gradients, nothing read
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      if (gs) gs[i] = from_float<T>(0.f);
      if (gt) gt[i] = from_float<T>(0.f);
    }
    if (threadIdx.x == 0) loss[row] = 0.f;
    return;
  }
  // Pass 1: raw max and log sum exp of both rows.
  MaxSum ms{-INFINITY, 0.f}, mt{-INFINITY, 0.f};
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    ms = push(ms, to_float(s[i]), inv_t);
    mt = push(mt, to_float(t[i]), inv_t);
  }
  ms = block_merge(ms, inv_t, scratch);
  mt = block_merge(mt, inv_t, scratch);
  const float max_s = ms.m, max_t = mt.m, cs = logf(ms.s), ct = logf(mt.s);
  const float g_scale = wr * inv_t;
  // (x - m) inv_t - log_sum: the raw max is subtracted before the scaling.
  auto log_softmax = [inv_t](float x, float m, float c) { return (x - m) * inv_t - c; };
  // The NaN rule, once the row total is known (rare: nothing else pays for it).
  auto nan_fill = [&](float total) {
    if (!isnan(total)) return false;
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      if (gs) gs[i] = from_float<T>(NAN);
      if (gt) gt[i] = from_float<T>(NAN);
    }
    return true;
  };

  if (kMode == Mode::kKl) {  // KL(q || p)
    const bool fuse = gs != nullptr && gt == nullptr;
    float acc = 0.f;
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      const float ls = log_softmax(to_float(s[i]), max_s, cs);
      const float lt = log_softmax(to_float(t[i]), max_t, ct);
      const float q = expf(lt);
      acc += q == 0.f ? 0.f : q * (lt - ls);
      if (fuse) gs[i] = from_float<T>((expf(ls) - q) * g_scale);
    }
    const float total = block_sum(acc, scratch[0]);
    if (!nan_fill(total) && gt != nullptr) {
      for (int64_t i = threadIdx.x; i < V; i += kThreads) {
        const float ls = log_softmax(to_float(s[i]), max_s, cs);
        const float lt = log_softmax(to_float(t[i]), max_t, ct);
        const float q = expf(lt);
        if (gs) gs[i] = from_float<T>((expf(ls) - q) * g_scale);
        gt[i] = from_float<T>((q == 0.f ? 0.f : q * (lt - ls - total)) * g_scale);
      }
    }
    if (threadIdx.x == 0) loss[row] = wr * total;
    return;
  }
  if (kMode == Mode::kSymmetric) {  // (1 - beta) KL(q || p) + beta KL(p || q)
    float acc_f = 0.f, acc_r = 0.f;
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      const float ls = log_softmax(to_float(s[i]), max_s, cs);
      const float lt = log_softmax(to_float(t[i]), max_t, ct);
      const float p = expf(ls), q = expf(lt);
      acc_f += q == 0.f ? 0.f : q * (lt - ls);
      acc_r += p == 0.f ? 0.f : p * (ls - lt);
    }
    const float f = block_sum(acc_f, scratch[0]);
    const float r = block_sum(acc_r, scratch[1]);
    const float total = one_m_beta * f + beta * r;
    if (!nan_fill(total) && (gs != nullptr || gt != nullptr)) {
      for (int64_t i = threadIdx.x; i < V; i += kThreads) {
        const float ls = log_softmax(to_float(s[i]), max_s, cs);
        const float lt = log_softmax(to_float(t[i]), max_t, ct);
        const float p = expf(ls), q = expf(lt);
        if (gs) {
          const float rev = p == 0.f ? 0.f : p * (ls - lt - r);
          gs[i] = from_float<T>((one_m_beta * (p - q) + beta * rev) * g_scale);
        }
        if (gt) {
          const float fwd = q == 0.f ? 0.f : q * (lt - ls - f);
          gt[i] = from_float<T>((one_m_beta * fwd + beta * (q - p)) * g_scale);
        }
      }
    }
    if (threadIdx.x == 0) loss[row] = wr * total;
    return;
  }
  float acc_t = 0.f, acc_s = 0.f;
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    const float ls = log_softmax(to_float(s[i]), max_s, cs);
    const float lt = log_softmax(to_float(t[i]), max_t, ct);
    const float p = expf(ls), q = expf(lt), lm = log_mixture(ls, lt, log_b, log_1mb);
    acc_t += q == 0.f ? 0.f : q * (lt - lm);
    acc_s += p == 0.f ? 0.f : p * (ls - lm);
  }
  const float kt = block_sum(acc_t, scratch[0]);
  const float ks = block_sum(acc_s, scratch[1]);
  const float total = beta * kt + one_m_beta * ks;
  if (!nan_fill(total) && (gs != nullptr || gt != nullptr)) {
    const float s_scale = one_m_beta * g_scale, t_scale = beta * g_scale;
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      const float ls = log_softmax(to_float(s[i]), max_s, cs);
      const float lt = log_softmax(to_float(t[i]), max_t, ct);
      const float lm = log_mixture(ls, lt, log_b, log_1mb);
      if (gs) {
        const float p = expf(ls);
        gs[i] = from_float<T>((p == 0.f ? 0.f : p * (ls - lm - ks)) * s_scale);
      }
      if (gt) {
        const float q = expf(lt);
        gt[i] = from_float<T>((q == 0.f ? 0.f : q * (lt - lm - kt)) * t_scale);
      }
    }
  }
  if (threadIdx.x == 0) loss[row] = wr * total;
}

template <typename T>
int launch(const void* student, int64_t s_stride, const void* teacher, int64_t t_stride,
           const float* w, float* loss, void* gs, void* gt, int64_t n_rows, int64_t V,
           float inv_t, double beta, bool symmetric, cudaStream_t stream) {
  // Decided in double: a beta that rounds to 0 in fp32 (< 1.4e-45) is still a JSD; a
  // symmetric one is the forward KL (its 0 weight must not multiply an infinite R).
  const bool jsd = !symmetric && beta > 0.0;
  const bool sym = symmetric && static_cast<float>(beta) > 0.f;
  const float log_b = jsd ? static_cast<float>(std::log(beta)) : 0.f;
  const float log_1mb = jsd ? static_cast<float>(std::log1p(-beta)) : 0.f;
  const float beta_f = static_cast<float>(beta), one_m_beta = static_cast<float>(1.0 - beta);
  const dim3 grid(static_cast<unsigned>(n_rows)), block(kThreads);
  auto* s = static_cast<const T*>(student);
  auto* t = static_cast<const T*>(teacher);
  if (jsd) {
    softmax_kl_fwd_kernel<T, Mode::kJsd><<<grid, block, 0, stream>>>(
        s, s_stride, t, t_stride, w, loss, static_cast<T*>(gs), static_cast<T*>(gt), V, inv_t,
        beta_f, one_m_beta, log_b, log_1mb);
  } else if (sym) {
    softmax_kl_fwd_kernel<T, Mode::kSymmetric><<<grid, block, 0, stream>>>(
        s, s_stride, t, t_stride, w, loss, static_cast<T*>(gs), static_cast<T*>(gt), V, inv_t,
        beta_f, one_m_beta, log_b, log_1mb);
  } else {
    softmax_kl_fwd_kernel<T, Mode::kKl><<<grid, block, 0, stream>>>(
        s, s_stride, t, t_stride, w, loss, static_cast<T*>(gs), static_cast<T*>(gt), V, inv_t,
        beta_f, one_m_beta, log_b, log_1mb);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int softmax_kl_fwd(DType dtype, const void* student, int64_t student_row_stride,
                   const void* teacher, int64_t teacher_row_stride, const float* row_weight,
                   float* row_loss, void* grad_student, void* grad_teacher, int64_t n_rows,
                   int64_t V, float inv_temperature, double beta, bool symmetric,
                   void* stream) {
  if (n_rows == 0 || V == 0) return 0;
  if (n_rows > 2147483647LL) return static_cast<int>(cudaErrorInvalidConfiguration);
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return launch<float>(student, student_row_stride, teacher, teacher_row_stride, row_weight,
                           row_loss, grad_student, grad_teacher, n_rows, V, inv_temperature,
                           beta, symmetric, st);
    case DType::kFloat16:
      return launch<__half>(student, student_row_stride, teacher, teacher_row_stride, row_weight,
                            row_loss, grad_student, grad_teacher, n_rows, V, inv_temperature,
                            beta, symmetric, st);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(student, student_row_stride, teacher, teacher_row_stride,
                                   row_weight, row_loss, grad_student, grad_teacher, n_rows, V,
                                   inv_temperature, beta, symmetric, st);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace cuda
}  // namespace cex
