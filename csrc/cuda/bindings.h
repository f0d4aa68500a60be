#pragma once
#include <torch/extension.h>

namespace unlearn_fast::cuda {
// Torch glue for the CUDA kernels; registers "<op>_cuda" functions. Built only WITH_CUDA.
void bind_codec(pybind11::module_& m);               // codec_glue.cpp -> codec.cu
void bind_lbfgs(pybind11::module_& m);               // lbfgs_glue.cpp -> lbfgs.cu
void bind_softmax_linear_hvp(pybind11::module_& m);  // softmax_linear_hvp_glue.cpp -> softmax_linear_hvp.cu
}  // namespace unlearn_fast::cuda
