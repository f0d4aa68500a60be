// Torch glue for the CUDA L-BFGS kernels (lbfgs.cu): lbfgs_gram_cuda, lbfgs_matvec_cuda and
// qn_step__cuda, with the arguments of the ops in unlearn_fast/ops.py. The kernels return float64
// partial sums per CUDA block; the glue adds them and does the 2m x 2m algebra with torch on the
// same stream, so nothing waits for the host.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "bindings.h"
#include "lbfgs.h"

namespace unlearn_fast::cuda {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void check_pairs(const char* op, const at::Tensor& S, const at::Tensor& Y) {
  TORCH_CHECK(S.dim() == 2 && S.sizes() == Y.sizes(), op, ": S and Y must be (m, p) of one shape, got ", S.sizes(),
              " and ", Y.sizes());
  TORCH_CHECK(S.size(0) >= 1, op, ": S must hold at least one curvature pair");
  TORCH_CHECK(S.size(0) <= uf_lbfgs_max_pairs(), op, ": at most ", uf_lbfgs_max_pairs(), " curvature pairs, got ",
              S.size(0));
  TORCH_CHECK(S.size(1) >= 1, op, ": S has no columns");
  TORCH_CHECK(S.scalar_type() == Y.scalar_type() && (S.scalar_type() == at::kFloat || S.scalar_type() == at::kDouble),
              op, ": S and Y must both be float32 or both float64");
  TORCH_CHECK(S.is_cuda() && Y.device() == S.device(), op, ": S and Y must be CUDA tensors on one device");
  TORCH_CHECK(S.is_contiguous() && Y.is_contiguous(), op, ": S and Y must be contiguous");
}

void check_compact(const char* op, const at::Tensor& sigma, const at::Tensor& Minv, int64_t m,
                   const at::Device& device) {
  TORCH_CHECK(sigma.dim() == 0 && sigma.scalar_type() == at::kDouble && sigma.device() == device, op,
              ": sigma must be a 0-dim float64 tensor on ", device);
  TORCH_CHECK(Minv.dim() == 2 && Minv.size(0) == 2 * m && Minv.size(1) == 2 * m && Minv.scalar_type() == at::kDouble &&
                  Minv.device() == device,
              op, ": Minv must be a (2m, 2m) float64 tensor on ", device);
}

UfRows dense_rows(const at::Tensor& S, const at::Tensor& Y) {
  return UfRows{S.data_ptr(), Y.data_ptr(), S.scalar_type() == at::kFloat ? UF_ROWS_FLOAT32 : UF_ROWS_FLOAT64,
                nullptr, nullptr, 0};
}

int float_dtype(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? UF_FLOAT32 : UF_FLOAT64; }

// coef = [c_Y; sigma c_S] with c = Minv [Y V; sigma S V]; WtV (2m, k) holds [Y V; S V].
at::Tensor compact_coefficients(const at::Tensor& WtV, const at::Tensor& sigma, const at::Tensor& Minv, int64_t m) {
  const at::Tensor scaled = at::cat({WtV.slice(0, 0, m), WtV.slice(0, m) * sigma}, 0);
  const at::Tensor c = at::matmul(Minv, scaled);
  return at::cat({c.slice(0, 0, m), c.slice(0, m) * sigma}, 0).contiguous();
}

std::tuple<at::Tensor, at::Tensor> lbfgs_gram_cuda(const at::Tensor& S, const at::Tensor& Y) {
  const char* op = "lbfgs_gram_cuda";
  check_pairs(op, S, Y);
  const c10::cuda::CUDAGuard guard(S.device());
  const int64_t m = S.size(0), p = S.size(1);
  // partials (m, blocks, 2m): [j, b, r] = block b's part of row_r . s_j, rows = [Y; S].
  auto partials = at::empty({m, uf_lbfgs_reduce_blocks(p), 2 * m}, S.options().dtype(at::kDouble));
  check_launch(uf_lbfgs_gram(dense_rows(S, Y), m, p, partials.data_ptr<double>(), c10::cuda::getCurrentCUDAStream()),
               op);
  const at::Tensor dots = partials.sum(1);  // (m, 2m): [i, j] = s_i . y_j, [i, m + j] = s_i . s_j
  return {dots.slice(1, m).contiguous(), dots.slice(1, 0, m).contiguous()};
}

at::Tensor lbfgs_matvec_cuda(const at::Tensor& S, const at::Tensor& Y, const at::Tensor& sigma, const at::Tensor& Minv,
                             const at::Tensor& V) {
  const char* op = "lbfgs_matvec_cuda";
  check_pairs(op, S, Y);
  const int64_t m = S.size(0), p = S.size(1);
  check_compact(op, sigma, Minv, m, S.device());
  TORCH_CHECK((V.dim() == 1 || V.dim() == 2) && V.size(0) == p, op, ": V must be (p,) or (p, k) with p = ", p,
              ", got ", V.sizes());
  TORCH_CHECK(V.scalar_type() == at::kFloat || V.scalar_type() == at::kDouble, op, ": V must be float32 or float64");
  TORCH_CHECK(V.device() == S.device() && V.is_contiguous(), op, ": V must be a contiguous tensor on ", S.device());
  const int64_t k = V.dim() == 2 ? V.size(1) : 1;
  if (k == 0) return at::empty_like(V, at::MemoryFormat::Contiguous);  // (p, 0): nothing to multiply, as on CPU
  const c10::cuda::CUDAGuard guard(S.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const UfRows rows = dense_rows(S, Y);
  auto partials = at::empty({k, uf_lbfgs_reduce_blocks(p), 2 * m}, S.options().dtype(at::kDouble));
  check_launch(uf_lbfgs_row_dots(rows, m, p, V.data_ptr(), float_dtype(V), k, 1, k, partials.data_ptr<double>(),
                                 stream),
               op);
  const at::Tensor WtV = partials.sum(1).t();  // (2m, k) = [Y V; S V]
  const at::Tensor coef = compact_coefficients(WtV, sigma, Minv.contiguous(), m);
  auto out = at::empty_like(V, at::MemoryFormat::Contiguous);
  check_launch(uf_lbfgs_matvec_apply(rows, m, p, V.data_ptr(), float_dtype(V), k, sigma.data_ptr<double>(),
                                     coef.data_ptr<double>(), out.data_ptr(), stream),
               op);
  return out;
}

at::Tensor qn_step__cuda(at::Tensor& w, const at::Tensor& w_ref, const at::Tensor& g_ref, const at::Tensor& g_extra,
                         const at::Tensor& S, const at::Tensor& Y, const at::Tensor& sigma, const at::Tensor& Minv,
                         double eta, double alpha, double beta, double lam, const std::optional<at::Tensor>& S_scales,
                         const std::optional<at::Tensor>& Y_scales, int64_t blocksize, int64_t bits) {
  const char* op = "qn_step__cuda";
  const auto dtype = w.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": w must be float32 or float64, got ", dtype);
  TORCH_CHECK(w.is_cuda() && w.dim() == 1 && w.numel() > 0 && w.is_contiguous(), op,
              ": w must be a non-empty contiguous (p,) CUDA tensor");
  const int64_t p = w.numel();
  for (const auto* t : {&w_ref, &g_ref, &g_extra}) {
    TORCH_CHECK(t->sizes() == w.sizes() && t->scalar_type() == dtype && t->is_contiguous() && t->device() == w.device(),
                op, ": w_ref, g_ref and g_extra must be contiguous tensors like w");
  }
  TORCH_CHECK(S.dim() == 2 && S.sizes() == Y.sizes() && S.is_contiguous() && Y.is_contiguous() &&
                  S.device() == w.device() && Y.device() == w.device(),
              op, ": S and Y must be contiguous (m, ...) tensors of one shape on ", w.device());
  const int64_t m = S.size(0);
  TORCH_CHECK(m >= 1 && m <= uf_lbfgs_max_pairs(), op, ": S must hold 1 to ", uf_lbfgs_max_pairs(),
              " curvature pairs, got ", m);
  UfRows rows{S.data_ptr(), Y.data_ptr(), dtype == at::kFloat ? UF_ROWS_FLOAT32 : UF_ROWS_FLOAT64, nullptr, nullptr,
              blocksize};
  const bool quantized = S_scales.has_value() || Y_scales.has_value();
  if (quantized) {
    TORCH_CHECK(S_scales.has_value() && Y_scales.has_value(), op, ": give both S_scales and Y_scales, or neither");
    TORCH_CHECK(bits == 4 || bits == 8, op, ": bits must be 4 or 8, got ", bits);
    TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0, op,
                ": blocksize must be a power of two in [32, 4096], got ", blocksize);
    const int64_t row_bytes = bits == 8 ? p : (p + 1) / 2, row_blocks = (p + blocksize - 1) / blocksize;
    TORCH_CHECK(S.scalar_type() == (bits == 8 ? at::kChar : at::kByte) && Y.scalar_type() == S.scalar_type() &&
                    S.size(1) == row_bytes,
                op, ": quantized S and Y must be (m, ", row_bytes, ") ", bits == 8 ? "int8" : "uint8", " codes");
    for (const auto* scales : {&*S_scales, &*Y_scales}) {
      TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->dim() == 2 && scales->size(0) == m &&
                      scales->size(1) == row_blocks && scales->is_contiguous() && scales->device() == w.device(),
                  op, ": S_scales and Y_scales must be contiguous (", m, ", ", row_blocks, ") float32 tensors on ",
                  w.device());
    }
    rows.kind = bits == 8 ? UF_ROWS_Q8 : UF_ROWS_Q4;
    rows.s_scales = S_scales->data_ptr<float>();
    rows.y_scales = Y_scales->data_ptr<float>();
  } else {
    TORCH_CHECK(S.scalar_type() == dtype && Y.scalar_type() == dtype && S.size(1) == p, op,
                ": S and Y must be (m, p) with w's dtype");
  }
  check_compact(op, sigma, Minv, m, w.device());
  const c10::cuda::CUDAGuard guard(w.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto f64 = w.options().dtype(at::kDouble);
  const int type = dtype == at::kFloat ? UF_FLOAT32 : UF_FLOAT64;

  auto dots = at::empty({uf_lbfgs_reduce_blocks(p), 2 * m}, f64);
  check_launch(uf_qn_row_dots(rows, m, p, w.data_ptr(), w_ref.data_ptr(), type, dots.data_ptr<double>(), stream), op);
  const at::Tensor coef = compact_coefficients(dots.sum(0), sigma, Minv.contiguous(), m);  // (2m,)
  auto norm_partials = at::empty({uf_qn_update_blocks(p)}, f64);
  check_launch(uf_qn_update(rows, m, p, w.data_ptr(), w_ref.data_ptr(), g_ref.data_ptr(), g_extra.data_ptr(), type,
                            sigma.data_ptr<double>(), coef.data_ptr<double>(), eta, alpha, beta, lam,
                            norm_partials.data_ptr<double>(), stream),
               op);
  return norm_partials.sum().sqrt();
}

}  // namespace

void bind_lbfgs(pybind11::module_& m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("lbfgs_gram_cuda", &lbfgs_gram_cuda, "(S S', S Y') in float64 (CUDA)", release());
  m.def("lbfgs_matvec_cuda", &lbfgs_matvec_cuda, "compact L-BFGS product B V (CUDA)", release());
  m.def("qn_step__cuda", &qn_step__cuda, "fused quasi-Newton / contraction step, in place on w (CUDA)", release());
}

}  // namespace unlearn_fast::cuda
