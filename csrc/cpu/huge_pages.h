// Large CPU outputs on transparent huge pages, when asked for (CEX_HUGE_PAGES=1).
//
// A fresh (N, V) gradient is a fresh mmap: its first write faults once per 4 KiB page,
// which costs as much as the kernel's own arithmetic (a 262 MB fp32 gradient: ~55 ms of
// page faults against ~17 ms with 2 MiB pages, measured 2026-12-02 on a 2-core AMD EPYC
// VM). madvise(MADV_HUGEPAGE) on the untouched buffer lets the kernel back it with 2 MiB
// pages where the system's THP mode is "madvise" (the common default); it is a hint (no
// memory is added: only pages wholly inside the buffer are affected) and a no-op
// elsewhere. PyTorch does the same for every allocation when THP_MEM_ALLOC_ENABLE=1.
// It is off by default because on a VM with free-page reporting (this project's machines:
// virtio-balloon, page_reporting_order=11) the 2 MiB pages come from free blocks the host
// has taken back: right after other code frees a few hundred MB, a 262 MB gradient then
// costs ~300 ms instead of ~80 (softmax_kl N=2048 V=32000 interleaved with eager: 75-409
// ms with huge pages, 124-157 ms without). Set CEX_HUGE_PAGES=1 on bare metal.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace cex {
namespace cpu {

constexpr int64_t kHugePageBytes = int64_t{1} << 21;

// Advises the 2 MiB pages lying wholly inside `t`'s bytes; buffers under 4 MiB are left.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool on = [] {
    const char* v = std::getenv("CEX_HUGE_PAGES");
    return v != nullptr && v[0] == '1';
  }();
  if (!on || !t.defined() || !t.device().is_cpu()) return;
  const int64_t bytes = static_cast<int64_t>(t.nbytes());
  if (bytes < 2 * kHugePageBytes) return;
  const auto begin = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  const std::uintptr_t mask = static_cast<std::uintptr_t>(kHugePageBytes - 1);
  const std::uintptr_t first = (begin + mask) & ~mask, last = (begin + bytes) & ~mask;
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// at::empty, advised as above (for an output about to be written in full).
inline at::Tensor empty_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t);
  return t;
}

}  // namespace cpu
}  // namespace cex
