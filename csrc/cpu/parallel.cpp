// The threading probe behind _C.parallel_info(): which runtime parallel_for uses and how many
// threads actually ran a region (see parallel.h).
#include "parallel.h"

#include <mutex>
#include <set>
#include <thread>

#include "kernels.h"

namespace unlearn_fast::cpu {

int64_t threads_used(int64_t n, int64_t grain) {
  std::mutex mutex;
  std::set<std::thread::id> seen;
  parallel_for(0, n, grain, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> lock(mutex);
    seen.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(seen.size());
}

void bind_parallel(pybind11::module_& m) {
  m.def("parallel_runtime", [] { return std::string(parallel_runtime()); },
        "'openmp' when the CPU kernels can use torch's OpenMP threads, 'serial' otherwise");
  m.def("threads_used", &threads_used, pybind11::arg("n"), pybind11::arg("grain") = 1,
        "number of distinct threads that ran parallel_for(0, n, grain) (a probe for tests)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}

}  // namespace unlearn_fast::cpu
