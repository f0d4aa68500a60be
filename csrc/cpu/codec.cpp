// Blockwise quantization codec on CPU: quantize_blockwise, dequantize_blockwise, dequantize_axpy_.
// Bit-identical to unlearn_fast/reference.py: every value is computed in float32 with the same
// operations in the same order (setup.py builds with -ffp-contract=off, so no fused multiply-adds).
// Work is split over whole blocks with parallel_for (parallel.h); inner loops are branch-free and contiguous
// so the compiler vectorises them.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "kernels.h"
#include "parallel.h"

namespace unlearn_fast::cpu {

// About 32k elements per task: large enough to amortise scheduling, small enough to balance.
constexpr int64_t kGrainElements = 1 << 15;
constexpr int64_t kMaxBlock = 4096;

namespace {

int qmax_for(int64_t bits) { return bits == 8 ? 127 : 7; }

int64_t grain_blocks(int64_t blocksize) { return std::max<int64_t>(1, kGrainElements / blocksize); }

// murmur3's 32-bit finaliser; must match reference._fmix32.
inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

// clamp(floor(t), -qmax, qmax) as an integer, exact, with NaN -> 0 as the reference's float -> int8
// cast gives. NaN and +-Inf only occur when qmax / absmax overflows (absmax below ~1e-36). Written
// with an int conversion because std::floor does not vectorise under GCC's default -ftrapping-math.
inline int32_t floor_clamped(float t, float qf) {
  t = t == t ? t : 0.f;
  t = std::min(std::max(t, -qf), qf);
  const int32_t i = static_cast<int32_t>(t);  // rounds toward zero
  return i - (t < static_cast<float>(i));
}

void check_codec(int64_t blocksize, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  TORCH_CHECK(blocksize >= 32 && blocksize <= kMaxBlock && (blocksize & (blocksize - 1)) == 0,
              "blocksize must be a power of two in [32, 4096], got ", blocksize);
}

// Quantize one block of `len` values starting at flat element `first`; writes its scale and
// `len` signed codes (not yet packed).
void quantize_block(const float* x, int64_t len, int64_t first, int qmax, bool stochastic, uint32_t seed_mixed,
                    float* scale_out, int8_t* q) {
  float absmax = 0.f;
  float nan_probe = 0.f;  // x * 0 is NaN exactly when x is NaN or +-Inf
#pragma omp simd reduction(max : absmax) reduction(+ : nan_probe)
  for (int64_t i = 0; i < len; ++i) {
    const float v = x[i];
    absmax = std::max(absmax, std::fabs(v));
    nan_probe += v * 0.f;
  }
  if (!(nan_probe == 0.f)) {
    *scale_out = std::numeric_limits<float>::quiet_NaN();
    std::fill(q, q + len, int8_t(0));
    return;
  }
  const float qf = static_cast<float>(qmax);
  *scale_out = absmax / qf;
  const float inv = absmax > 0.f ? qf / absmax : 0.f;
  if (!stochastic) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      q[i] = static_cast<int8_t>(floor_clamped(x[i] * inv + 0.5f, qf));
    }
    return;
  }
  // Blocks never straddle a multiple of 2^32 (blocksize divides it), so the high word is fixed.
  // The uniforms go through a small buffer: two simple loops vectorise better than one fused loop
  // (measured ~15% faster at p = 2^24).
  const uint32_t hi_mixed = fmix32(static_cast<uint32_t>(static_cast<uint64_t>(first) >> 32) ^ seed_mixed);
  const uint32_t lo_first = static_cast<uint32_t>(first);
  float u[kMaxBlock];
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const uint32_t h = fmix32((lo_first + static_cast<uint32_t>(i)) ^ hi_mixed);
    u[i] = static_cast<float>(static_cast<int32_t>(h >> 8)) * 0x1p-24f;
  }
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    q[i] = static_cast<int8_t>(floor_clamped(x[i] * inv + u[i], qf));
  }
}

// Two signed 4-bit codes per byte: element 2j in the low nibble, each stored as code + 8; an odd
// tail gets a high nibble of 8 (code 0), as reference.pack_nibbles writes it.
void pack_nibbles(const int8_t* q, int64_t len, uint8_t* out) {
  const int64_t pairs = len / 2;
#pragma omp simd
  for (int64_t j = 0; j < pairs; ++j) {
    out[j] = static_cast<uint8_t>((q[2 * j] + 8) | ((q[2 * j + 1] + 8) << 4));
  }
  if (len % 2) out[pairs] = static_cast<uint8_t>((q[len - 1] + 8) | (8 << 4));
}

template <typename T>
void quantize_impl(const T* x, int64_t n, int64_t blocksize, int64_t bits, bool stochastic, int64_t seed,
                   void* codes, float* scales) {
  const int qmax = qmax_for(bits);
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const uint32_t seed_mixed = static_cast<uint32_t>(seed) * 0x9E3779B9u;
  parallel_for(0, nblocks, grain_blocks(blocksize), [&](int64_t b0, int64_t b1) {
    int8_t q[kMaxBlock];
    float converted[kMaxBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t first = b * blocksize;
      const int64_t len = std::min(blocksize, n - first);
      const float* xb;
      if constexpr (std::is_same_v<T, float>) {
        xb = x + first;
      } else {  // bfloat16 / float16: widen the block once, exactly
        for (int64_t i = 0; i < len; ++i) converted[i] = static_cast<float>(x[first + i]);
        xb = converted;
      }
      if (bits == 8) {
        quantize_block(xb, len, first, qmax, stochastic, seed_mixed, scales + b, static_cast<int8_t*>(codes) + first);
      } else {
        quantize_block(xb, len, first, qmax, stochastic, seed_mixed, scales + b, q);
        pack_nibbles(q, len, static_cast<uint8_t*>(codes) + first / 2);
      }
    }
  });
}

}  // namespace

// Decodes elements [begin, begin + len) of a code stream into float32: code * scale of its block,
// one float32 product. `begin` must be even for 4 bits (callers start at block or tile
// boundaries). Shared with lbfgs.cpp (quantized curvature pairs).
void decode_codes(const void* codes, int64_t bits, const float* scales, int64_t blocksize, int64_t begin,
                  int64_t len, float* out) {
  const int64_t end = begin + len;
  int64_t i = begin;
  while (i < end) {
    const int64_t stop = std::min(end, (i / blocksize + 1) * blocksize);
    const float s = scales[i / blocksize];
    float* o = out + (i - begin);
    if (bits == 8) {
      const int8_t* c = static_cast<const int8_t*>(codes) + i;
#pragma omp simd
      for (int64_t k = 0; k < stop - i; ++k) o[k] = static_cast<float>(c[k]) * s;
    } else {
      // i is even: segments start at block boundaries or at an even `begin`.
      const uint8_t* c = static_cast<const uint8_t*>(codes) + i / 2;
      const int64_t pairs = (stop - i) / 2;
#pragma omp simd
      for (int64_t j = 0; j < pairs; ++j) {
        o[2 * j] = static_cast<float>((c[j] & 15) - 8) * s;
        o[2 * j + 1] = static_cast<float>((c[j] >> 4) - 8) * s;
      }
      if (i + 2 * pairs < stop) o[2 * pairs] = static_cast<float>((c[pairs] & 15) - 8) * s;  // odd tail
    }
    i = stop;
  }
}

namespace {

// Large outputs (>= 8 MiB) come from a small cache of blocks that have already been written once.
// Writing into fresh memory makes the OS fault in and zero every page first, which costs more than
// the decode itself (measured at p = 2^24: a fresh 64 MiB output took ~50 ms to fault in with
// 4 KiB pages, the decode ~5 ms); replaying a history decodes same-sized tensors over and over, so
// a freed block is kept for the next request of the same size. Fresh blocks are 2 MiB aligned and
// advised for transparent huge pages, which cuts the first-touch cost where THP is available.
// The cache holds at most kCachedBlocks blocks and kCachedBytes bytes; release_output_cache() empties it.
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kCacheFrom = 4 * kHugePage;
constexpr size_t kCachedBlocks = 4;
constexpr size_t kCachedBytes = size_t(1) << 30;

class OutputCache {
 public:
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = 0; i < blocks_.size(); ++i) {
      if (blocks_[i].second == bytes) {
        void* data = blocks_[i].first;
        blocks_.erase(blocks_.begin() + i);
        cached_ -= bytes;
        return data;
      }
    }
    return nullptr;
  }

  void give(void* data, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    // Oldest blocks make room for the newest: the next request most likely repeats the last size.
    while (!blocks_.empty() && (blocks_.size() >= kCachedBlocks || cached_ + bytes > kCachedBytes)) {
      std::free(blocks_.front().first);
      cached_ -= blocks_.front().second;
      blocks_.erase(blocks_.begin());
    }
    if (bytes > kCachedBytes) {
      std::free(data);
      return;
    }
    blocks_.emplace_back(data, bytes);
    cached_ += bytes;
  }

  size_t release() {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t freed = cached_;
    for (auto& block : blocks_) std::free(block.first);
    blocks_.clear();
    cached_ = 0;
    return freed;
  }

 private:
  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> blocks_;
  size_t cached_ = 0;
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors ran.
OutputCache& output_cache() {
  static auto* cache = new OutputCache();
  return *cache;
}

at::Tensor empty_output(int64_t numel, const at::TensorOptions& options) {
  const size_t bytes = size_t(numel) * options.dtype().itemsize();
  if (bytes < kCacheFrom) return at::empty({numel}, options);
  const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* data = output_cache().take(rounded);
  if (data == nullptr) {
    data = std::aligned_alloc(kHugePage, rounded);
    TORCH_CHECK(data != nullptr, "out of memory allocating ", rounded, " bytes for the output");
#ifdef __linux__
    madvise(data, rounded, MADV_HUGEPAGE);  // only a hint: harmless where THP is off
#endif
  }
  return at::from_blob(data, {numel}, [rounded](void* ptr) { output_cache().give(ptr, rounded); }, options);
}

void check_codes(const at::Tensor& codes, const at::Tensor& scales, int64_t blocksize, int64_t bits, int64_t numel) {
  check_codec(blocksize, bits);
  TORCH_CHECK(numel > 0, "numel must be positive, got ", numel);
  TORCH_CHECK(codes.device().is_cpu() && scales.device().is_cpu(), "codes and scales must be CPU tensors");
  TORCH_CHECK(codes.scalar_type() == (bits == 8 ? at::kChar : at::kByte), "codes must be int8 (bits=8) or uint8 (bits=4)");
  TORCH_CHECK(scales.scalar_type() == at::kFloat, "scales must be float32");
  TORCH_CHECK(codes.is_contiguous() && scales.is_contiguous(), "codes and scales must be contiguous");
  TORCH_CHECK(codes.numel() == (bits == 8 ? numel : (numel + 1) / 2), "codes has the wrong number of elements");
  TORCH_CHECK(scales.numel() == (numel + blocksize - 1) / blocksize, "scales has the wrong number of blocks");
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& x, int64_t blocksize, int64_t bits,
                                                          bool stochastic, int64_t seed) {
  check_codec(blocksize, bits);
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor");
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  TORCH_CHECK(x.numel() > 0, "x is empty");
  const int64_t n = x.numel();
  auto codes = empty_output(bits == 8 ? n : (n + 1) / 2, x.options().dtype(bits == 8 ? at::kChar : at::kByte));
  auto scales = at::empty({(n + blocksize - 1) / blocksize}, x.options().dtype(at::kFloat));
  void* out = codes.data_ptr();
  float* s = scales.data_ptr<float>();
  switch (x.scalar_type()) {
    case at::kFloat:
      quantize_impl(x.data_ptr<float>(), n, blocksize, bits, stochastic, seed, out, s);
      break;
    case at::kBFloat16:
      quantize_impl(x.data_ptr<at::BFloat16>(), n, blocksize, bits, stochastic, seed, out, s);
      break;
    case at::kHalf:
      quantize_impl(x.data_ptr<at::Half>(), n, blocksize, bits, stochastic, seed, out, s);
      break;
    default:
      TORCH_CHECK(false, "x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return {codes, scales};
}

template <typename T>
void dequantize_impl(const void* codes, const float* scales, int64_t blocksize, int64_t bits, int64_t n, T* out) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  parallel_for(0, nblocks, grain_blocks(blocksize), [&](int64_t b0, int64_t b1) {
    float buf[kMaxBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t first = b * blocksize;
      const int64_t len = std::min(blocksize, n - first);
      if constexpr (std::is_same_v<T, float>) {
        decode_codes(codes, bits, scales, blocksize, first, len, out + first);
      } else {
        decode_codes(codes, bits, scales, blocksize, first, len, buf);
        T* o = out + first;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) o[i] = static_cast<T>(buf[i]);
      }
    }
  });
}

// quantize_blockwise_cpu writing into caller-owned codes and scales (contiguous, of the op's shapes): what the
// history recorder needs to encode each parameter straight into its chunk buffers, with no output allocation and no
// copy (the copies were a sixth of record()'s time at 10M parameters). Not an op of the library's registry: the
// recorder's helper, checked byte for byte against reference.quantize_blockwise (tests/test_ops.py).
void quantize_blockwise_into_cpu(const at::Tensor& x, at::Tensor& codes, at::Tensor& scales, int64_t blocksize, int64_t bits) {
  check_codec(blocksize, bits);
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.numel() > 0, "x must be a non-empty contiguous CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32, got ", x.scalar_type());
  const int64_t n = x.numel();
  check_codes(codes, scales, blocksize, bits, n);
  const auto* x0 = static_cast<const char*>(x.data_ptr());
  const auto* x1 = x0 + n * sizeof(float);
  for (const at::Tensor* out : {&codes, &scales}) {
    const auto* o0 = static_cast<const char*>(out->data_ptr());
    const auto* o1 = o0 + out->numel() * out->element_size();
    TORCH_CHECK(o1 <= x0 || x1 <= o0, "codes and scales must not overlap x");
  }
  quantize_impl(x.data_ptr<float>(), n, blocksize, bits, false, 0, codes.data_ptr(), scales.data_ptr<float>());
}

at::Tensor dequantize_blockwise_cpu(const at::Tensor& codes, const at::Tensor& scales, int64_t blocksize,
                                    int64_t bits, int64_t numel, at::ScalarType dtype) {
  check_codes(codes, scales, blocksize, bits, numel);
  auto out = empty_output(numel, codes.options().dtype(dtype));
  const void* c = codes.data_ptr();
  const float* s = scales.data_ptr<float>();
  switch (dtype) {
    case at::kFloat:
      dequantize_impl(c, s, blocksize, bits, numel, out.data_ptr<float>());
      break;
    case at::kDouble:
      dequantize_impl(c, s, blocksize, bits, numel, out.data_ptr<double>());
      break;
    case at::kBFloat16:
      dequantize_impl(c, s, blocksize, bits, numel, out.data_ptr<at::BFloat16>());
      break;
    case at::kHalf:
      dequantize_impl(c, s, blocksize, bits, numel, out.data_ptr<at::Half>());
      break;
    default:
      TORCH_CHECK(false, "dtype must be float32, float64, bfloat16 or float16, got ", dtype);
  }
  return out;
}

// y += alpha * dequant, as reference: float32 math (float64 for float64 y), alpha rounded to that type.
template <typename T>
void axpy_impl(T* y, const void* codes, const float* scales, double alpha, int64_t blocksize, int64_t bits, int64_t n) {
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const Acc a = static_cast<Acc>(alpha);
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  parallel_for(0, nblocks, grain_blocks(blocksize), [&](int64_t b0, int64_t b1) {
    float buf[kMaxBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t first = b * blocksize;
      const int64_t len = std::min(blocksize, n - first);
      decode_codes(codes, bits, scales, blocksize, first, len, buf);
      T* o = y + first;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        o[i] = static_cast<T>(static_cast<Acc>(o[i]) + a * static_cast<Acc>(buf[i]));
      }
    }
  });
}

void dequantize_axpy__cpu(at::Tensor& y, const at::Tensor& codes, const at::Tensor& scales, double alpha,
                          int64_t blocksize, int64_t bits) {
  TORCH_CHECK(y.device().is_cpu(), "y must be a CPU tensor");
  TORCH_CHECK(y.is_contiguous(), "y must be contiguous (it is updated in place)");
  check_codes(codes, scales, blocksize, bits, y.numel());
  const void* c = codes.data_ptr();
  const float* s = scales.data_ptr<float>();
  const int64_t n = y.numel();
  switch (y.scalar_type()) {
    case at::kFloat:
      axpy_impl(y.data_ptr<float>(), c, s, alpha, blocksize, bits, n);
      break;
    case at::kDouble:
      axpy_impl(y.data_ptr<double>(), c, s, alpha, blocksize, bits, n);
      break;
    case at::kBFloat16:
      axpy_impl(y.data_ptr<at::BFloat16>(), c, s, alpha, blocksize, bits, n);
      break;
    case at::kHalf:
      axpy_impl(y.data_ptr<at::Half>(), c, s, alpha, blocksize, bits, n);
      break;
    default:
      TORCH_CHECK(false, "y must be float32, float64, bfloat16 or float16, got ", y.scalar_type());
  }
}

}  // namespace

void bind_codec(pybind11::module_& m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("quantize_blockwise_cpu", &quantize_blockwise_cpu, "blockwise absmax quantization (CPU)", release());
  m.def("quantize_blockwise_into_cpu", &quantize_blockwise_into_cpu, "blockwise absmax quantization into given codes and scales (CPU)",
        release());
  m.def("dequantize_blockwise_cpu", &dequantize_blockwise_cpu, "blockwise dequantization (CPU)", release());
  m.def("dequantize_axpy__cpu", &dequantize_axpy__cpu, "y += alpha * dequantize(codes) in place (CPU)", release());
  m.def("release_output_cache", [] { return output_cache().release(); },
        "free the cached large CPU output blocks; returns the bytes freed");
}

}  // namespace unlearn_fast::cpu
