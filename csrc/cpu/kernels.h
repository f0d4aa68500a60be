#pragma once
#include <torch/extension.h>

namespace unlearn_fast::cpu {
// Each kernel file registers its functions on the module as "<op>_cpu".
void bind_codec(pybind11::module_& m);               // codec.cpp
void bind_lbfgs(pybind11::module_& m);               // lbfgs.cpp
void bind_softmax_linear_hvp(pybind11::module_& m);  // softmax_linear_hvp.cpp
void bind_parallel(pybind11::module_& m);            // parallel.cpp
}  // namespace unlearn_fast::cpu
