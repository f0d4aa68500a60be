// softmax_linear_hvp on the CPU: H V_j = X' R_j / n for the Hessian of mean softmax cross-entropy
// of logits X W' with respect to W, with R_j = P * Z_j - P (P * Z_j) 1 1' and Z_j = X V_j'.
//
// The two large products (Z = X [V_1; ...; V_k]' and X' R) go to BLAS; between them one fused pass
// per row turns the logits into softmax probabilities and Z into R in place, already scaled by 1/n.
// Z is laid out (rows, k m) so both products are plain GEMMs with no transposed copy, and the rows
// are taken in blocks so each block's Z is still in cache when the second product reads it.
//
// Both GEMMs run on m = c - 1 classes, not c: diag(p) - p p' annihilates the all-ones vector, so
// shifting every class row of V_j by the last one changes nothing (that class's z becomes 0), and
// the rows of R sum to zero, so the last class's output is minus the sum of the others. That is
// (c - 1) / c of the floating-point work (0.9 for c = 10, half for two classes).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"

namespace unlearn_fast::cpu {
namespace {

template <typename scalar_t>
void softmax_jacobian_rows(scalar_t* logits, scalar_t* Z, int64_t n, int64_t c, int64_t k, double inv_n) {
  const int64_t m = c - 1;  // Z holds the shifted classes 0 .. c - 2; the last one's z is 0
  // Reductions in double: c can be a vocabulary (tens of thousands) for language models. The per-element
  // update runs in scalar_t with p pre-scaled by 1/n, so it vectorises (it was 10% of the op in double).
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> p_over_n(c);
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
      for (int64_t a = 0; a < c; ++a) {
        const double probability = static_cast<double>(p[a]) * inv_total;
        p[a] = static_cast<scalar_t>(probability);
        p_over_n[a] = static_cast<scalar_t>(probability * inv_n);
      }
      const scalar_t* scaled = p_over_n.data();
      for (int64_t j = 0; j < k; ++j) {
        scalar_t* z = Z + (i * k + j) * m;
        double pz = 0.0;
#pragma omp simd reduction(+ : pz)
        for (int64_t a = 0; a < m; ++a) pz += static_cast<double>(p[a]) * static_cast<double>(z[a]);
        const scalar_t shift = static_cast<scalar_t>(pz);
#pragma omp simd
        for (int64_t a = 0; a < m; ++a) z[a] = scaled[a] * (z[a] - shift);
      }
    }
  });
}

// Rows per block: the block's Z (rows x k c) stays in cache between the two products.
constexpr int64_t kRowBlock = 512;

// Arguments arrive validated and contiguous from unlearn_fast/ops.py.
torch::Tensor softmax_linear_hvp_cpu(const torch::Tensor& X, const torch::Tensor& W, const torch::Tensor& V) {
  const int64_t n = X.size(0), d = X.size(1), c = W.size(0), k = V.size(0), m = c - 1;
  torch::Tensor out = at::empty({k, c, d}, X.options());
  if (m == 0) return out.zero_();  // one class: the softmax is constant, so is the loss
  const torch::Tensor V_rows = (V.narrow(1, 0, m) - V.narrow(1, m, 1)).reshape({k * m, d});
  torch::Tensor out_rows = at::zeros({k * m, d}, X.options());  // row j m + a is (H V_j)[a, :]
  for (int64_t start = 0; start < n; start += kRowBlock) {
    const torch::Tensor Xb = X.narrow(0, start, std::min(kRowBlock, n - start));
    torch::Tensor logits = at::mm(Xb, W.t()).contiguous();  // (rows, c)
    torch::Tensor Z = at::mm(Xb, V_rows.t()).contiguous();  // (rows, k m)
    AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "softmax_linear_hvp_cpu", [&] {
      softmax_jacobian_rows<scalar_t>(logits.data_ptr<scalar_t>(), Z.data_ptr<scalar_t>(), Xb.size(0), c, k,
                                      1.0 / static_cast<double>(n));
    });
    out_rows.addmm_(Z.t(), Xb);
  }
  const torch::Tensor shifted = out_rows.view({k, m, d});
  out.narrow(1, 0, m).copy_(shifted);
  out.select(1, m).copy_(shifted.sum(1)).neg_();  // the rows of R sum to zero
  return out;
}

}  // namespace

void bind_softmax_linear_hvp(pybind11::module_& m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("softmax_linear_hvp_cpu", &softmax_linear_hvp_cpu, "H V for softmax cross-entropy of a linear layer (X, W, V)",
        release());
}
}  // namespace unlearn_fast::cpu
