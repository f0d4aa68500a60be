// Launchers for the blockwise codec CUDA kernels (codec.cu). Torch-free: raw pointers, sizes and
// a cudaStream_t, so codec.cu compiles with plain nvcc; codec_glue.cpp calls these from torch.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

// Element types crossing the launcher boundary.
enum UfDType : int { UF_FLOAT32 = 0, UF_FLOAT64 = 1, UF_BFLOAT16 = 2, UF_FLOAT16 = 3 };

extern "C" {

// x: n values of dtype (float32, bfloat16 or float16). codes: n int8 (bits 8) or (n + 1) / 2 packed
// bytes (bits 4); scales: ceil(n / blocksize) float32. Matches reference.quantize_blockwise bit for bit.
cudaError_t uf_quantize_blockwise(const void* x, int dtype, int64_t n, int64_t blocksize, int bits,
                                  bool stochastic, int64_t seed, void* codes, float* scales, cudaStream_t stream);

// out[i] = code[i] * scales[i / blocksize] (one float32 product), cast to out_dtype (any UfDType).
cudaError_t uf_dequantize_blockwise(const void* codes, const float* scales, int64_t n, int64_t blocksize, int bits,
                                    void* out, int out_dtype, cudaStream_t stream);

// y[i] += alpha * code[i] * scale: float32 math, float64 for float64 y (alpha rounded to that type).
cudaError_t uf_dequantize_axpy(void* y, int y_dtype, const void* codes, const float* scales, int64_t n,
                               int64_t blocksize, int bits, double alpha, cudaStream_t stream);
}
