#pragma once
// A B' for the CPU kernels' large products: float32 goes to oneDNN's matmul (torch's
// mkldnn::_linear_pointwise, the op torch.compile uses for CPU linear layers), everything else to
// at::mm. Why: torch's float32 at::mm calls MKL, whose sgemm takes its AVX2 path on AMD CPUs
// (109 GFLOP/s per core on this Zen 5, the AVX2 peak), while oneDNN's brgemm uses AVX-512: 2.2x on
// softmax_linear_hvp's shapes, same float32 arithmetic. It honours torch's switches: with
// torch.backends.mkldnn disabled, or a torch built without oneDNN, this is at::mm.
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

namespace unlearn_fast::cpu {

inline torch::Tensor matmul_nt(const torch::Tensor& A, const torch::Tensor& B) {
  static const std::optional<c10::OperatorHandle> onednn_linear =
      c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
  if (!onednn_linear || A.scalar_type() != at::kFloat || !at::globalContext().userEnabledMkldnn()) {
    return at::mm(A, B.t());
  }
  // Boxed call: (input, weight, bias, attr, scalars, algorithm) -> input weight' (no bias, no post-op).
  std::vector<c10::IValue> stack{A, B, c10::IValue(), std::string("none"), c10::List<std::optional<at::Scalar>>(),
                                 std::string("")};
  onednn_linear->callBoxed(&stack);
  return stack.front().toTensor();
}

}  // namespace unlearn_fast::cpu
