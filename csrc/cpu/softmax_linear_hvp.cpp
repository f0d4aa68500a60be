// softmax_linear_hvp on the CPU: H V_j = R_j' X / n for the Hessian of mean softmax cross-entropy
// of logits X W' with respect to W, with R_j = P * Z_j - P (P * Z_j) 1 1' and Z_j = X V_j'.
//
// Samples are taken in blocks. Per block, one GEMM gives the logits and every Z_j together,
// transposed ([W; V_1; ...; V_k] X_b', classes x samples, so a class's values over the block's samples
// are contiguous); one fused pass over the samples, vectorised across them, forms the softmax and turns
// Z' into R' / n in place; a second GEMM adds R' X_b. The GEMMs go through matmul_nt (gemm.h).
//
// Both GEMMs run on m = c - 1 classes, not c: diag(p) - p p' annihilates the all-ones vector, so
// shifting every class row of V_j by the last one changes nothing (that class's z becomes 0), and
// the rows of R sum to zero, so the last class's output is minus the sum of the others. That is
// (c - 1) / c of the floating-point work (0.9 for c = 10, half for two classes).

#include <algorithm>
#include <cmath>

#include "gemm.h"
#include "kernels.h"
#include "parallel.h"

namespace unlearn_fast::cpu {
namespace {

// Samples per block: up to 1024 (larger blocks gained nothing at n = 4096, d = 512, c = 10, k = 32), fewer
// when c + k (c - 1) is large (a vocabulary-sized c) so the block's workspace stays near 16 MB of floats,
// but never under 64.
int64_t sample_block(int64_t c, int64_t k) {
  constexpr int64_t kWorkspaceValues = int64_t{1} << 22;
  return std::clamp<int64_t>(kWorkspaceValues / (c + k * (c - 1)), 64, 1024);
}
constexpr int64_t kLanes = 64;  // samples per task of the fused pass; its double accumulators stay in L1

// G: (c + k m, b), one sample block: the c logits rows, then Z_j' for j = 0 .. k - 1 (m rows each).
// For the w <= kLanes samples from `begin`: logits become probabilities and each Z_j' becomes R_j' / n.
// Sums in double: c can be a vocabulary (tens of thousands) for language models. The per-element
// update runs in scalar_t with p pre-scaled by 1/n, so it vectorises.
template <typename scalar_t>
void softmax_jacobian_lanes(scalar_t* G, int64_t b, int64_t c, int64_t k, double inv_n, int64_t begin, int64_t w) {
  const int64_t m = c - 1;
  scalar_t* P = G + begin;          // P[a * b + i]: class a, sample begin + i
  scalar_t* Z = G + c * b + begin;  // Z[(j m + a) * b + i]
  double row_max[kLanes], inv_total[kLanes], pz[kLanes];
  scalar_t p_over_n[kLanes];
  std::fill(row_max, row_max + w, -INFINITY);
  std::fill(inv_total, inv_total + w, 0.0);
  for (int64_t a = 0; a < c; ++a) {
    for (int64_t i = 0; i < w; ++i) row_max[i] = std::max(row_max[i], static_cast<double>(P[a * b + i]));
  }
  for (int64_t a = 0; a < c; ++a) {
    for (int64_t i = 0; i < w; ++i) {
      const double e = std::exp(static_cast<double>(P[a * b + i]) - row_max[i]);
      P[a * b + i] = static_cast<scalar_t>(e);
      inv_total[i] += e;
    }
  }
  for (int64_t i = 0; i < w; ++i) inv_total[i] = 1.0 / inv_total[i];
  for (int64_t a = 0; a < c; ++a) {
    for (int64_t i = 0; i < w; ++i) P[a * b + i] = static_cast<scalar_t>(static_cast<double>(P[a * b + i]) * inv_total[i]);
  }
  for (int64_t j = 0; j < k; ++j) {
    scalar_t* Zj = Z + j * m * b;
    std::fill(pz, pz + w, 0.0);
    for (int64_t a = 0; a < m; ++a) {
#pragma omp simd
      for (int64_t i = 0; i < w; ++i) pz[i] += static_cast<double>(P[a * b + i]) * static_cast<double>(Zj[a * b + i]);
    }
    for (int64_t a = 0; a < m; ++a) {
      for (int64_t i = 0; i < w; ++i) p_over_n[i] = static_cast<scalar_t>(static_cast<double>(P[a * b + i]) * inv_n);
      scalar_t* z = Zj + a * b;
#pragma omp simd
      for (int64_t i = 0; i < w; ++i) z[i] = p_over_n[i] * (z[i] - static_cast<scalar_t>(pz[i]));
    }
  }
}

template <typename scalar_t>
void softmax_jacobian_columns(scalar_t* G, int64_t b, int64_t c, int64_t k, double inv_n) {
  // parallel_for's grain is a minimum task size, not a maximum: each task walks its range kLanes at a time.
  parallel_for(0, b, kLanes, [&](int64_t first, int64_t last) {
    for (int64_t begin = first; begin < last; begin += kLanes) {
      softmax_jacobian_lanes(G, b, c, k, inv_n, begin, std::min(kLanes, last - begin));
    }
  });
}

// Arguments arrive validated and contiguous from unlearn_fast/ops.py.
torch::Tensor softmax_linear_hvp_cpu(const torch::Tensor& X, const torch::Tensor& W, const torch::Tensor& V) {
  const int64_t n = X.size(0), d = X.size(1), c = W.size(0), k = V.size(0), m = c - 1;
  torch::Tensor out = at::empty({k, c, d}, X.options());
  if (m == 0) return out.zero_();  // one class: the softmax is constant, so is the loss
  // Row j m + a of V_rows is V_j's class a minus its last class; stacked under W for one GEMM per block.
  const torch::Tensor V_rows = (V.narrow(1, 0, m) - V.narrow(1, m, 1)).reshape({k * m, d});
  const torch::Tensor WV = at::cat({W, V_rows});
  torch::Tensor out_rows;  // row j m + a is (H V_j)[a, :]
  const int64_t rows_per_block = sample_block(c, k);
  for (int64_t start = 0; start < n; start += rows_per_block) {
    const torch::Tensor Xb = X.narrow(0, start, std::min(rows_per_block, n - start));
    torch::Tensor G = matmul_nt(WV, Xb).contiguous();  // (c + k m, rows)
    AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "softmax_linear_hvp_cpu", [&] {
      softmax_jacobian_columns<scalar_t>(G.data_ptr<scalar_t>(), Xb.size(0), c, k, 1.0 / static_cast<double>(n));
    });
    torch::Tensor partial = matmul_nt(G.narrow(0, c, k * m), Xb.t());
    out_rows = out_rows.defined() ? out_rows.add_(partial) : partial;
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
