// unlearn_fast._C: the compiled kernels, exposed as plain functions "<op>_cpu" / "<op>_cuda".
// The torch ops themselves (schemas, fake kernels, dispatch) are declared in unlearn_fast/ops.py;
// each function here takes exactly its op's arguments (see unlearn_fast/backends.py).
#include <torch/extension.h>

#include "cpu/kernels.h"
#ifdef WITH_CUDA
#include "cuda/bindings.h"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "unlearn_fast compiled kernels";
  unlearn_fast::cpu::bind_codec(m);
  unlearn_fast::cpu::bind_lbfgs(m);
  unlearn_fast::cpu::bind_softmax_linear_hvp(m);
  unlearn_fast::cpu::bind_parallel(m);
#ifdef WITH_CUDA
  m.attr("WITH_CUDA") = true;
  unlearn_fast::cuda::bind_codec(m);
  unlearn_fast::cuda::bind_lbfgs(m);
  unlearn_fast::cuda::bind_softmax_linear_hvp(m);
#else
  m.attr("WITH_CUDA") = false;
#endif
}
