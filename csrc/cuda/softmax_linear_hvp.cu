// CUDA kernel for the middle step of softmax_linear_hvp (torch-free; softmax_linear_hvp_glue.cpp
// does the two GEMMs with torch / cuBLAS around it):
//   logits (n, c) -> P = softmax(logits) in place,
//   Z (n, k m)    -> R in place, R[i, j m + a] = P[i, a] (Z[i, j m + a] - sum_b P[i, b] Z[i, j m + b]) / n,
//                    a, b < m: the glue passes m = c - 1 shifted classes (the last class's z is 0).
// One warp per row (grid-stride over rows), lanes strided over the c classes: warp-shuffle reductions
// only, no shared memory or block barriers, and any c (a vocabulary of tens of thousands included).
// Reductions accumulate in double for float32 too, like the CPU kernel.
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;

__device__ __forceinline__ double warp_sum(double v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ double warp_max(double v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

template <typename T>
__global__ void softmax_jacobian_rows(T* __restrict__ logits, T* __restrict__ Z, int64_t n, int64_t c, int64_t m,
                                      int64_t k, double inv_n) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_block = blockDim.x / kWarp;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / kWarp;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * warps_per_block;
  for (int64_t i = first; i < n; i += stride) {  // the whole warp takes the same branch
    T* p = logits + i * c;
    double row_max = -INFINITY;
    for (int64_t a = lane; a < c; a += kWarp) row_max = fmax(row_max, static_cast<double>(p[a]));
    row_max = warp_max(row_max);
    double total = 0.0;
    for (int64_t a = lane; a < c; a += kWarp) {
      const double e = exp(static_cast<double>(p[a]) - row_max);
      p[a] = static_cast<T>(e);
      total += e;
    }
    const double inv_total = 1.0 / warp_sum(total);
    // Each lane rescales only the entries it wrote, so no barrier is needed before reading them back.
    for (int64_t a = lane; a < c; a += kWarp) p[a] = static_cast<T>(static_cast<double>(p[a]) * inv_total);
    for (int64_t j = 0; j < k; ++j) {
      T* z = Z + (i * k + j) * m;
      double pz = 0.0;
      for (int64_t a = lane; a < m; a += kWarp) pz += static_cast<double>(p[a]) * static_cast<double>(z[a]);
      pz = warp_sum(pz);
      for (int64_t a = lane; a < m; a += kWarp) {
        z[a] = static_cast<T>(static_cast<double>(p[a]) * (static_cast<double>(z[a]) - pz) * inv_n);
      }
    }
  }
}

template <typename T>
cudaError_t launch(void* logits, void* Z, int64_t n, int64_t c, int64_t m, int64_t k, double inv_n,
                   cudaStream_t stream) {
  const int64_t warps_per_block = kThreads / kWarp;
  const int64_t blocks_needed = (n + warps_per_block - 1) / warps_per_block;
  const unsigned blocks = static_cast<unsigned>(blocks_needed < 65535 ? blocks_needed : 65535);
  softmax_jacobian_rows<T><<<blocks, kThreads, 0, stream>>>(static_cast<T*>(logits), static_cast<T*>(Z), n, c, m, k,
                                                                   inv_n);
  return cudaGetLastError();
}

}  // namespace

extern "C" {

// dtype: 0 float32, 1 float64 (UfDType of codec.h). logits (n, c) and Z (n, k m) contiguous, updated in place.
cudaError_t uf_softmax_jacobian_rows(void* logits, void* Z, int dtype, int64_t n, int64_t c, int64_t m, int64_t k,
                                     double inv_n, cudaStream_t stream) {
  if (n <= 0 || c <= 0 || m <= 0 || m > c || k <= 0) return m > c ? cudaErrorInvalidValue : cudaSuccess;
  if (dtype == 0) return launch<float>(logits, Z, n, c, m, k, inv_n, stream);
  if (dtype == 1) return launch<double>(logits, Z, n, c, m, k, inv_n, stream);
  return cudaErrorInvalidValue;
}
}
