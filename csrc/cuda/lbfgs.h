// Launchers for the compact L-BFGS CUDA kernels (lbfgs.cu). Torch-free: raw pointers, sizes and a
// cudaStream_t, so lbfgs.cu compiles with plain nvcc; lbfgs_glue.cpp calls these from torch.
//
// The m curvature pairs are rows of S and Y (oldest first). Reductions return per-CUDA-block
// partial sums in float64 that the glue adds up with torch (a fixed number of blocks, so results
// are deterministic); the 2m x 2m algebra between the two passes is done with torch on the device.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "codec.h"  // UfDType

// How the rows of S and Y are stored.
enum UfRowsKind : int {
  UF_ROWS_FLOAT32 = 0,  // dense (m, p) float32
  UF_ROWS_FLOAT64 = 1,  // dense (m, p) float64
  UF_ROWS_Q8 = 2,       // each row quantized alone: (m, p) int8 codes + (m, ceil(p / blocksize)) float32 scales
  UF_ROWS_Q4 = 3,       // as UF_ROWS_Q8 with (m, (p + 1) / 2) packed 4-bit codes
};

struct UfRows {
  const void* s;
  const void* y;
  int kind;                // UfRowsKind
  const float* s_scales;  // quantized kinds only
  const float* y_scales;
  int64_t blocksize;      // quantized kinds only
};

extern "C" {

// Largest m the reduction kernels take (their per-warp partial sums live in 48 KiB of shared memory).
int64_t uf_lbfgs_max_pairs(void);

// Number of CUDA blocks (along x) of the row-dot reductions for length p: the partials' middle dimension.
int64_t uf_lbfgs_reduce_blocks(int64_t p);

// partials[(j * nblocks + b) * 2m + r] over blocks b of uf_lbfgs_reduce_blocks(p), for j < nj:
// sum_c row_r[c] * v[c * stride_c + j * stride_j], with rows 0..m-1 the rows of Y and m..2m-1 those of S.
// lbfgs_gram: v = S (stride_c 1, stride_j p, nj = m). lbfgs_matvec: v = V (p, k) (stride_c k, stride_j 1, nj = k).
cudaError_t uf_lbfgs_row_dots(UfRows rows, int64_t m, int64_t p, const void* v, int v_dtype, int64_t stride_c,
                              int64_t stride_j, int64_t nj, double* partials, cudaStream_t stream);

// lbfgs_gram: the partials of uf_lbfgs_row_dots with v = S (nj = m), from one pass over S and Y (dense rows).
cudaError_t uf_lbfgs_gram(UfRows rows, int64_t m, int64_t p, double* partials, cudaStream_t stream);

// As uf_lbfgs_row_dots with nj = 1 and v = w - w_ref (both of dtype, float32 or float64).
cudaError_t uf_qn_row_dots(UfRows rows, int64_t m, int64_t p, const void* w, const void* w_ref, int dtype,
                           double* partials, cudaStream_t stream);

// out[c, l] = sigma v[c, l] - sum_i (y_i[c] coef[i, l] + s_i[c] coef[m + i, l]) for V, out (p, k) of v_dtype;
// coef (2m, k) float64 = [c_Y; sigma c_S], sigma a device float64 scalar.
cudaError_t uf_lbfgs_matvec_apply(UfRows rows, int64_t m, int64_t p, const void* V, int v_dtype, int64_t k,
                                  const double* sigma, const double* coef, void* out, cudaStream_t stream);

// Number of CUDA blocks of uf_qn_update for length p: the length of norm_partials.
int64_t uf_qn_update_blocks(int64_t p);

// One pass: Bv = sigma v - sum_i (y_i coef[i] + s_i coef[m + i]) with v = w - w_ref,
// g = alpha (Bv + g_ref + lam w_ref) - beta (g_extra + lam w), w -= eta g (float64 math),
// norm_partials[b] = sum over block b of (eta g)^2.
cudaError_t uf_qn_update(UfRows rows, int64_t m, int64_t p, void* w, const void* w_ref, const void* g_ref,
                         const void* g_extra, int dtype, const double* sigma, const double* coef, double eta,
                         double alpha, double beta, double lam, double* norm_partials, cudaStream_t stream);
}
