// Projected MSE forward: a tiled GEMM with a fused squared-error / gradient epilogue.
//
// Math. For student S (N, d_s), teacher T (N, d_t), projection P (d_t, d_s):
//   Y = T @ P                                 (never written to global memory)
//   D = S - Y
//   row_partial[cb, r] = sum_{c in column block cb} D[r, c]^2   (fp32, (num_col_blocks, N))
//   grad[r, c]         = grad_scale * D[r, c]                    (student dtype, optional)
// Every CTA owns one BLOCK_M x BLOCK_N tile of Y, loops over d_t in BLOCK_K chunks staged
// through a STAGES-deep cp.async ring in shared memory, and finishes with the epilogue
// (load the S tile, write grad, reduce D^2 over the tile's columns per row). The row
// reduction is a fixed shuffle/shared-memory tree and every (cb, r) is written by exactly
// one CTA: deterministic, no atomics. Accumulation is fp32 for every dtype.
//
// Cost. FLOPs = 2*N*d_t*d_s (product) + ~4*N*d_s (epilogue: sub, square-add, scale).
// Minimal bytes = e*(N*d_t + d_t*d_s + N*d_s) read (T, P, S once; e = element size)
//               + e*N*d_s (grad) + 4*N*ceil(d_s/128) (row_partial) written.
// P tiles are re-read from L2 by every row tile; CTAs are rasterised column-block-fastest
// so the ceil(d_s/128) CTAs sharing a T row tile run together and T streams from DRAM ~once.
//
// Tiles (BLOCK_N = 128 for every dtype: projected_mse_num_col_blocks only sees d_s).
//  * fp16 / bf16: 128 x 128 x 32, 256 threads = 8 warps as 2 (M) x 4 (N), 64 x 32 per warp,
//    mma.sync m16n8k16 (fp32 accumulate) fed by ldmatrix; 4 stages; rows padded by 8
//    elements (80 B / 272 B strides) so every ldmatrix is bank-conflict free. 74 KiB dynamic
//    + 2 KiB static smem and 128 regs -> 2 CTAs (16 warps) / SM on A100 and H100. A 128 x 128
//    tile does 64 MMA-FLOP per staged smem byte: tensor-core bound, not load bound.
//  * fp32: exact FFMA (no TF32, matching PyTorch's default fp32 matmul). 64 x 128 x 16,
//    256 threads, each a 4 x 8 micro-tile (columns tx*4 and 64 + tx*4, conflict-free
//    LDS.128); 3 stages, 39 KiB smem, ~96 regs -> 2 CTAs / SM. BLOCK_M = 64 gives the fp32
//    shape 256 CTAs (~2 per SM on 108 / 132 SMs) instead of 128 (1 per SM, poor latency hiding).
// Tuned for N=16384, d_t=4096, d_s=1024 bf16 (137 GFLOP, compute bound) and
// N=8192, d_t=1024, d_s=256 fp32 (4.3 GFLOP, compute bound).
//
// Tails: rows >= N, k >= d_t and columns >= d_s are zero-filled in shared memory (cp.async
// src-size 0), so the MMA needs no masks; the epilogue masks rows and columns. 16-byte
// cp.async is used only when base pointers, row strides and d_t / d_s make every chunk
// 16-byte aligned and either fully in or fully out of bounds (checked on the host);
// otherwise a per-element path (4-byte cp.async for fp32, plain loads for 16-bit) is used.
// All row offsets are computed in int64.
#include "projected_mse.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <type_traits>

namespace cex {
namespace cuda {
namespace {

constexpr int kBlockN = 128;  // shared by every dtype (see projected_mse_num_col_blocks)

// ---------------------------------------------------------------- element helpers
// (fp32 <-> element conversions: to_float / from_float in common.cuh)
template <typename T, int V> struct alignas(sizeof(T) * V) VecT { T v[V]; };

template <typename T> struct Params {
  const T *student, *teacher, *proj;
  float* row_partial;
  T* grad;
  int64_t ld_s, ld_t, ld_p, ld_g, n_rows;
  int d_t, d_s, n_col_blocks;
  float grad_scale;
  bool epi_vec;  // student / grad rows allow Core::EPI_VEC-wide vector accesses
};

// ---------------------------------------------------------------- PTX wrappers
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// src_bytes == 0 reads nothing and zero-fills the destination.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 4 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i.
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  if constexpr (kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
// D(16x8, fp32) += A(16x16, row) * B(16x8, col).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]) {
#define CEX_MMA(AB)                                                                   \
  asm("mma.sync.aligned.m16n8k16.row.col.f32." AB "." AB ".f32 "                      \
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                       \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
  if constexpr (std::is_same_v<T, __half>) CEX_MMA("f16");
  else CEX_MMA("bf16");
#undef CEX_MMA
}

// ---------------------------------------------------------------- global -> shared
// Copies one V-element chunk (16 bytes) starting at column `col` of a row into smem.
// kVec: one 16-byte cp.async, the chunk is entirely in or out of bounds (host-checked).
template <bool kVec, int V, typename T>
__device__ __forceinline__ void copy_chunk(T* dst, const T* base, int64_t offset, bool row_ok,
                                           int col, int col_end) {
  if constexpr (kVec) {
    const bool ok = row_ok && col < col_end;
    cp_async_16(dst, ok ? base + offset : base, ok);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const bool ok = row_ok && col + e < col_end;
      if constexpr (sizeof(T) == 4) {
        cp_async_4(dst + e, ok ? base + offset + e : base, ok);
      } else {  // 16-bit with unaligned rows: synchronous loads (slow fallback path)
        dst[e] = ok ? base[offset + e] : from_float<T>(0.f);
      }
    }
  }
}

// Stage layout: A = T tile [BM][A_LD] (k contiguous), then B = P tile [BK][B_LD] (n contiguous).
template <class Core, bool kVec, typename T>
__device__ __forceinline__ void load_stage(T* As, T* Bs, const Params<T>& p, int64_t m0, int n0,
                                           int k0, int tid) {
  constexpr int V = 16 / sizeof(T);
  constexpr int A_CPR = Core::BK / V, B_CPR = Core::BN / V;  // chunks per smem row
  constexpr int A_ITERS = Core::BM * A_CPR / Core::THREADS;
  constexpr int B_ITERS = Core::BK * B_CPR / Core::THREADS;
  static_assert(A_ITERS * Core::THREADS == Core::BM * A_CPR, "A tile / thread mismatch");
  static_assert(B_ITERS * Core::THREADS == Core::BK * B_CPR, "B tile / thread mismatch");
#pragma unroll
  for (int i = 0; i < A_ITERS; ++i) {
    const int c = tid + i * Core::THREADS;
    const int row = c / A_CPR, kc = (c % A_CPR) * V;
    const int64_t gr = m0 + row;
    copy_chunk<kVec, V>(As + row * Core::A_LD + kc, p.teacher, gr * p.ld_t + (k0 + kc),
                        gr < p.n_rows, k0 + kc, p.d_t);
  }
#pragma unroll
  for (int i = 0; i < B_ITERS; ++i) {
    const int c = tid + i * Core::THREADS;
    const int row = c / B_CPR, nc = (c % B_CPR) * V;
    const int gk = k0 + row;
    copy_chunk<kVec, V>(Bs + row * Core::B_LD + nc, p.proj, int64_t(gk) * p.ld_p + (n0 + nc),
                        gk < p.d_t, n0 + nc, p.d_s);
  }
}

// ---------------------------------------------------------------- epilogue helper
// V adjacent columns c..c+V-1 of one row: D = S - Y, optional grad store; returns sum D^2.
template <typename T, int V>
__device__ __forceinline__ float epilogue_group(const T* s_row, T* g_row, int c, const float* y,
                                                const Params<T>& p) {
  float d[V];
  if (p.epi_vec && c + V <= p.d_s) {
    const VecT<T, V> s = *reinterpret_cast<const VecT<T, V>*>(s_row + c);
#pragma unroll
    for (int j = 0; j < V; ++j) d[j] = to_float(s.v[j]) - y[j];
    if (g_row != nullptr) {
      VecT<T, V> g;
#pragma unroll
      for (int j = 0; j < V; ++j) g.v[j] = from_float<T>(p.grad_scale * d[j]);
      *reinterpret_cast<VecT<T, V>*>(g_row + c) = g;
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      d[j] = 0.f;
      if (c + j < p.d_s) {
        d[j] = to_float(s_row[c + j]) - y[j];
        if (g_row != nullptr) g_row[c + j] = from_float<T>(p.grad_scale * d[j]);
      }
    }
  }
  float sq = 0.f;
#pragma unroll
  for (int j = 0; j < V; ++j) sq = fmaf(d[j], d[j], sq);
  return sq;
}

// ---------------------------------------------------------------- fp16 / bf16 core
template <typename T>
struct TensorCoreCore {
  using Element = T;
  static constexpr int BM = 128, BN = kBlockN, BK = 32, STAGES = 4;
  static constexpr int THREADS = 256, MIN_BLOCKS = 2;
  static constexpr int WARPS_N = 4, WM = 64, WN = 32;  // 2 x 4 warps
  static constexpr int MI = WM / 16, NI = WN / 8;      // m16 / n8 MMA tiles per warp
  static constexpr int A_LD = BK + 8, B_LD = BN + 8;   // +16 B per row: conflict-free ldmatrix
  static constexpr int EPI_VEC = 2;                    // accumulator holds column pairs
  static_assert(BM == 2 * WM && BN == WARPS_N * WN, "warp layout");

  float acc[MI][NI][4] = {};

  __device__ __forceinline__ void mma_stage(const T* As, const T* Bs, int tid) {
    const int lane = tid & 31, warp = tid >> 5;
    const int wm0 = (warp / WARPS_N) * WM, wn0 = (warp % WARPS_N) * WN;
    // ldmatrix.x4: lanes 0-15 address rows 0-15 at column 0, lanes 16-31 rows 0-15 at column 8.
    const int lrow = lane & 15, lcol = (lane >> 4) * 8;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t a[MI][4], b[NI][2];
#pragma unroll
      for (int i = 0; i < MI; ++i)
        ldmatrix_x4<false>(a[i], As + (wm0 + i * 16 + lrow) * A_LD + kk + lcol);
#pragma unroll
      for (int j = 0; j < NI; j += 2) {
        // Bs is [k][n]; .trans yields the k-pair-per-register "col" B fragment.
        // Matrices: (k0-7, n0-7), (k8-15, n0-7), (k0-7, n8-15), (k8-15, n8-15).
        uint32_t r[4];
        ldmatrix_x4<true>(r, Bs + (kk + lrow) * B_LD + wn0 + j * 8 + lcol);
        b[j][0] = r[0]; b[j][1] = r[1]; b[j + 1][0] = r[2]; b[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j) mma_16816<T>(acc[i][j], a[i], b[j]);
    }
  }

  __device__ __forceinline__ void epilogue(const Params<T>& p, int64_t m0, int n0, int cb,
                                           int tid) {
    __shared__ float red[WARPS_N][BM];  // per-warp-column row sums, summed in fixed order
    const int lane = tid & 31, warp = tid >> 5;
    const int wm0 = (warp / WARPS_N) * WM, wn = warp % WARPS_N;
    const int group = lane >> 2, tig = lane & 3;  // accumulator: rows group(+8), cols 2*tig(+1)
#pragma unroll
    for (int i = 0; i < MI; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = wm0 + i * 16 + h * 8 + group;
        const int64_t r = m0 + row;
        float sq = 0.f;
        if (r < p.n_rows) {
          const T* s_row = p.student + r * p.ld_s;
          T* g_row = p.grad != nullptr ? p.grad + r * p.ld_g : nullptr;
#pragma unroll
          for (int j = 0; j < NI; ++j)
            sq += epilogue_group<T, EPI_VEC>(s_row, g_row, n0 + wn * WN + j * 8 + tig * 2,
                                             &acc[i][j][h * 2], p);
        }
        sq += __shfl_xor_sync(0xffffffffu, sq, 1);  // the 4 lanes of a quad share the row
        sq += __shfl_xor_sync(0xffffffffu, sq, 2);
        if (tig == 0) red[wn][row] = sq;
      }
    }
    __syncthreads();
    if (tid < BM) {
      const int64_t r = m0 + tid;
      float total = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS_N; ++w) total += red[w][tid];
      if (r < p.n_rows) p.row_partial[int64_t(cb) * p.n_rows + r] = total;
    }
  }
};

// ---------------------------------------------------------------- fp32 SIMT core
struct SimtF32Core {
  using Element = float;
  static constexpr int BM = 64, BN = kBlockN, BK = 16, STAGES = 3;
  static constexpr int THREADS = 256, MIN_BLOCKS = 2;
  static constexpr int TX = 16, TM = 4, TN = 8;  // 16 x 16 threads, 4 x 8 micro-tile each
  static constexpr int A_LD = BK + 4;  // rows 4 apart (the two ty of a warp) hit other banks
  static constexpr int B_LD = BN;      // read as contiguous float4 runs: no padding needed
  static constexpr int EPI_VEC = 4;
  static_assert(BM == (THREADS / TX) * TM && BN == TX * TN, "thread layout");

  float acc[TM][TN] = {};  // columns tx*4 + {0..3} and BN/2 + tx*4 + {0..3}

  __device__ __forceinline__ void mma_stage(const float* As, const float* Bs, int tid) {
    const int tx = tid % TX, ty = tid / TX;
#pragma unroll
    for (int k4 = 0; k4 < BK; k4 += 4) {
      float a[TM][4];
#pragma unroll
      for (int i = 0; i < TM; ++i)
        *reinterpret_cast<float4*>(a[i]) =
            *reinterpret_cast<const float4*>(As + (ty * TM + i) * A_LD + k4);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        float b[TN];
        const float* brow = Bs + (k4 + kk) * B_LD + tx * 4;
        *reinterpret_cast<float4*>(b) = *reinterpret_cast<const float4*>(brow);
        *reinterpret_cast<float4*>(b + 4) = *reinterpret_cast<const float4*>(brow + BN / 2);
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i][kk], b[j], acc[i][j]);
      }
    }
  }

  __device__ __forceinline__ void epilogue(const Params<float>& p, int64_t m0, int n0, int cb,
                                           int tid) {
    const int tx = tid % TX, ty = tid / TX;
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int64_t r = m0 + ty * TM + i;
      float sq = 0.f;
      if (r < p.n_rows) {
        const float* s_row = p.student + r * p.ld_s;
        float* g_row = p.grad != nullptr ? p.grad + r * p.ld_g : nullptr;
        sq = epilogue_group<float, EPI_VEC>(s_row, g_row, n0 + tx * 4, &acc[i][0], p) +
             epilogue_group<float, EPI_VEC>(s_row, g_row, n0 + BN / 2 + tx * 4, &acc[i][4], p);
      }
      // The 16 lanes of a half-warp (same ty) cover all BN columns of this row.
#pragma unroll
      for (int off = TX / 2; off > 0; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
      if (tx == 0 && r < p.n_rows) p.row_partial[int64_t(cb) * p.n_rows + r] = sq;
    }
  }
};

// ---------------------------------------------------------------- kernel
template <class Core> constexpr int smem_bytes() {
  return Core::STAGES * (Core::BM * Core::A_LD + Core::BK * Core::B_LD) *
         int(sizeof(typename Core::Element));
}

template <class Core, bool kVec>
__global__ void __launch_bounds__(Core::THREADS, Core::MIN_BLOCKS)
projected_mse_kernel(const Params<typename Core::Element> p) {
  using T = typename Core::Element;
  constexpr int A_ELEMS = Core::BM * Core::A_LD, STAGE_ELEMS = A_ELEMS + Core::BK * Core::B_LD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);

  // Column block fastest: CTAs sharing a T row tile are scheduled together (L2 reuse).
  const int tid = threadIdx.x;
  const int cb = int(blockIdx.x % unsigned(p.n_col_blocks));
  const int64_t m0 = int64_t(blockIdx.x / unsigned(p.n_col_blocks)) * Core::BM;
  const int n0 = cb * Core::BN;
  const int k_tiles = (p.d_t + Core::BK - 1) / Core::BK;

  Core core;
  // Prologue: STAGES-1 tiles in flight. One commit per slot (possibly empty) keeps the
  // group count uniform, so wait_group<STAGES-2> below always means "tile kt has landed".
#pragma unroll
  for (int s = 0; s < Core::STAGES - 1; ++s) {
    if (s < k_tiles) {
      T* As = smem + s * STAGE_ELEMS;
      load_stage<Core, kVec>(As, As + A_ELEMS, p, m0, n0, s * Core::BK, tid);
    }
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<Core::STAGES - 2>();
    // Makes tile kt visible to all threads, and guarantees everyone is done with the
    // stage computed at kt-1, which is the one refilled just below.
    __syncthreads();
    const int next = kt + Core::STAGES - 1;
    if (next < k_tiles) {
      T* As = smem + (next % Core::STAGES) * STAGE_ELEMS;
      load_stage<Core, kVec>(As, As + A_ELEMS, p, m0, n0, next * Core::BK, tid);
    }
    cp_async_commit();
    const T* As = smem + (kt % Core::STAGES) * STAGE_ELEMS;
    core.mma_stage(As, As + A_ELEMS, tid);
  }
  cp_async_wait<0>();  // only empty groups can remain; drain before exit for hygiene
  core.epilogue(p, m0, n0, cb, tid);
}

// ---------------------------------------------------------------- host side
bool aligned(const void* ptr, int64_t ld, int vec, int elem_bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % uintptr_t(vec * elem_bytes) == 0 && ld % vec == 0;
}

template <class Core, bool kVec>
cudaError_t launch_kernel(const Params<typename Core::Element>& p, unsigned grid,
                          cudaStream_t stream) {
  auto kernel = projected_mse_kernel<Core, kVec>;
  constexpr int smem = smem_bytes<Core>();
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, Core::THREADS, smem, stream>>>(p);
  return cudaGetLastError();
}

// The untyped arguments of projected_mse_fwd.
struct Args {
  const void *student, *teacher, *proj;
  float* row_partial;
  void* grad;
  int64_t ld_s, ld_t, ld_p, ld_g, n_rows, d_t, d_s;
  float grad_scale;
  cudaStream_t stream;
};

template <class Core>
int launch(const Args& a) {
  using T = typename Core::Element;
  constexpr int V = 16 / int(sizeof(T)), E = int(sizeof(T));
  const int64_t n_col_blocks = projected_mse_num_col_blocks(a.d_s);
  const int64_t n_row_tiles = (a.n_rows + Core::BM - 1) / Core::BM;
  if (n_row_tiles > INT_MAX / n_col_blocks) return int(cudaErrorInvalidValue);

  Params<T> p;
  p.student = static_cast<const T*>(a.student); p.teacher = static_cast<const T*>(a.teacher);
  p.proj = static_cast<const T*>(a.proj); p.grad = static_cast<T*>(a.grad);
  p.row_partial = a.row_partial;
  p.ld_s = a.ld_s; p.ld_t = a.ld_t; p.ld_p = a.ld_p; p.ld_g = a.ld_g; p.n_rows = a.n_rows;
  p.d_t = int(a.d_t); p.d_s = int(a.d_s); p.n_col_blocks = int(n_col_blocks);
  p.grad_scale = a.grad_scale;
  p.epi_vec = aligned(a.student, a.ld_s, Core::EPI_VEC, E) &&
              (a.grad == nullptr || aligned(a.grad, a.ld_g, Core::EPI_VEC, E));
  // 16-byte chunks must be aligned and never straddle the d_t / d_s edge.
  const bool vec = aligned(a.teacher, a.ld_t, V, E) && aligned(a.proj, a.ld_p, V, E) &&
                   a.d_t % V == 0 && a.d_s % V == 0;

  const unsigned grid = unsigned(n_row_tiles * n_col_blocks);
  return int(vec ? launch_kernel<Core, true>(p, grid, a.stream)
                 : launch_kernel<Core, false>(p, grid, a.stream));
}

}  // namespace

int64_t projected_mse_num_col_blocks(int64_t d_s) {
  return d_s <= 0 ? 0 : (d_s + kBlockN - 1) / kBlockN;
}

int projected_mse_fwd(DType dtype, const void* student, int64_t student_row_stride,
                      const void* teacher, int64_t teacher_row_stride, const void* projection,
                      int64_t projection_row_stride, float* row_partial, void* grad,
                      int64_t grad_row_stride, int64_t n_rows, int64_t d_t, int64_t d_s,
                      float grad_scale, void* stream) {
  if (n_rows < 0 || d_t < 0 || d_s < 0 || d_t > INT_MAX - 64 || d_s > INT_MAX - 2 * kBlockN)
    return int(cudaErrorInvalidValue);
  if (n_rows == 0 || d_s == 0) return int(cudaSuccess);  // nothing to write
  const Args a{student, teacher, projection, row_partial, grad,
               student_row_stride, teacher_row_stride, projection_row_stride, grad_row_stride,
               n_rows, d_t, d_s, grad_scale, static_cast<cudaStream_t>(stream)};
  switch (dtype) {
    case DType::kFloat32: return launch<SimtF32Core>(a);
    case DType::kFloat16: return launch<TensorCoreCore<__half>>(a);
    case DType::kBFloat16: return launch<TensorCoreCore<__nv_bfloat16>>(a);
  }
  return int(cudaErrorInvalidValue);
}

}  // namespace cuda
}  // namespace cex
