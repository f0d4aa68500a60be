// parallel_for for the CPU kernels: at::parallel_for's semantics on torch's own OpenMP thread pool.
//
// Why not at::parallel_for itself: it is a header template whose parallel path is compiled only
// when the including file is built with -fopenmp (it tests _OPENMP). setup.py builds csrc without
// it, so every kernel ran on one thread whatever torch.set_num_threads said (issue 14: 6.2 GB/s on
// 1 and on 2 threads). When _OPENMP is defined we use at::parallel_for; otherwise we open the
// region through GOMP_parallel, the entry point `#pragma omp parallel` compiles to, in the OpenMP
// runtime torch has already loaded (libtorch_cpu links libgomp). So the kernels share torch's
// threads and thread count instead of starting a second pool that would compete with it.
// The symbols are weak: where no such runtime is loaded the kernels run serially, and
// parallel_runtime() says so.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>

#ifndef _OPENMP
extern "C" {
__attribute__((weak)) void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);
__attribute__((weak)) int omp_get_thread_num(void);
__attribute__((weak)) int omp_get_num_threads(void);
}
#endif

namespace unlearn_fast::cpu {

// "openmp" when kernels can run on several threads, "serial" otherwise.
inline const char* parallel_runtime() {
#ifdef _OPENMP
  return "openmp";
#else
  return (GOMP_parallel && omp_get_thread_num && omp_get_num_threads) ? "openmp" : "serial";
#endif
}

#ifndef _OPENMP
namespace detail {
template <class F>
struct Region {
  const F* f;
  int64_t begin, end, grain;
  std::atomic_flag failed = ATOMIC_FLAG_INIT;
  std::exception_ptr error;

  // Run by every thread of the team: one contiguous range per thread, as at::parallel_for splits.
  static void run(void* data) {
    auto* r = static_cast<Region*>(data);
    int64_t team = omp_get_num_threads();
    team = std::min(team, at::divup(r->end - r->begin, r->grain));
    const int64_t tid = omp_get_thread_num();
    const int64_t chunk = at::divup(r->end - r->begin, team);
    const int64_t first = r->begin + tid * chunk;
    if (tid >= team || first >= r->end) return;
    try {
      (*r->f)(first, std::min(r->end, first + chunk));
    } catch (...) {  // an exception must not leave an OpenMP region
      if (!r->failed.test_and_set()) r->error = std::current_exception();
    }
  }
};
}  // namespace detail
#endif

// f(b, e) over [begin, end) split into at most at::get_num_threads() ranges of at least `grain`
// items; serial when that is one range, or when already inside a parallel region.
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
#ifdef _OPENMP
  at::parallel_for(begin, end, grain, f);
#else
  grain = std::max<int64_t>(grain, 1);
  at::internal::lazy_init_num_threads();
  if (end - begin <= grain || at::get_num_threads() <= 1 || at::in_parallel_region() ||
      parallel_runtime()[0] == 's') {
    f(begin, end);
    return;
  }
  detail::Region<F> region{&f, begin, end, grain};
  // num_threads 0: the team size is the runtime's current setting, which torch.set_num_threads sets.
  GOMP_parallel(&detail::Region<F>::run, &region, 0, 0);
  if (region.error) std::rethrow_exception(region.error);
#endif
}

// How many distinct threads ran the ranges of parallel_for(0, n, grain): lets a test check that
// the kernels really use the threads torch is given, without timing anything.
int64_t threads_used(int64_t n, int64_t grain);

}  // namespace unlearn_fast::cpu
