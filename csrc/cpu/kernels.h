#pragma once
#include <torch/extension.h>

namespace unlearn_fast::cpu {
// Registers every C++ CPU kernel on the module as "<op>_cpu".
void bind(pybind11::module_& m);
}  // namespace unlearn_fast::cpu
