// Blockwise absmax codec on CUDA: quantize, dequantize, dequantize-axpy. Torch-free (see codec.h).
//
// Bit-identical to unlearn_fast/reference.py: every float32 operation is an explicitly rounded
// intrinsic (__fdiv_rn, __fmul_rn, __fadd_rn), so neither nvcc's FMA contraction nor fast-math can
// change a code. Every thread owns kVecsPerThread groups of kVec consecutive elements; a group is
// one vector load or store when the pointers allow it (ALIGNED), else kVec scalar accesses with
// the same layout. Indices are 64-bit throughout.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "codec.h"

namespace {

constexpr int kVec = 4;                                   // consecutive elements per access
constexpr int kVecsPerThread = 2;                         // accesses per thread (memory-level parallelism)
constexpr int kElemsPerThread = kVec * kVecsPerThread;    // 8
constexpr int kThreads = 256;                             // threads per CUDA block (codec kernels)
constexpr int64_t kElemsPerCudaBlock = int64_t(kThreads) * kElemsPerThread;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_float<double>(float v) { return static_cast<double>(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// kVec values of T as one aligned unit, so an aligned access is a single vector instruction.
template <typename T>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

// Reads (or writes) kVec consecutive elements starting at ptr[i]; i is a multiple of kVec.
template <bool ALIGNED, typename T>
__device__ __forceinline__ void load_vec(const T* ptr, int64_t i, T (&out)[kVec]) {
  if (ALIGNED) {
    const Vec<T> v = *reinterpret_cast<const Vec<T>*>(ptr + i);
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = v.v[k];
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = ptr[i + k];
  }
}

template <bool ALIGNED, typename T>
__device__ __forceinline__ void store_vec(T* ptr, int64_t i, const T (&in)[kVec]) {
  if (ALIGNED) {
    Vec<T> v;
#pragma unroll
    for (int k = 0; k < kVec; ++k) v.v[k] = in[k];
    *reinterpret_cast<Vec<T>*>(ptr + i) = v;
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) ptr[i + k] = in[k];
  }
}

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// murmur3's 32-bit finaliser; must match reference._fmix32.
__device__ __forceinline__ uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

// reference.uniform_from_counter: float32 in [0, 1) from (seed, 64-bit element index).
__device__ __forceinline__ float uniform_from_counter(uint32_t seed_mixed, int64_t index) {
  const uint64_t i = static_cast<uint64_t>(index);
  const uint32_t h = fmix32(static_cast<uint32_t>(i) ^ fmix32(static_cast<uint32_t>(i >> 32) ^ seed_mixed));
  return __fmul_rn(static_cast<float>(h >> 8), 0x1p-24f);  // exact: h >> 8 < 2^24
}

// ----------------------------------------------------------------------------- quantize
// A group of `group` threads (blocksize / 8, from 4 to 512) quantizes one block of blocksize
// elements held in registers: absmax by butterfly shuffles inside the group (plus shared memory
// across warps when the group is wider than a warp), then codes. Element e of the block lives in
// thread (e / kVec) % group, so each vector access of a warp is contiguous.
template <typename T, bool ALIGNED>
__global__ void __launch_bounds__(512) quantize_kernel(const T* __restrict__ x, int64_t n, int64_t nblocks,
                                                       int blocksize, int group, int qmax, bool packed,
                                                       bool stochastic, uint32_t seed_mixed,
                                                       void* __restrict__ codes, float* __restrict__ scales) {
  __shared__ float warp_max[512 / 32];
  const int tid = threadIdx.x;
  const int lane_in_group = tid % group;
  const int64_t block = int64_t(blockIdx.x) * (blockDim.x / group) + tid / group;
  const bool active = block < nblocks;  // the last CUDA block may hold fewer quantization blocks
  const int64_t first = block * blocksize;

  float vals[kVecsPerThread][kVec];
  float local_max = 0.f;
#pragma unroll
  for (int j = 0; j < kVecsPerThread; ++j) {
    const int64_t i = first + (int64_t(j) * group + lane_in_group) * kVec;
    if (active && i + kVec <= n) {
      T raw[kVec];
      load_vec<ALIGNED>(x, i, raw);
#pragma unroll
      for (int k = 0; k < kVec; ++k) vals[j][k] = to_float(raw[k]);
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) vals[j][k] = (active && i + k < n) ? to_float(x[i + k]) : 0.f;
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float a = fabsf(vals[j][k]);
      // NaN and Inf both report +Inf, so a block is non-finite exactly when its absmax is Inf.
      local_max = fmaxf(local_max, a <= 3.402823466e38f ? a : __int_as_float(0x7f800000));
    }
  }
  // Butterfly within aligned lane groups of min(group, 32): every lane ends with the group max.
  const int width = group < 32 ? group : 32;
  for (int offset = width / 2; offset > 0; offset /= 2) {
    local_max = fmaxf(local_max, __shfl_xor_sync(0xffffffffu, local_max, offset));
  }
  if (group > 32) {
    if (tid % 32 == 0) warp_max[tid / 32] = local_max;
    __syncthreads();
    const int first_warp = (tid / group) * (group / 32);
    for (int w = 0; w < group / 32; ++w) local_max = fmaxf(local_max, warp_max[first_warp + w]);
  }
  if (!active) return;

  const float absmax = local_max;
  const bool finite = absmax <= 3.402823466e38f;
  const float qf = static_cast<float>(qmax);
  if (lane_in_group == 0) scales[block] = finite ? __fdiv_rn(absmax, qf) : __int_as_float(0x7fffffff);
  const float inv = absmax > 0.f ? __fdiv_rn(qf, absmax) : 0.f;

#pragma unroll
  for (int j = 0; j < kVecsPerThread; ++j) {
    const int64_t i = first + (int64_t(j) * group + lane_in_group) * kVec;
    int q[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float v = __fmul_rn(vals[j][k], inv);
      const float u = stochastic ? uniform_from_counter(seed_mixed, i + k) : 0.5f;
      const float t = __fadd_rn(v, u);
      // NaN (0 * inf when qmax / absmax overflows, absmax below ~1e-36) must give code 0 as in the
      // reference and the CPU kernel; fmaxf would turn it into -qmax.
      const float r = t == t ? fminf(fmaxf(floorf(t), -qf), qf) : 0.f;
      q[k] = finite ? static_cast<int>(r) : 0;
    }
    if (!packed) {
      int8_t* out = static_cast<int8_t*>(codes);
      if (i + kVec <= n) {
        int8_t bytes[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k) bytes[k] = static_cast<int8_t>(q[k]);
        store_vec<ALIGNED>(out, i, bytes);
      } else {
        for (int k = 0; k < kVec && i + k < n; ++k) out[i + k] = static_cast<int8_t>(q[k]);
      }
    } else {
      // Element 2j in the low nibble of byte j, code + 8; an odd tail gets a high nibble of 8 (code 0).
      uint8_t* out = static_cast<uint8_t*>(codes);
      uint8_t bytes[kVec / 2];
#pragma unroll
      for (int k = 0; k < kVec / 2; ++k) {
        const int hi = (i + 2 * k + 1 < n) ? q[2 * k + 1] : 0;
        bytes[k] = static_cast<uint8_t>((q[2 * k] + 8) | ((hi + 8) << 4));
      }
      if (i + kVec <= n) {
        if (ALIGNED) {
          *reinterpret_cast<uint16_t*>(out + i / 2) = static_cast<uint16_t>(bytes[0] | (bytes[1] << 8));
        } else {
          out[i / 2] = bytes[0];
          out[i / 2 + 1] = bytes[1];
        }
      } else {
        for (int k = 0; k < kVec / 2 && i + 2 * k < n; ++k) out[i / 2 + k] = bytes[k];
      }
    }
  }
}

template <typename T>
cudaError_t launch_quantize(const void* x, int64_t n, int64_t blocksize, int bits, bool stochastic, int64_t seed,
                            void* codes, float* scales, cudaStream_t stream) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const int group = static_cast<int>(blocksize / kElemsPerThread);  // 4 .. 512 threads per block
  const int threads = group > kThreads ? group : kThreads;
  const int64_t grid = (nblocks + threads / group - 1) / (threads / group);
  const int qmax = bits == 8 ? 127 : 7;
  const uint32_t seed_mixed = static_cast<uint32_t>(seed) * 0x9E3779B9u;
  const T* xt = static_cast<const T*>(x);
  // Vector accesses: x by kVec * sizeof(T) bytes, codes by 4 (8-bit) or 2 (4-bit) bytes.
  const bool vec = aligned(x, kVec * sizeof(T)) && aligned(codes, bits == 8 ? kVec : kVec / 2);
  auto kernel = vec ? quantize_kernel<T, true> : quantize_kernel<T, false>;
  kernel<<<static_cast<unsigned>(grid), threads, 0, stream>>>(xt, n, nblocks, static_cast<int>(blocksize), group,
                                                               qmax, bits == 4, stochastic, seed_mixed, codes,
                                                               scales);
  return cudaGetLastError();
}

// ----------------------------------------------------------------------------- dequantize, axpy
// Decodes the kVec elements starting at i (a multiple of kVec, so one scale and, for 4 bits, two
// whole bytes): code * scale as one float32 product, as reference._decode.
template <bool ALIGNED>
__device__ __forceinline__ void decode_vec(const void* codes, const float* scales, int64_t i, int64_t n, int log2bs,
                                           bool packed, float (&out)[kVec]) {
  const float scale = scales[i >> log2bs];
  int q[kVec];
  if (!packed) {
    const int8_t* c = static_cast<const int8_t*>(codes);
    if (i + kVec <= n) {
      int8_t raw[kVec];
      load_vec<ALIGNED>(c, i, raw);
#pragma unroll
      for (int k = 0; k < kVec; ++k) q[k] = raw[k];
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) q[k] = i + k < n ? c[i + k] : 0;
    }
  } else {
    const uint8_t* c = static_cast<const uint8_t*>(codes);
    uint8_t raw[kVec / 2];
    if (i + kVec <= n) {
      if (ALIGNED) {
        const uint16_t two = *reinterpret_cast<const uint16_t*>(c + i / 2);
        raw[0] = static_cast<uint8_t>(two & 0xFF);
        raw[1] = static_cast<uint8_t>(two >> 8);
      } else {
        raw[0] = c[i / 2];
        raw[1] = c[i / 2 + 1];
      }
    } else {
#pragma unroll
      for (int k = 0; k < kVec / 2; ++k) raw[k] = i + 2 * k < n ? c[i / 2 + k] : 0x88;
    }
#pragma unroll
    for (int k = 0; k < kVec / 2; ++k) {
      q[2 * k] = (raw[k] & 0xF) - 8;
      q[2 * k + 1] = (raw[k] >> 4) - 8;
    }
  }
#pragma unroll
  for (int k = 0; k < kVec; ++k) out[k] = __fmul_rn(static_cast<float>(q[k]), scale);
}

template <typename Out, bool ALIGNED>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(const void* __restrict__ codes,
                                                              const float* __restrict__ scales, int64_t n,
                                                              int log2bs, bool packed, Out* __restrict__ out) {
  const int64_t base = int64_t(blockIdx.x) * kElemsPerCudaBlock;
#pragma unroll
  for (int j = 0; j < kVecsPerThread; ++j) {
    const int64_t i = base + (int64_t(j) * kThreads + threadIdx.x) * kVec;
    if (i >= n) return;
    float value[kVec];
    decode_vec<ALIGNED>(codes, scales, i, n, log2bs, packed, value);
    Out result[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) result[k] = from_float<Out>(value[k]);
    if (i + kVec <= n) {
      store_vec<ALIGNED>(out, i, result);
    } else {
      for (int k = 0; k < kVec && i + k < n; ++k) out[i + k] = result[k];
    }
  }
}

// y = y + alpha * deq with every operation rounded in Acc (float, or double for double y).
template <typename T, typename Acc>
__device__ __forceinline__ T axpy_one(T y, Acc alpha, float deq);
template <>
__device__ __forceinline__ double axpy_one<double, double>(double y, double alpha, float deq) {
  return __dadd_rn(y, __dmul_rn(alpha, static_cast<double>(deq)));
}
template <typename T, typename Acc>
__device__ __forceinline__ T axpy_one(T y, Acc alpha, float deq) {
  return from_float<T>(__fadd_rn(to_float(y), __fmul_rn(alpha, deq)));
}

template <typename T, typename Acc, bool ALIGNED>
__global__ void __launch_bounds__(kThreads) axpy_kernel(T* __restrict__ y, const void* __restrict__ codes,
                                                        const float* __restrict__ scales, int64_t n, int log2bs,
                                                        bool packed, Acc alpha) {
  const int64_t base = int64_t(blockIdx.x) * kElemsPerCudaBlock;
#pragma unroll
  for (int j = 0; j < kVecsPerThread; ++j) {
    const int64_t i = base + (int64_t(j) * kThreads + threadIdx.x) * kVec;
    if (i >= n) return;
    float deq[kVec];
    decode_vec<ALIGNED>(codes, scales, i, n, log2bs, packed, deq);
    if (i + kVec <= n) {
      T vals[kVec];
      load_vec<ALIGNED>(y, i, vals);
#pragma unroll
      for (int k = 0; k < kVec; ++k) vals[k] = axpy_one<T, Acc>(vals[k], alpha, deq[k]);
      store_vec<ALIGNED>(y, i, vals);
    } else {
      for (int k = 0; k < kVec && i + k < n; ++k) y[i + k] = axpy_one<T, Acc>(y[i + k], alpha, deq[k]);
    }
  }
}

int log2_of(int64_t v) {
  int r = 0;
  while ((int64_t(1) << r) < v) ++r;
  return r;
}

bool codes_aligned(const void* codes, int bits) { return aligned(codes, bits == 8 ? kVec : kVec / 2); }

unsigned elementwise_grid(int64_t n) { return static_cast<unsigned>((n + kElemsPerCudaBlock - 1) / kElemsPerCudaBlock); }

template <typename Out>
cudaError_t launch_dequantize(const void* codes, const float* scales, int64_t n, int64_t blocksize, int bits, void* out,
                              cudaStream_t stream) {
  const bool vec = codes_aligned(codes, bits) && aligned(out, kVec * sizeof(Out));
  auto kernel = vec ? dequantize_kernel<Out, true> : dequantize_kernel<Out, false>;
  kernel<<<elementwise_grid(n), kThreads, 0, stream>>>(codes, scales, n, log2_of(blocksize), bits == 4,
                                                         static_cast<Out*>(out));
  return cudaGetLastError();
}

template <typename T, typename Acc>
cudaError_t launch_axpy(void* y, const void* codes, const float* scales, int64_t n, int64_t blocksize, int bits,
                        double alpha, cudaStream_t stream) {
  const bool vec = codes_aligned(codes, bits) && aligned(y, kVec * sizeof(T));
  auto kernel = vec ? axpy_kernel<T, Acc, true> : axpy_kernel<T, Acc, false>;
  kernel<<<elementwise_grid(n), kThreads, 0, stream>>>(static_cast<T*>(y), codes, scales, n, log2_of(blocksize),
                                                         bits == 4, static_cast<Acc>(alpha));
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t uf_quantize_blockwise(const void* x, int dtype, int64_t n, int64_t blocksize, int bits,
                                             bool stochastic, int64_t seed, void* codes, float* scales,
                                             cudaStream_t stream) {
  if (n <= 0 || blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)) || (bits != 4 && bits != 8)) {
    return cudaErrorInvalidValue;
  }
  switch (dtype) {
    case UF_FLOAT32:
      return launch_quantize<float>(x, n, blocksize, bits, stochastic, seed, codes, scales, stream);
    case UF_BFLOAT16:
      return launch_quantize<__nv_bfloat16>(x, n, blocksize, bits, stochastic, seed, codes, scales, stream);
    case UF_FLOAT16:
      return launch_quantize<__half>(x, n, blocksize, bits, stochastic, seed, codes, scales, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

extern "C" cudaError_t uf_dequantize_blockwise(const void* codes, const float* scales, int64_t n, int64_t blocksize,
                                               int bits, void* out, int out_dtype, cudaStream_t stream) {
  if (n <= 0 || blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)) || (bits != 4 && bits != 8)) {
    return cudaErrorInvalidValue;
  }
  switch (out_dtype) {
    case UF_FLOAT32:
      return launch_dequantize<float>(codes, scales, n, blocksize, bits, out, stream);
    case UF_FLOAT64:
      return launch_dequantize<double>(codes, scales, n, blocksize, bits, out, stream);
    case UF_BFLOAT16:
      return launch_dequantize<__nv_bfloat16>(codes, scales, n, blocksize, bits, out, stream);
    case UF_FLOAT16:
      return launch_dequantize<__half>(codes, scales, n, blocksize, bits, out, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

extern "C" cudaError_t uf_dequantize_axpy(void* y, int y_dtype, const void* codes, const float* scales, int64_t n,
                                          int64_t blocksize, int bits, double alpha, cudaStream_t stream) {
  if (n <= 0 || blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)) || (bits != 4 && bits != 8)) {
    return cudaErrorInvalidValue;
  }
  switch (y_dtype) {
    case UF_FLOAT32:
      return launch_axpy<float, float>(y, codes, scales, n, blocksize, bits, alpha, stream);
    case UF_FLOAT64:
      return launch_axpy<double, double>(y, codes, scales, n, blocksize, bits, alpha, stream);
    case UF_BFLOAT16:
      return launch_axpy<__nv_bfloat16, float>(y, codes, scales, n, blocksize, bits, alpha, stream);
    case UF_FLOAT16:
      return launch_axpy<__half, float>(y, codes, scales, n, blocksize, bits, alpha, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
