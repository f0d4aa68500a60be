// Torch glue for softmax_linear_hvp on CUDA: softmax_linear_hvp_cuda(X, W, V) -> (k, c, d).
// The two large products go to torch (cuBLAS) on the current stream; between them the torch-free
// kernel of softmax_linear_hvp.cu turns the logits into probabilities and Z = X [V_1; ...; V_k]'
// into R / n in place (one warp per row). Z is (n, k m), so both products are plain GEMMs.
// As on the CPU (csrc/cpu/softmax_linear_hvp.cpp), the GEMMs run on m = c - 1 classes shifted by the
// last one, whose output is minus the sum of the others.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "bindings.h"

extern "C" cudaError_t uf_softmax_jacobian_rows(void* logits, void* Z, int dtype, int64_t n, int64_t c, int64_t m,
                                                int64_t k, double inv_n, cudaStream_t stream);  // softmax_linear_hvp.cu

namespace unlearn_fast::cuda {
namespace {

at::Tensor softmax_linear_hvp_cuda(const at::Tensor& X, const at::Tensor& W, const at::Tensor& V) {
  const char* op = "softmax_linear_hvp_cuda";
  TORCH_CHECK(X.dim() == 2 && W.dim() == 2 && V.dim() == 3, op, ": X (n, d), W (c, d), V (k, c, d) expected, got ",
              X.sizes(), ", ", W.sizes(), ", ", V.sizes());
  TORCH_CHECK(W.size(1) == X.size(1) && V.size(1) == W.size(0) && V.size(2) == W.size(1), op,
              ": shapes do not match: X ", X.sizes(), ", W ", W.sizes(), ", V ", V.sizes());
  TORCH_CHECK(X.scalar_type() == at::kFloat || X.scalar_type() == at::kDouble, op, ": X must be float32 or float64");
  TORCH_CHECK(W.scalar_type() == X.scalar_type() && V.scalar_type() == X.scalar_type(), op,
              ": X, W and V must share one dtype");
  TORCH_CHECK(X.is_cuda() && W.device() == X.device() && V.device() == X.device(), op,
              ": X, W and V must be CUDA tensors on one device");
  const c10::cuda::CUDAGuard guard(X.device());
  const at::Tensor Xc = X.contiguous(), Wc = W.contiguous(), Vc = V.contiguous();
  const int64_t n = Xc.size(0), d = Xc.size(1), c = Wc.size(0), k = Vc.size(0), m = c - 1;
  at::Tensor out = at::empty({k, c, d}, X.options());
  if (m == 0) return out.zero_();  // one class: the softmax is constant, so is the loss
  at::Tensor logits = at::mm(Xc, Wc.t()).contiguous();  // (n, c)
  const at::Tensor V_rows = (Vc.narrow(1, 0, m) - Vc.narrow(1, m, 1)).reshape({k * m, d});
  at::Tensor Z = at::mm(Xc, V_rows.t()).contiguous();  // (n, k m)
  const int dtype = X.scalar_type() == at::kFloat ? 0 : 1;
  const cudaError_t err = uf_softmax_jacobian_rows(logits.data_ptr(), Z.data_ptr(), dtype, n, c, m, k,
                                                   1.0 / static_cast<double>(n), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
  const at::Tensor shifted = at::mm(Z.t(), Xc).view({k, m, d});  // row j m + a is (H V_j)[a, :]
  out.narrow(1, 0, m).copy_(shifted);
  out.select(1, m).copy_(shifted.sum(1)).neg_();  // the rows of R sum to zero
  return out;
}

}  // namespace

void bind_softmax_linear_hvp(pybind11::module_& m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("softmax_linear_hvp_cuda", &softmax_linear_hvp_cuda, "H V for softmax cross-entropy of a linear layer (CUDA)",
        release());
}

}  // namespace unlearn_fast::cuda
