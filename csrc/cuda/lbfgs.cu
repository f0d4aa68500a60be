// Compact L-BFGS on CUDA: the streaming passes of lbfgs_gram, lbfgs_matvec and the fused qn_step_.
// Torch-free (see lbfgs.h). B = sigma I - W Minv W' with W = [Y', sigma S'] for pairs stored as rows.
//
// Two kernel shapes:
// - row_dots_kernel: sum_c row_r[c] v_j[c] for the 2m rows of Y and S and a few vectors v_j.
//   A grid of at most kReduceBlocks along x strides over p in chunks of kReduceChunk columns. Each
//   warp adds its shuffle-reduced sum into its own shared-memory slot, so there is a single
//   __syncthreads at the end and one float64 partial per (vector, CUDA block, row).
//   Used for lbfgs_matvec, and for lbfgs_gram at m > 16.
// - gram_kernel, qn_dots_kernel: register-tiled reductions for lbfgs_gram (m <= 16) and qn_step_, each
//   value loaded and converted once, per-thread float64 sums, one block reduction at the end.
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
bool ptr_aligned(const void* ptr, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// float(q) for a small integer code (|q| < 2^22), exact, on the full-rate integer and float32 pipes
// instead of the quarter-rate I2F conversion: 1.5 * 2^23 + q has q in its low mantissa bits.
__device__ __forceinline__ float code_to_float(int q) {
  return __fsub_rn(__int_as_float(0x4B400000 + q), 12582912.0f);
}

// ptr[0 .. 3] as stored, 0 past `left` elements; vec: one 16-byte-aligned group of 4 in range.
template <typename T>
__device__ __forceinline__ void load4_raw(const T* ptr, int64_t left, bool vec, T out[4]) {
  if (vec) {
    if constexpr (sizeof(T) == 4) {
      const float4 f = *reinterpret_cast<const float4*>(ptr);
      out[0] = f.x, out[1] = f.y, out[2] = f.z, out[3] = f.w;
    } else {
      const double2 a = reinterpret_cast<const double2*>(ptr)[0], b = reinterpret_cast<const double2*>(ptr)[1];
      out[0] = a.x, out[1] = a.y, out[2] = b.x, out[3] = b.y;
    }
    return;
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) out[e] = e < left ? ptr[e] : T(0);
}

// ptr[0 .. 3] as float64, 0 past `left` elements; vec: one 16-byte-aligned group of 4 in range.
template <typename T>
__device__ __forceinline__ void load4_from(const T* ptr, int64_t left, bool vec, double out[4]) {
  T raw[4];
  load4_raw(ptr, left, vec, raw);
#pragma unroll
  for (int e = 0; e < 4; ++e) out[e] = static_cast<double>(raw[e]);
}

template <typename T>
struct DenseRows {
  using Value = T;
  const T* s;
  const T* y;
  int64_t m, p;
  __device__ __forceinline__ double value(int64_t r, int64_t c) const {
    return r < m ? static_cast<double>(y[r * p + c]) : static_cast<double>(s[(r - m) * p + c]);
  }
  // Columns c .. c + 3 (c % 4 == 0) as float64, 0 past p; vec: one 16-byte-aligned group (see aligned()).
  __device__ __forceinline__ void load4(int64_t r, int64_t c, bool vec, double out[4]) const {
    load4_from((r < m ? y + r * p : s + (r - m) * p) + c, p - c, vec, out);
  }
  // Every group of 4 columns starts on 16 bytes: vector loads allowed.
  bool aligned() const { return p % 4 == 0 && ptr_aligned(s, 16) && ptr_aligned(y, 16); }
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
  int64_t p;  // columns
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
  // Columns c .. c + 3 (c % 4 == 0, c < p: one quantization block, so one scale) as float64, 0 past p.
  // vec: the 4 codes are one aligned 4-byte (8-bit) or 2-byte (4-bit) word.
  __device__ __forceinline__ void load4(int64_t r, int64_t c, bool vec, double out[4]) const {
    const bool is_y = r < m;
    const int64_t row = is_y ? r : r - m;
    const uint8_t* codes = (is_y ? y : s) + row * row_bytes;
    const float scale = (is_y ? y_scales : s_scales)[row * row_blocks + (c >> log2bs)];
    int q[4];
    if (vec) {
      const uint32_t word = BITS == 8 ? *reinterpret_cast<const uint32_t*>(codes + c)
                                      : *reinterpret_cast<const uint16_t*>(codes + (c >> 1));
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        q[e] = BITS == 8 ? static_cast<int>(static_cast<int8_t>(word >> (8 * e))) : static_cast<int>((word >> (4 * e)) & 0xF) - 8;
      }
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t ce = c + e;
        if (ce >= p) {
          q[e] = 0;
        } else if (BITS == 8) {
          q[e] = static_cast<int8_t>(codes[ce]);
        } else {
          const uint8_t byte = codes[ce >> 1];
          q[e] = ((ce & 1) ? (byte >> 4) : (byte & 0xF)) - 8;
        }
      }
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {  // 0 past p even when the block's scale is NaN
      out[e] = vec || c + e < p ? static_cast<double>(__fmul_rn(code_to_float(q[e]), scale)) : 0.0;
    }
  }
  bool aligned() const {
    return p % 4 == 0 && ptr_aligned(s, BITS == 8 ? 4 : 2) && ptr_aligned(y, BITS == 8 ? 4 : 2);
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

// ----------------------------------------------------------------------------- register-tiled reductions
// row_dots_kernel re-reads (and re-converts) every row once per vector and reduces across the warp once
// per chunk and (vector, row); that capped lbfgs_gram at 30 % and the quantized qn_step_ reduction near
// it on an H200. These kernels load each value once, keep per-thread float64 sums in registers over the
// whole grid-stride loop and reduce across the block once. A thread takes 4 consecutive columns per step
// (16-byte loads when aligned). Block index = chunk block * tiles + tile, tile fastest, so the tiles of one
// chunk run together and the rows they share come from L2.
constexpr int kTileThreads = 128;  // gram_kernel takes ~180 registers (no spills): 2 blocks per SM
constexpr int kPairTile = 4;       // pairs per tile
constexpr int64_t kTileStep = int64_t(kTileThreads) * 4;
constexpr int64_t kMaxTiledPairs = 16;  // gram_kernel up to 4 x 4 tiles; row_dots_kernel beyond

// Sums the N per-thread values of vals across the block into out[0 .. N) (thread 0 holds them).
template <int N>
__device__ __forceinline__ void block_sums(double (&vals)[N], double* out) {
  __shared__ double slots[N][kTileThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const double v = warp_sum(vals[i]);
    if (lane == 0) slots[i][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x < N) {
    double sum = 0.0;
    for (int w = 0; w < kTileThreads / 32; ++w) sum += slots[threadIdx.x][w];
    out[threadIdx.x] = sum;
  }
}

// lbfgs_gram: tile (ti, tj) sums s_i . s_j and s_i . y_j for i in pairs 4 ti.., j in 4 tj...
// partials[(i * nblocks + b) * 2m + j] = s_i . y_j, [... + m + j] = s_i . s_j (the row_dots layout, rows [Y; S]).
// s_i . s_j and s_j . s_i add the same products in the same order, so the result is exactly symmetric.
template <typename T>
__global__ void __launch_bounds__(kTileThreads) gram_kernel(DenseRows<T> rows, int64_t m, int64_t p, int tiles,
                                                            bool vec, double* __restrict__ partials) {
  const int ntiles = tiles * tiles;
  const int tile = static_cast<int>(blockIdx.x % ntiles);
  const int64_t b = blockIdx.x / ntiles, nblocks = gridDim.x / ntiles;
  const int64_t i0 = int64_t(tile / tiles) * kPairTile, j0 = int64_t(tile % tiles) * kPairTile;
  double acc[2 * kPairTile * kPairTile] = {};  // [a * 4 + c]: s_i . y_j, then [16 + a * 4 + c]: s_i . s_j
  for (int64_t c = (b * kTileThreads + threadIdx.x) * 4; c < p; c += nblocks * kTileStep) {
    // Raw values, converted to float64 where used: fewer live registers than converting at the load.
    T si[kPairTile][4], sj[kPairTile][4], yj[kPairTile][4];
#pragma unroll
    for (int a = 0; a < kPairTile; ++a) {  // pairs past m count as zero rows
      load4_raw(rows.s + (i0 + a) * p + c, i0 + a < m ? p - c : 0, vec && i0 + a < m, si[a]);
      load4_raw(rows.s + (j0 + a) * p + c, j0 + a < m ? p - c : 0, vec && j0 + a < m, sj[a]);
      load4_raw(rows.y + (j0 + a) * p + c, j0 + a < m ? p - c : 0, vec && j0 + a < m, yj[a]);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
#pragma unroll
      for (int a = 0; a < kPairTile; ++a) {
        const double s = si[a][e];
#pragma unroll
        for (int cc = 0; cc < kPairTile; ++cc) {
          acc[a * kPairTile + cc] += s * static_cast<double>(yj[cc][e]);
          acc[kPairTile * kPairTile + a * kPairTile + cc] += s * static_cast<double>(sj[cc][e]);
        }
      }
    }
  }
  __shared__ double sums[2 * kPairTile * kPairTile];
  block_sums(acc, sums);
  __syncthreads();
  if (threadIdx.x < 2 * kPairTile * kPairTile) {
    const int k = threadIdx.x % (kPairTile * kPairTile), a = k / kPairTile, cc = k % kPairTile;
    const int64_t i = i0 + a, j = j0 + cc;
    if (i < m && j < m) {
      const int64_t col = threadIdx.x < kPairTile * kPairTile ? j : m + j;
      partials[(i * nblocks + b) * 2 * m + col] = sums[threadIdx.x];
    }
  }
}

// qn_step_'s reduction: tile t sums y_i . v and s_i . v for i in pairs 4 t .. 4 t + 3, v = w - w_ref.
// partials[b * 2m + r] as row_dots_kernel with one vector.
template <typename Rows, typename T>
__global__ void __launch_bounds__(kTileThreads) qn_dots_kernel(Rows rows, int64_t m, int64_t p, int tiles,
                                                               const T* __restrict__ w, const T* __restrict__ w_ref,
                                                               bool vec, double* __restrict__ partials) {
  const int tile = static_cast<int>(blockIdx.x % tiles);
  const int64_t b = blockIdx.x / tiles, nblocks = gridDim.x / tiles;
  const int64_t i0 = int64_t(tile) * kPairTile;
  double acc[2 * kPairTile] = {};  // [a]: y_i . v, [4 + a]: s_i . v
  for (int64_t c = (b * kTileThreads + threadIdx.x) * 4; c < p; c += nblocks * kTileStep) {
    double v[4], ref[4];
    load4_from(w + c, p - c, vec, v);
    load4_from(w_ref + c, p - c, vec, ref);
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] -= ref[e];
#pragma unroll
    for (int a = 0; a < kPairTile; ++a) {
      if (i0 + a < m) {
        double y[4], s[4];
        rows.load4(i0 + a, c, vec, y);
        rows.load4(m + i0 + a, c, vec, s);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          acc[a] += y[e] * v[e];
          acc[kPairTile + a] += s[e] * v[e];
        }
      }
    }
  }
  __shared__ double sums[2 * kPairTile];
  block_sums(acc, sums);
  __syncthreads();
  if (threadIdx.x < 2 * kPairTile) {
    const int a = threadIdx.x % kPairTile;
    const int64_t i = i0 + a;
    if (i < m) partials[b * 2 * m + (threadIdx.x < kPairTile ? i : m + i)] = sums[threadIdx.x];
  }
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
// Thread t of block b owns columns b * kUpdateChunk + 4 t .. + 3: one 16-byte load per input and row
// when aligned (vec), and one scale per quantized row (4 columns never straddle a quantization block).
template <typename Rows, typename T>
__global__ void __launch_bounds__(kThreads) qn_update_kernel(Rows rows, int64_t m, int64_t p, T* __restrict__ w,
                                                             const T* __restrict__ w_ref, const T* __restrict__ g_ref,
                                                             const T* __restrict__ g_extra,
                                                             const double* __restrict__ sigma_ptr,
                                                             const double* __restrict__ coef, double eta, double alpha,
                                                             double beta, double lam, bool vec,
                                                             double* __restrict__ norm_partials) {
  static_assert(kUpdateElems == 4, "qn_update_kernel loads groups of 4 columns");
  __shared__ double warp_sums[kWarps];
  const double sigma = *sigma_ptr;
  const int64_t c0 = int64_t(blockIdx.x) * kUpdateChunk + int64_t(threadIdx.x) * kUpdateElems;
  double norm2 = 0.0;
  if (c0 < p) {
    double w_val[4], w_ref_val[4], g_ref_val[4], g_extra_val[4], bv[4];
    load4_from(w + c0, p - c0, vec, w_val);
    load4_from(w_ref + c0, p - c0, vec, w_ref_val);
#pragma unroll
    for (int e = 0; e < 4; ++e) bv[e] = sigma * (w_val[e] - w_ref_val[e]);
    for (int64_t i = 0; i < m; ++i) {
      const double cy = coef[i], cs = coef[m + i];
      double y[4], s[4];
      rows.load4(i, c0, vec, y);
      rows.load4(m + i, c0, vec, s);
#pragma unroll
      for (int e = 0; e < 4; ++e) bv[e] -= y[e] * cy + s[e] * cs;
    }
    load4_from(g_ref + c0, p - c0, vec, g_ref_val);
    load4_from(g_extra + c0, p - c0, vec, g_extra_val);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (c0 + e < p) {
        const double g = alpha * (bv[e] + g_ref_val[e] + lam * w_ref_val[e]) - beta * (g_extra_val[e] + lam * w_val[e]);
        const double step = eta * g;
        w[c0 + e] = static_cast<T>(w_val[e] - step);
        norm2 += step * step;
      }
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
  // Vector loads when every row and vector starts each group of 4 columns on its natural boundary.
  const bool vec = rows.aligned() && ptr_aligned(w, 16) && ptr_aligned(w_ref, 16) &&
                   (reduce || (ptr_aligned(g_ref, 16) && ptr_aligned(g_extra, 16)));
  if (reduce) {
    if (m > kMaxPairs) return cudaErrorInvalidValue;
    const int64_t tiles = (m + kPairTile - 1) / kPairTile;
    const int64_t grid = uf_lbfgs_reduce_blocks(p) * tiles;
    qn_dots_kernel<<<static_cast<unsigned>(grid), kTileThreads, 0, stream>>>(
        rows, m, p, static_cast<int>(tiles), static_cast<const T*>(w), static_cast<const T*>(w_ref), vec,
        dot_partials);
    return cudaGetLastError();
  }
  qn_update_kernel<<<update_grid(p), kThreads, 0, stream>>>(
      rows, m, p, static_cast<T*>(w), static_cast<const T*>(w_ref), static_cast<const T*>(g_ref),
      static_cast<const T*>(g_extra), sigma, coef, eta, alpha, beta, lam, vec, norm_partials);
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
      if (rows.kind == UF_ROWS_Q8) return fn(QuantRows<8>{s, y, rows.s_scales, rows.y_scales, m, p, row_blocks, log2bs, p});
      return fn(QuantRows<4>{s, y, rows.s_scales, rows.y_scales, m, (p + 1) / 2, row_blocks, log2bs, p});
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

extern "C" cudaError_t uf_lbfgs_gram(UfRows rows, int64_t m, int64_t p, double* partials, cudaStream_t stream) {
  if (!dense(rows) || m < 1 || p < 1) return cudaErrorInvalidValue;
  return with_rows(rows, m, p, [&](const auto& loader) -> cudaError_t {
    using Loader = std::decay_t<decltype(loader)>;
    if constexpr (std::is_same_v<Loader, DenseRows<float>> || std::is_same_v<Loader, DenseRows<double>>) {
      if (m > kMaxTiledPairs) {  // (m / 4)^2 tiles would each re-read rows: one block row per vector instead
        return launch_row_dots(loader, StridedVector<typename Loader::Value>{loader.s, 1, p}, m, p, m, partials, stream);
      }
      const int64_t tiles = (m + kPairTile - 1) / kPairTile;
      const int64_t grid = uf_lbfgs_reduce_blocks(p) * tiles * tiles;
      gram_kernel<<<static_cast<unsigned>(grid), kTileThreads, 0, stream>>>(loader, m, p, static_cast<int>(tiles),
                                                                             loader.aligned(), partials);
      return cudaGetLastError();
    } else {
      return cudaErrorInvalidValue;
    }
  });
}

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
