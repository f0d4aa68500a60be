#include "kernels.h"

namespace unlearn_fast::cpu {
void bind_lbfgs(pybind11::module_& m) {}
}  // namespace unlearn_fast::cpu
