// Compact L-BFGS on CPU: lbfgs_gram (S S', S Y'), lbfgs_matvec (B V) and the fused qn_step_.
// B = sigma I - W Minv W', W = [Y', sigma S'] for curvature pairs stored as rows of S, Y (m, p).
// Every kernel is one or two streaming passes over p, split into fixed chunks with parallel_for (parallel.h).
// Reductions write one partial per chunk and are summed in chunk order, so results do not depend
// on the thread count.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "parallel.h"

namespace unlearn_fast::cpu {

// Defined in codec.cpp: float32 values code * scale for elements [begin, begin + len) of a stream.
void decode_codes(const void* codes, int64_t bits, const float* scales, int64_t blocksize, int64_t begin,
                  int64_t len, float* out);

namespace {

// A tile is one contiguous run per row (16 KB of float32) and rows are visited one after another,
// so only a couple of memory streams are live at a time and the per-tile buffers (v, B v) stay in
// L1. Measured at p = 2^24, m = 8 on one thread: qn_step_ reads as fast as a plain x.sum().
constexpr int64_t kTile = 4096;
constexpr int64_t kSum = 512;           // float partial sums run over at most this many terms
constexpr int64_t kChunk = 8 * kTile;  // elements per parallel task

int64_t num_chunks(int64_t p) { return (p + kChunk - 1) / kChunk; }

// da += v.a and db += v.b in one sweep (v loaded once, two memory streams in flight instead of
// one): in double, from T lanes over runs of kSum terms when T is float.
template <typename T>
inline void dot2(const T* v, const T* a, const T* b, int64_t len, double& da, double& db) {
  for (int64_t start = 0; start < len; start += kSum) {
    const int64_t stop = std::min(len, start + kSum);
    T sa = 0, sb = 0;
#pragma omp simd reduction(+ : sa, sb)
    for (int64_t i = start; i < stop; ++i) {
      sa += v[i] * a[i];
      sb += v[i] * b[i];
    }
    da += double(sa);
    db += double(sb);
  }
}

// sum a[i] * b[i] with every product and sum in double (float products are exact in double).
// Not inlined: inlined into gram_impl's pair loops GCC vectorised it about 5x slower (measured).
template <typename TA, typename TB>
__attribute__((noinline)) double dot_f64(const TA* a, const TB* b, int64_t len) {
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < len; ++i) sum += double(a[i]) * double(b[i]);
  return sum;
}

// ----------------------------------------------------------------------------- lbfgs_gram
template <typename T>
std::tuple<at::Tensor, at::Tensor> gram_impl(const at::Tensor& S, const at::Tensor& Y) {
  const int64_t m = S.size(0), p = S.size(1);
  const T* s = S.data_ptr<T>();
  const T* y = Y.data_ptr<T>();
  const int64_t nchunks = num_chunks(p);
  // Per chunk: the m x m blocks of S S' and S Y'.
  std::vector<double> partial(nchunks * 2 * m * m, 0.0);
  parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double* ss = partial.data() + c * 2 * m * m;
      double* sy = ss + m * m;
      const int64_t chunk_end = std::min(p, (c + 1) * kChunk);
      for (int64_t begin = c * kChunk; begin < chunk_end; begin += kTile) {
        const int64_t len = std::min(kTile, chunk_end - begin);
        for (int64_t a = 0; a < m; ++a) {
          const T* sa = s + a * p + begin;
          for (int64_t b = 0; b < m; ++b) {
            if (b >= a) ss[a * m + b] += dot_f64(sa, s + b * p + begin, len);
            sy[a * m + b] += dot_f64(sa, y + b * p + begin, len);
          }
        }
      }
    }
  });
  auto opts = S.options().dtype(at::kDouble);
  auto SS = at::zeros({m, m}, opts), SY = at::zeros({m, m}, opts);
  double* ss = SS.data_ptr<double>();
  double* sy = SY.data_ptr<double>();
  for (int64_t c = 0; c < nchunks; ++c) {
    const double* part = partial.data() + c * 2 * m * m;
    for (int64_t k = 0; k < m * m; ++k) {
      ss[k] += part[k];
      sy[k] += part[m * m + k];
    }
  }
  for (int64_t a = 0; a < m; ++a)
    for (int64_t b = 0; b < a; ++b) ss[a * m + b] = ss[b * m + a];
  return {SS, SY};
}

void check_pairs(const at::Tensor& S, const at::Tensor& Y) {
  TORCH_CHECK(S.dim() == 2 && S.sizes() == Y.sizes(), "S and Y must be (m, p) of one shape");
  TORCH_CHECK(S.size(0) >= 1, "S must hold at least one curvature pair");
  TORCH_CHECK(S.scalar_type() == Y.scalar_type() && (S.scalar_type() == at::kFloat || S.scalar_type() == at::kDouble),
              "S and Y must both be float32 or both float64");
  TORCH_CHECK(S.device().is_cpu() && Y.device().is_cpu(), "S and Y must be CPU tensors");
  TORCH_CHECK(S.is_contiguous() && Y.is_contiguous(), "S and Y must be contiguous");
}

std::tuple<at::Tensor, at::Tensor> lbfgs_gram_cpu(const at::Tensor& S, const at::Tensor& Y) {
  check_pairs(S, Y);
  return S.scalar_type() == at::kFloat ? gram_impl<float>(S, Y) : gram_impl<double>(S, Y);
}

// ----------------------------------------------------------------------------- lbfgs_matvec
void check_compact(const at::Tensor& sigma, const at::Tensor& Minv, int64_t m) {
  TORCH_CHECK(sigma.dim() == 0 && sigma.scalar_type() == at::kDouble && sigma.device().is_cpu(),
              "sigma must be a 0-dim float64 CPU tensor");
  TORCH_CHECK(Minv.dim() == 2 && Minv.size(0) == 2 * m && Minv.size(1) == 2 * m && Minv.scalar_type() == at::kDouble &&
                  Minv.is_contiguous() && Minv.device().is_cpu(),
              "Minv must be a contiguous (2m, 2m) float64 CPU tensor");
}

// c = Minv [Y V; sigma S V] for the (2m, k) reductions WtV = [Y V; S V] (S rows scaled here).
std::vector<double> solve_small(const at::Tensor& Minv, std::vector<double> WtV, double sigma, int64_t m, int64_t k) {
  for (int64_t r = m; r < 2 * m; ++r)
    for (int64_t l = 0; l < k; ++l) WtV[r * k + l] *= sigma;
  const double* M = Minv.data_ptr<double>();
  std::vector<double> c(2 * m * k, 0.0);
  for (int64_t r = 0; r < 2 * m; ++r)
    for (int64_t q = 0; q < 2 * m; ++q)
      for (int64_t l = 0; l < k; ++l) c[r * k + l] += M[r * 2 * m + q] * WtV[q * k + l];
  return c;
}

template <typename TS, typename TV>
at::Tensor matvec_impl(const at::Tensor& S, const at::Tensor& Y, double sigma, const at::Tensor& Minv,
                       const at::Tensor& V) {
  const int64_t m = S.size(0), p = S.size(1);
  const int64_t k = V.dim() == 2 ? V.size(1) : 1;
  const TS* s = S.data_ptr<TS>();
  const TS* y = Y.data_ptr<TS>();
  const TV* v = V.data_ptr<TV>();
  const int64_t nchunks = num_chunks(p);
  // Column l of V over elements [begin, begin + len), in double.
  auto load_column = [&](int64_t begin, int64_t len, int64_t l, double* out) {
    for (int64_t i = 0; i < len; ++i) out[i] = double(v[(begin + i) * k + l]);
  };

  // Pass 1: WtV = [Y V; S V] in double, one partial per chunk.
  std::vector<double> partial(nchunks * 2 * m * k, 0.0);
  parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<double> column(kTile);
    for (int64_t c = c0; c < c1; ++c) {
      double* acc = partial.data() + c * 2 * m * k;
      const int64_t chunk_end = std::min(p, (c + 1) * kChunk);
      for (int64_t begin = c * kChunk; begin < chunk_end; begin += kTile) {
        const int64_t len = std::min(kTile, chunk_end - begin);
        for (int64_t l = 0; l < k; ++l) {
          load_column(begin, len, l, column.data());
          for (int64_t j = 0; j < m; ++j) {
            acc[j * k + l] += dot_f64(y + j * p + begin, column.data(), len);
            acc[(m + j) * k + l] += dot_f64(s + j * p + begin, column.data(), len);
          }
        }
      }
    }
  });
  std::vector<double> WtV(2 * m * k, 0.0);
  for (int64_t c = 0; c < nchunks; ++c)
    for (int64_t r = 0; r < 2 * m * k; ++r) WtV[r] += partial[c * 2 * m * k + r];
  const std::vector<double> coef = solve_small(Minv, std::move(WtV), sigma, m, k);

  // Pass 2: B V = sigma V - Y' c_Y - sigma S' c_S, in double.
  auto out = at::empty_like(V);
  TV* o = out.data_ptr<TV>();
  parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<double> column(kTile), ty(kTile), ts(kTile);
    const int64_t chunks_end = std::min(p, c1 * kChunk);
    for (int64_t begin = c0 * kChunk; begin < chunks_end; begin += kTile) {
      const int64_t len = std::min(kTile, chunks_end - begin);
      for (int64_t l = 0; l < k; ++l) {
        std::fill(ty.begin(), ty.end(), 0.0);
        std::fill(ts.begin(), ts.end(), 0.0);
        for (int64_t j = 0; j < m; ++j) {
          const TS* yj = y + j * p + begin;
          const TS* sj = s + j * p + begin;
          const double cy = coef[j * k + l], cs = coef[(m + j) * k + l];
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) {
            ty[i] += double(yj[i]) * cy;
            ts[i] += double(sj[i]) * cs;
          }
        }
        load_column(begin, len, l, column.data());
        for (int64_t i = 0; i < len; ++i) o[(begin + i) * k + l] = static_cast<TV>(sigma * column[i] - ty[i] - sigma * ts[i]);
      }
    }
  });
  return out;
}

at::Tensor lbfgs_matvec_cpu(const at::Tensor& S, const at::Tensor& Y, const at::Tensor& sigma, const at::Tensor& Minv,
                            const at::Tensor& V) {
  check_pairs(S, Y);
  check_compact(sigma, Minv, S.size(0));
  TORCH_CHECK((V.dim() == 1 || V.dim() == 2) && V.size(0) == S.size(1), "V must be (p,) or (p, k) with p = S.size(1)");
  TORCH_CHECK(V.scalar_type() == at::kFloat || V.scalar_type() == at::kDouble, "V must be float32 or float64");
  TORCH_CHECK(V.is_contiguous() && V.device().is_cpu(), "V must be a contiguous CPU tensor");
  const double sg = sigma.item<double>();
  const bool s32 = S.scalar_type() == at::kFloat, v32 = V.scalar_type() == at::kFloat;
  if (s32 && v32) return matvec_impl<float, float>(S, Y, sg, Minv, V);
  if (s32) return matvec_impl<float, double>(S, Y, sg, Minv, V);
  if (v32) return matvec_impl<double, float>(S, Y, sg, Minv, V);
  return matvec_impl<double, double>(S, Y, sg, Minv, V);
}

// ----------------------------------------------------------------------------- qn_step_
// Row j of S or Y as T values for elements [begin, begin + len): the dense row itself, or its
// codes decoded into `buf` (code * scale in float32, then T) when the pairs are quantized.
template <typename T>
struct PairRows {
  const T* dense = nullptr;       // (m, p) when not quantized
  const uint8_t* codes = nullptr;  // (m, row_bytes) when quantized
  const float* scales = nullptr;   // (m, row_blocks)
  int64_t p = 0, row_bytes = 0, row_blocks = 0, blocksize = 0, bits = 0;

  const T* row(int64_t j, int64_t begin, int64_t len, T* buf) const {
    if (dense) return dense + j * p + begin;
    if constexpr (std::is_same_v<T, float>) {
      decode_codes(codes + j * row_bytes, bits, scales + j * row_blocks, blocksize, begin, len, buf);
    } else {
      float tmp[kTile];  // 16 KB
      decode_codes(codes + j * row_bytes, bits, scales + j * row_blocks, blocksize, begin, len, tmp);
      for (int64_t i = 0; i < len; ++i) buf[i] = tmp[i];
    }
    return buf;
  }
};

template <typename T>
PairRows<T> make_rows(const at::Tensor& X, const c10::optional<at::Tensor>& scales, int64_t p, int64_t blocksize,
                      int64_t bits) {
  PairRows<T> rows;
  rows.p = p;
  if (!scales.has_value()) {
    rows.dense = X.data_ptr<T>();
    return rows;
  }
  rows.codes = static_cast<const uint8_t*>(X.data_ptr());
  rows.scales = scales->data_ptr<float>();
  rows.row_bytes = X.size(1);
  rows.row_blocks = scales->size(1);
  rows.blocksize = blocksize;
  rows.bits = bits;
  return rows;
}

template <typename T>
double qn_step_impl(T* w, const T* w_ref, const T* g_ref, const T* g_extra, const PairRows<T>& S, const PairRows<T>& Y,
                    int64_t m, int64_t p, double sigma, const at::Tensor& Minv, double eta, double alpha, double beta,
                    double lam) {
  const int64_t nchunks = num_chunks(p);

  // Pass 1: [Y v; S v] for v = w - w_ref, float lanes per tile, combined in double per chunk.
  std::vector<double> partial(nchunks * 2 * m, 0.0);
  parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> v_tile(kTile), buf_tile(2 * kTile);
    T* v = v_tile.data();
    T* buf_y = buf_tile.data();
    T* buf_s = buf_y + kTile;
    for (int64_t c = c0; c < c1; ++c) {
      double* acc = partial.data() + c * 2 * m;
      const int64_t chunk_end = std::min(p, (c + 1) * kChunk);
      for (int64_t begin = c * kChunk; begin < chunk_end; begin += kTile) {
        const int64_t len = std::min(kTile, chunk_end - begin);
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) v[i] = w[begin + i] - w_ref[begin + i];
        for (int64_t j = 0; j < m; ++j) {
          dot2(v, Y.row(j, begin, len, buf_y), S.row(j, begin, len, buf_s), len, acc[j], acc[m + j]);
        }
      }
    }
  });
  std::vector<double> WtV(2 * m, 0.0);
  for (int64_t c = 0; c < nchunks; ++c)
    for (int64_t r = 0; r < 2 * m; ++r) WtV[r] += partial[c * 2 * m + r];
  const std::vector<double> coef = solve_small(Minv, std::move(WtV), sigma, m, 1);
  std::vector<T> coef_y(m), coef_s(m);
  for (int64_t j = 0; j < m; ++j) {
    coef_y[j] = static_cast<T>(coef[j]);
    coef_s[j] = static_cast<T>(sigma * coef[m + j]);
  }

  // Pass 2, fused: Bv, g, w -= eta g and |eta g|^2, reading every input once.
  const T sg = static_cast<T>(sigma), et = static_cast<T>(eta), al = static_cast<T>(alpha),
          be = static_cast<T>(beta), la = static_cast<T>(lam);
  std::vector<double> norm_partial(nchunks, 0.0);
  parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> bv_tile(kTile), buf_tile(2 * kTile);
    T* bv = bv_tile.data();
    T* buf_y = buf_tile.data();
    T* buf_s = buf_y + kTile;
    for (int64_t c = c0; c < c1; ++c) {
      double norm2 = 0;
      const int64_t chunk_end = std::min(p, (c + 1) * kChunk);
      for (int64_t begin = c * kChunk; begin < chunk_end; begin += kTile) {
        const int64_t len = std::min(kTile, chunk_end - begin);
        T* wt = w + begin;
        const T* wr = w_ref + begin;
        const T* gr = g_ref + begin;
        const T* ge = g_extra + begin;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) bv[i] = sg * (wt[i] - wr[i]);
        // Rows j of Y and S in one sweep over the tile (bv loaded and stored once per pair), in the
        // order (bv - cy y_j) - cs s_j.
        for (int64_t j = 0; j < m; ++j) {
          const T* yj = Y.row(j, begin, len, buf_y);
          const T* sj = S.row(j, begin, len, buf_s);
          const T cy = coef_y[j], cs = coef_s[j];
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) bv[i] = (bv[i] - cy * yj[i]) - cs * sj[i];
        }
        for (int64_t start = 0; start < len; start += kSum) {
          const int64_t stop = std::min(len, start + kSum);
          T run_norm2 = 0;
#pragma omp simd reduction(+ : run_norm2)
          for (int64_t i = start; i < stop; ++i) {
            const T g = al * (bv[i] + gr[i] + la * wr[i]) - be * (ge[i] + la * wt[i]);
            const T step = et * g;
            wt[i] = wt[i] - step;
            run_norm2 += step * step;
          }
          norm2 += double(run_norm2);
        }
      }
      norm_partial[c] = norm2;
    }
  });
  double norm2 = 0;
  for (double part : norm_partial) norm2 += part;
  return std::sqrt(norm2);
}

at::Tensor qn_step__cpu(at::Tensor& w, const at::Tensor& w_ref, const at::Tensor& g_ref, const at::Tensor& g_extra,
                        const at::Tensor& S, const at::Tensor& Y, const at::Tensor& sigma, const at::Tensor& Minv,
                        double eta, double alpha, double beta, double lam, const c10::optional<at::Tensor>& S_scales,
                        const c10::optional<at::Tensor>& Y_scales, int64_t blocksize, int64_t bits) {
  const auto dtype = w.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "w must be float32 or float64");
  TORCH_CHECK(w.dim() == 1 && w.numel() > 0 && w.is_contiguous() && w.device().is_cpu(),
              "w must be a non-empty contiguous (p,) CPU tensor");
  const int64_t p = w.numel();
  for (const auto* t : {&w_ref, &g_ref, &g_extra}) {
    TORCH_CHECK(t->sizes() == w.sizes() && t->scalar_type() == dtype && t->is_contiguous() && t->device().is_cpu(),
                "w_ref, g_ref and g_extra must be contiguous CPU tensors like w");
  }
  const bool quantized = S_scales.has_value() || Y_scales.has_value();
  TORCH_CHECK(S.dim() == 2 && S.sizes() == Y.sizes() && S.is_contiguous() && Y.is_contiguous() && S.device().is_cpu() &&
                  Y.device().is_cpu(),
              "S and Y must be contiguous (m, ...) CPU tensors of one shape");
  const int64_t m = S.size(0);
  TORCH_CHECK(m >= 1, "S must hold at least one curvature pair");
  if (quantized) {
    TORCH_CHECK(S_scales.has_value() && Y_scales.has_value(), "give both S_scales and Y_scales, or neither");
    TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
    TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
                "blocksize must be a power of two in [32, 4096]");
    const auto code_type = bits == 8 ? at::kChar : at::kByte;
    const int64_t row_bytes = bits == 8 ? p : (p + 1) / 2, row_blocks = (p + blocksize - 1) / blocksize;
    TORCH_CHECK(S.scalar_type() == code_type && Y.scalar_type() == code_type && S.size(1) == row_bytes,
                "quantized S and Y must be (m, code bytes per row) int8 (bits=8) or uint8 (bits=4)");
    for (const auto* sc : {&*S_scales, &*Y_scales}) {
      TORCH_CHECK(sc->scalar_type() == at::kFloat && sc->dim() == 2 && sc->size(0) == m && sc->size(1) == row_blocks &&
                      sc->is_contiguous() && sc->device().is_cpu(),
                  "S_scales and Y_scales must be contiguous (m, blocks per row) float32 CPU tensors");
    }
  } else {
    TORCH_CHECK(S.scalar_type() == dtype && Y.scalar_type() == dtype && S.size(1) == p, "S and Y must be (m, p) like w");
  }
  check_compact(sigma, Minv, m);
  const double sg = sigma.item<double>();
  double norm;
  if (dtype == at::kFloat) {
    auto Sr = make_rows<float>(S, S_scales, p, blocksize, bits), Yr = make_rows<float>(Y, Y_scales, p, blocksize, bits);
    norm = qn_step_impl<float>(w.data_ptr<float>(), w_ref.data_ptr<float>(), g_ref.data_ptr<float>(),
                               g_extra.data_ptr<float>(), Sr, Yr, m, p, sg, Minv, eta, alpha, beta, lam);
  } else {
    auto Sr = make_rows<double>(S, S_scales, p, blocksize, bits), Yr = make_rows<double>(Y, Y_scales, p, blocksize, bits);
    norm = qn_step_impl<double>(w.data_ptr<double>(), w_ref.data_ptr<double>(), g_ref.data_ptr<double>(),
                                g_extra.data_ptr<double>(), Sr, Yr, m, p, sg, Minv, eta, alpha, beta, lam);
  }
  return at::scalar_tensor(norm, w.options().dtype(at::kDouble));
}

}  // namespace

void bind_lbfgs(pybind11::module_& m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("lbfgs_gram_cpu", &lbfgs_gram_cpu, "(S S', S Y') in float64 (CPU)", release());
  m.def("lbfgs_matvec_cpu", &lbfgs_matvec_cpu, "compact L-BFGS product B V (CPU)", release());
  m.def("qn_step__cpu", &qn_step__cpu, "fused quasi-Newton / contraction step, in place on w (CPU)", release());
}

}  // namespace unlearn_fast::cpu
