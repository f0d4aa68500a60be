#include "kernels.h"

namespace unlearn_fast::cpu {
void bind_softmax_linear_hvp(pybind11::module_& m) {}
}  // namespace unlearn_fast::cpu
