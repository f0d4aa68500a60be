// softmax_linear_hvp on the CPU: H V_j = X' R_j / n for the Hessian of mean softmax cross-entropy
// of logits X W' with respect to W, with R_j = P * Z_j - P (P * Z_j) 1 1' and Z_j = X V_j'.
//
// The two large products (Z = X [V_1; ...; V_k]' and X' R) go to BLAS; between them one fused pass
// per row turns the logits into softmax probabilities and Z into R in place, already scaled by 1/n.
// Z is laid out (rows, k c) so both products are plain GEMMs with no transposed copy, and the rows
// are taken in blocks so each block's Z is still in cache when the second product reads it.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "kernels.h"

namespace unlearn_fast::cpu {
namespace {

template <typename scalar_t>
void softmax_jacobian_rows(scalar_t* logits, scalar_t* Z, int64_t n, int64_t c, int64_t k, double inv_n) {
  // Reductions in double: c can be a vocabulary (tens of thousands) for language models.
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* p = logits + i * c;
      double row_max = -INFINITY;
      for (int64_t a = 0; a < c; ++a) row_max = std::max(row_max, static_cast<double>(p[a]));
      double total = 0.0;
      for (int64_t a = 0; a < c; ++a) {
        double e = std::exp(static_cast<double>(p[a]) - row_max);
        p[a] = static_cast<scalar_t>(e);
        total += e;
      }
      const double inv_total = 1.0 / total;
      for (int64_t a = 0; a < c; ++a) p[a] = static_cast<scalar_t>(static_cast<double>(p[a]) * inv_total);
      for (int64_t j = 0; j < k; ++j) {
        scalar_t* z = Z + (i * k + j) * c;
        double pz = 0.0;
        for (int64_t a = 0; a < c; ++a) pz += static_cast<double>(p[a]) * static_cast<double>(z[a]);
        for (int64_t a = 0; a < c; ++a) {
          z[a] = static_cast<scalar_t>(static_cast<double>(p[a]) * (static_cast<double>(z[a]) - pz) * inv_n);
        }
      }
    }
  });
}

// Rows per block: the block's Z (rows x k c) stays in cache between the two products.
constexpr int64_t kRowBlock = 512;

// Arguments arrive validated and contiguous from unlearn_fast/ops.py.
torch::Tensor softmax_linear_hvp_cpu(const torch::Tensor& X, const torch::Tensor& W, const torch::Tensor& V) {
  const int64_t n = X.size(0), d = X.size(1), c = W.size(0), k = V.size(0);
  const torch::Tensor V_rows = V.view({k * c, d});
  torch::Tensor out = at::zeros({k * c, d}, X.options());  // row j c + a is (H V_j)[a, :]
  for (int64_t start = 0; start < n; start += kRowBlock) {
    const torch::Tensor Xb = X.narrow(0, start, std::min(kRowBlock, n - start));
    torch::Tensor logits = at::mm(Xb, W.t()).contiguous();  // (rows, c)
    torch::Tensor Z = at::mm(Xb, V_rows.t()).contiguous();  // (rows, k c)
    AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "softmax_linear_hvp_cpu", [&] {
      softmax_jacobian_rows<scalar_t>(logits.data_ptr<scalar_t>(), Z.data_ptr<scalar_t>(), Xb.size(0), c, k,
                                      1.0 / static_cast<double>(n));
    });
    out.addmm_(Z.t(), Xb);
  }
  return out.view({k, c, d});
}

}  // namespace

void bind_softmax_linear_hvp(pybind11::module_& m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("softmax_linear_hvp_cpu", &softmax_linear_hvp_cpu, "H V for softmax cross-entropy of a linear layer (X, W, V)",
        release());
}
}  // namespace unlearn_fast::cpu
