// Compact L-BFGS on CUDA: the streaming passes of lbfgs_gram, lbfgs_matvec and the fused qn_step_.
// Torch-free (see lbfgs.h). B = sigma I - W Minv W' with W = [Y', sigma S'] for pairs stored as rows.
//
// Two kernel shapes:
// - row_dots_kernel: sum_c row_r[c] v_j[c] for the 2m rows of Y and S and a few vectors v_j.
//   A grid of at most kReduceBlocks along x strides over p in chunks of kReduceChunk columns. Each
//   warp adds its shuffle-reduced sum into its own shared-memory slot, so there is a single
//   __syncthreads at the end and one float64 partial per (vector, CUDA block, row).
// - elementwise update kernels (matvec_apply_kernel, qn_update_kernel): one chunk per CUDA block,
//   reading each row of S and Y once; qn_update_kernel also writes w and one partial of |eta g|^2
//   per CUDA block.
// All arithmetic is float64 (quantized rows decode as code * scale in float32 first, as the reference).
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "lbfgs.h"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kReduceElems = 8;  // columns per thread per chunk in row_dots_kernel
constexpr int64_t kReduceChunk = int64_t(kThreads) * kReduceElems;
// Fixed, so partial sums (hence results) do not depend on the GPU; about ten waves of resident
// blocks on an H100, so the last, partly filled wave costs little.
constexpr int kReduceBlocks = 8192;
constexpr int kUpdateElems = 4;      // columns per thread in the update kernels
constexpr int64_t kUpdateChunk = int64_t(kThreads) * kUpdateElems;
constexpr int kSharedDoubles = 48 * 1024 / 8;  // default dynamic shared memory limit
constexpr int64_t kMaxPairs = kSharedDoubles / (2 * kWarps);  // one row-dot vector per block at least

// ----------------------------------------------------------------------------- row loaders
// value(r, c): element c of row r of [Y; S] (r < m: Y row r, else S row r - m) as float64.
template <typename T>
struct DenseRows {
  const T* s;
  const T* y;
  int64_t m, p;
  __device__ __forceinline__ double value(int64_t r, int64_t c) const {
    return r < m ? static_cast<double>(y[r * p + c]) : static_cast<double>(s[(r - m) * p + c]);
  }
};

// Row-quantized pairs: code * scale of its block in float32 (reference._decode), then float64.
template <int BITS>
struct QuantRows {
  const uint8_t* s;
  const uint8_t* y;
  const float* s_scales;
  const float* y_scales;
  int64_t m, row_bytes, row_blocks;
  int log2bs;
  __device__ __forceinline__ double value(int64_t r, int64_t c) const {
    const bool is_y = r < m;
    const int64_t row = is_y ? r : r - m;
    const uint8_t* codes = (is_y ? y : s) + row * row_bytes;
    const float scale = (is_y ? y_scales : s_scales)[row * row_blocks + (c >> log2bs)];
    int q;
    if (BITS == 8) {
      q = static_cast<int8_t>(codes[c]);
    } else {
      const uint8_t byte = codes[c >> 1];
      q = ((c & 1) ? (byte >> 4) : (byte & 0xF)) - 8;
    }
    return static_cast<double>(__fmul_rn(static_cast<float>(q), scale));
  }
};

// ----------------------------------------------------------------------------- vector loaders
template <typename T>
struct StridedVector {  // v_j[c] = v[c * stride_c + j * stride_j]
  const T* v;
  int64_t stride_c, stride_j;
  __device__ __forceinline__ double value(int64_t c, int64_t j) const {
    return static_cast<double>(v[c * stride_c + j * stride_j]);
  }
};

template <typename T>
struct DifferenceVector {  // v[c] = w[c] - w_ref[c], in float64 like the reference
  const T* w;
  const T* w_ref;
  __device__ __forceinline__ double value(int64_t c, int64_t) const {
    return static_cast<double>(w[c]) - static_cast<double>(w_ref[c]);
  }
};

__device__ __forceinline__ double warp_sum(double v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// ----------------------------------------------------------------------------- reductions
// Block (x, y) handles vectors j0 .. j0 + per_block - 1 (j0 = y * per_block) over the chunks
// x, x + gridDim.x, ...; slots[(jj * rows + r) * kWarps + warp] accumulate that warp's sums.
template <typename Rows, typename Vector>
__global__ void __launch_bounds__(kThreads) row_dots_kernel(Rows rows, Vector vec, int64_t nrows, int64_t p,
                                                            int64_t nj, int per_block, double* __restrict__ partials) {
  extern __shared__ double slots[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t j0 = int64_t(blockIdx.y) * per_block;
  const int count = static_cast<int>(nj - j0 < per_block ? nj - j0 : per_block);
  for (int i = tid; i < count * nrows * kWarps; i += kThreads) slots[i] = 0.0;
  __syncthreads();

  for (int64_t base = int64_t(blockIdx.x) * kReduceChunk; base < p; base += int64_t(gridDim.x) * kReduceChunk) {
    for (int jj = 0; jj < count; ++jj) {
      double v[kReduceElems];
#pragma unroll
      for (int e = 0; e < kReduceElems; ++e) {
        const int64_t c = base + e * kThreads + tid;
        v[e] = c < p ? vec.value(c, j0 + jj) : 0.0;
      }
      for (int64_t r = 0; r < nrows; ++r) {
        double acc = 0.0;
#pragma unroll
        for (int e = 0; e < kReduceElems; ++e) {
          const int64_t c = base + e * kThreads + tid;
          if (c < p) acc += rows.value(r, c) * v[e];
        }
        acc = warp_sum(acc);
        if (lane == 0) slots[(jj * nrows + r) * kWarps + warp] += acc;
      }
    }
  }
  __syncthreads();
  for (int i = tid; i < count * nrows; i += kThreads) {
    double sum = 0.0;
    for (int w = 0; w < kWarps; ++w) sum += slots[i * kWarps + w];
    const int64_t jj = i / nrows, r = i % nrows;
    partials[((j0 + jj) * gridDim.x + blockIdx.x) * nrows + r] = sum;
  }
}

template <typename Rows, typename Vector>
cudaError_t launch_row_dots(const Rows& rows, const Vector& vec, int64_t m, int64_t p, int64_t nj, double* partials,
                            cudaStream_t stream) {
  const int64_t nrows = 2 * m;
  if (m < 1 || m > kMaxPairs || nj < 1) return cudaErrorInvalidValue;
  int64_t per_block = kSharedDoubles / (nrows * kWarps);
  if (per_block > nj) per_block = nj;
  const int64_t grid_y = (nj + per_block - 1) / per_block;
  if (grid_y > 65535) return cudaErrorInvalidValue;
  const size_t shared = sizeof(double) * per_block * nrows * kWarps;
  const dim3 grid(static_cast<unsigned>(uf_lbfgs_reduce_blocks(p)), static_cast<unsigned>(grid_y));
  row_dots_kernel<<<grid, kThreads, shared, stream>>>(rows, vec, nrows, p, nj, static_cast<int>(per_block), partials);
  return cudaGetLastError();
}

// ----------------------------------------------------------------------------- matvec
template <typename Rows, typename TV>
__global__ void __launch_bounds__(kThreads) matvec_apply_kernel(Rows rows, int64_t m, int64_t p,
                                                                const TV* __restrict__ V, int64_t k,
                                                                const double* __restrict__ sigma_ptr,
                                                                const double* __restrict__ coef,
                                                                TV* __restrict__ out) {
  const double sigma = *sigma_ptr;
  const int64_t base = int64_t(blockIdx.x) * kUpdateChunk + threadIdx.x;
  for (int64_t l = 0; l < k; ++l) {
    double acc[kUpdateElems];
#pragma unroll
    for (int e = 0; e < kUpdateElems; ++e) {
      const int64_t c = base + e * kThreads;
      acc[e] = c < p ? sigma * static_cast<double>(V[c * k + l]) : 0.0;
    }
    for (int64_t i = 0; i < m; ++i) {
      const double cy = coef[i * k + l], cs = coef[(m + i) * k + l];
#pragma unroll
      for (int e = 0; e < kUpdateElems; ++e) {
        const int64_t c = base + e * kThreads;
        if (c < p) acc[e] -= rows.value(i, c) * cy + rows.value(m + i, c) * cs;
      }
    }
#pragma unroll
    for (int e = 0; e < kUpdateElems; ++e) {
      const int64_t c = base + e * kThreads;
      if (c < p) out[c * k + l] = static_cast<TV>(acc[e]);
    }
  }
}

unsigned update_grid(int64_t p) { return static_cast<unsigned>((p + kUpdateChunk - 1) / kUpdateChunk); }

template <typename Rows, typename TV>
cudaError_t launch_matvec_apply(const Rows& rows, int64_t m, int64_t p, const void* V, int64_t k, const double* sigma,
                                const double* coef, void* out, cudaStream_t stream) {
  matvec_apply_kernel<<<update_grid(p), kThreads, 0, stream>>>(rows, m, p, static_cast<const TV*>(V), k, sigma, coef,
                                                                 static_cast<TV*>(out));
  return cudaGetLastError();
}

// ----------------------------------------------------------------------------- qn_step_
template <typename Rows, typename T>
__global__ void __launch_bounds__(kThreads) qn_update_kernel(Rows rows, int64_t m, int64_t p, T* __restrict__ w,
                                                             const T* __restrict__ w_ref, const T* __restrict__ g_ref,
                                                             const T* __restrict__ g_extra,
                                                             const double* __restrict__ sigma_ptr,
                                                             const double* __restrict__ coef, double eta, double alpha,
                                                             double beta, double lam,
                                                             double* __restrict__ norm_partials) {
  __shared__ double warp_sums[kWarps];
  const double sigma = *sigma_ptr;
  const int64_t base = int64_t(blockIdx.x) * kUpdateChunk + threadIdx.x;
  double w_val[kUpdateElems], w_ref_val[kUpdateElems], bv[kUpdateElems];
#pragma unroll
  for (int e = 0; e < kUpdateElems; ++e) {
    const int64_t c = base + e * kThreads;
    w_val[e] = c < p ? static_cast<double>(w[c]) : 0.0;
    w_ref_val[e] = c < p ? static_cast<double>(w_ref[c]) : 0.0;
    bv[e] = sigma * (w_val[e] - w_ref_val[e]);
  }
  for (int64_t i = 0; i < m; ++i) {
    const double cy = coef[i], cs = coef[m + i];
#pragma unroll
    for (int e = 0; e < kUpdateElems; ++e) {
      const int64_t c = base + e * kThreads;
      if (c < p) bv[e] -= rows.value(i, c) * cy + rows.value(m + i, c) * cs;
    }
  }
  double norm2 = 0.0;
#pragma unroll
  for (int e = 0; e < kUpdateElems; ++e) {
    const int64_t c = base + e * kThreads;
    if (c < p) {
      const double g = alpha * (bv[e] + static_cast<double>(g_ref[c]) + lam * w_ref_val[e]) -
                       beta * (static_cast<double>(g_extra[c]) + lam * w_val[e]);
      const double step = eta * g;
      w[c] = static_cast<T>(w_val[e] - step);
      norm2 += step * step;
    }
  }
  norm2 = warp_sum(norm2);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = norm2;
  __syncthreads();
  if (threadIdx.x == 0) {
    double sum = 0.0;
    for (int i = 0; i < kWarps; ++i) sum += warp_sums[i];
    norm_partials[blockIdx.x] = sum;
  }
}

template <typename Rows, typename T>
cudaError_t launch_qn(const Rows& rows, int64_t m, int64_t p, void* w, const void* w_ref, const void* g_ref,
                      const void* g_extra, const double* sigma, const double* coef, double eta, double alpha,
                      double beta, double lam, double* norm_partials, double* dot_partials, bool reduce,
                      cudaStream_t stream) {
  if (reduce) {
    DifferenceVector<T> diff{static_cast<const T*>(w), static_cast<const T*>(w_ref)};
    return launch_row_dots(rows, diff, m, p, 1, dot_partials, stream);
  }
  qn_update_kernel<<<update_grid(p), kThreads, 0, stream>>>(
      rows, m, p, static_cast<T*>(w), static_cast<const T*>(w_ref), static_cast<const T*>(g_ref),
      static_cast<const T*>(g_extra), sigma, coef, eta, alpha, beta, lam, norm_partials);
  return cudaGetLastError();
}

int log2_of(int64_t v) {
  int r = 0;
  while ((int64_t(1) << r) < v) ++r;
  return r;
}

// Calls fn(rows_loader) with the loader for this storage kind; cudaErrorInvalidValue for a bad kind.
template <typename Fn>
cudaError_t with_rows(const UfRows& rows, int64_t m, int64_t p, Fn&& fn) {
  switch (rows.kind) {
    case UF_ROWS_FLOAT32:
      return fn(DenseRows<float>{static_cast<const float*>(rows.s), static_cast<const float*>(rows.y), m, p});
    case UF_ROWS_FLOAT64:
      return fn(DenseRows<double>{static_cast<const double*>(rows.s), static_cast<const double*>(rows.y), m, p});
    case UF_ROWS_Q8:
    case UF_ROWS_Q4: {
      if (rows.blocksize < 32 || rows.blocksize > 4096 || (rows.blocksize & (rows.blocksize - 1))) {
        return cudaErrorInvalidValue;
      }
      const int64_t row_blocks = (p + rows.blocksize - 1) / rows.blocksize;
      const int log2bs = log2_of(rows.blocksize);
      const auto* s = static_cast<const uint8_t*>(rows.s);
      const auto* y = static_cast<const uint8_t*>(rows.y);
      if (rows.kind == UF_ROWS_Q8) return fn(QuantRows<8>{s, y, rows.s_scales, rows.y_scales, m, p, row_blocks, log2bs});
      return fn(QuantRows<4>{s, y, rows.s_scales, rows.y_scales, m, (p + 1) / 2, row_blocks, log2bs});
    }
    default:
      return cudaErrorInvalidValue;
  }
}

bool dense(const UfRows& rows) { return rows.kind == UF_ROWS_FLOAT32 || rows.kind == UF_ROWS_FLOAT64; }

cudaError_t qn_dispatch(const UfRows& rows, int64_t m, int64_t p, void* w, const void* w_ref, const void* g_ref,
                        const void* g_extra, int dtype, const double* sigma, const double* coef, double eta,
                        double alpha, double beta, double lam, double* norm_partials, double* dot_partials,
                        bool reduce, cudaStream_t stream) {
  if (m < 1 || p < 1) return cudaErrorInvalidValue;
  // Dense rows must have w's dtype (ops.py checks it); quantized rows go with either.
  if (dense(rows) && rows.kind != (dtype == UF_FLOAT32 ? UF_ROWS_FLOAT32 : UF_ROWS_FLOAT64)) return cudaErrorInvalidValue;
  if (dtype != UF_FLOAT32 && dtype != UF_FLOAT64) return cudaErrorInvalidValue;
  return with_rows(rows, m, p, [&](const auto& loader) {
    if (dtype == UF_FLOAT32) {
      return launch_qn<std::decay_t<decltype(loader)>, float>(loader, m, p, w, w_ref, g_ref, g_extra, sigma, coef, eta,
                                                              alpha, beta, lam, norm_partials, dot_partials, reduce,
                                                              stream);
    }
    return launch_qn<std::decay_t<decltype(loader)>, double>(loader, m, p, w, w_ref, g_ref, g_extra, sigma, coef, eta,
                                                             alpha, beta, lam, norm_partials, dot_partials, reduce,
                                                             stream);
  });
}

}  // namespace

extern "C" int64_t uf_lbfgs_max_pairs(void) { return kMaxPairs; }

extern "C" int64_t uf_lbfgs_reduce_blocks(int64_t p) {
  const int64_t chunks = (p + kReduceChunk - 1) / kReduceChunk;
  return chunks < kReduceBlocks ? chunks : kReduceBlocks;
}

extern "C" int64_t uf_qn_update_blocks(int64_t p) { return update_grid(p); }

extern "C" cudaError_t uf_lbfgs_row_dots(UfRows rows, int64_t m, int64_t p, const void* v, int v_dtype,
                                         int64_t stride_c, int64_t stride_j, int64_t nj, double* partials,
                                         cudaStream_t stream) {
  if (!dense(rows) || p < 1) return cudaErrorInvalidValue;
  return with_rows(rows, m, p, [&](const auto& loader) {
    if (v_dtype == UF_FLOAT32) {
      return launch_row_dots(loader, StridedVector<float>{static_cast<const float*>(v), stride_c, stride_j}, m, p, nj,
                             partials, stream);
    }
    if (v_dtype == UF_FLOAT64) {
      return launch_row_dots(loader, StridedVector<double>{static_cast<const double*>(v), stride_c, stride_j}, m, p,
                             nj, partials, stream);
    }
    return cudaErrorInvalidValue;
  });
}

extern "C" cudaError_t uf_qn_row_dots(UfRows rows, int64_t m, int64_t p, const void* w, const void* w_ref, int dtype,
                                      double* partials, cudaStream_t stream) {
  return qn_dispatch(rows, m, p, const_cast<void*>(w), w_ref, nullptr, nullptr, dtype, nullptr, nullptr, 0, 0, 0, 0,
                     nullptr, partials, true, stream);
}

extern "C" cudaError_t uf_lbfgs_matvec_apply(UfRows rows, int64_t m, int64_t p, const void* V, int v_dtype, int64_t k,
                                             const double* sigma, const double* coef, void* out, cudaStream_t stream) {
  if (!dense(rows) || m < 1 || p < 1 || k < 1) return cudaErrorInvalidValue;
  return with_rows(rows, m, p, [&](const auto& loader) {
    using Rows = std::decay_t<decltype(loader)>;
    if (v_dtype == UF_FLOAT32) return launch_matvec_apply<Rows, float>(loader, m, p, V, k, sigma, coef, out, stream);
    if (v_dtype == UF_FLOAT64) return launch_matvec_apply<Rows, double>(loader, m, p, V, k, sigma, coef, out, stream);
    return cudaErrorInvalidValue;
  });
}

extern "C" cudaError_t uf_qn_update(UfRows rows, int64_t m, int64_t p, void* w, const void* w_ref, const void* g_ref,
                                    const void* g_extra, int dtype, const double* sigma, const double* coef,
                                    double eta, double alpha, double beta, double lam, double* norm_partials,
                                    cudaStream_t stream) {
  return qn_dispatch(rows, m, p, w, w_ref, g_ref, g_extra, dtype, sigma, coef, eta, alpha, beta, lam, norm_partials,
                     nullptr, false, stream);
}
