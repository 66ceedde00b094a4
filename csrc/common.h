// Shared by every op family of engine._C: the dtype table, host-side 16-bit float
// conversions for the C++ reference kernels, CUDA error checks, and the launcher
// declarations that csrc/binding.cpp dispatches to.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

namespace engine {

// ---------------------------------------------------------------------------------------
// Element types. The codes are what Python passes (engine/ops/backend.py dtype_code).

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

inline bool is_dtype_code(int code) { return code >= 0 && code <= 3; }

inline std::size_t element_size(DType dtype) {
  switch (dtype) {
    case DType::Float32: return 4;
    case DType::Float16: return 2;
    case DType::BFloat16: return 2;
    case DType::Float64: return 8;
  }
  throw std::invalid_argument("dtype: unknown dtype code " + std::to_string(static_cast<int>(dtype)));
}

// Host storage of the 16-bit types on the reference path: the raw IEEE / bfloat16 bits.
struct Half {
  std::uint16_t bits;
};
struct BFloat16 {
  std::uint16_t bits;
};

template <class T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) with T the element type of `dtype`. F16 and BF16 are the caller's
// 16-bit types: engine::Half / engine::BFloat16 on the host, __half / __nv_bfloat16 in CUDA.
template <class F16, class BF16, class Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::Float32: fn(TypeTag<float>{}); return;
    case DType::Float16: fn(TypeTag<F16>{}); return;
    case DType::BFloat16: fn(TypeTag<BF16>{}); return;
    case DType::Float64: fn(TypeTag<double>{}); return;
  }
  throw std::invalid_argument("dtype: unknown dtype code " + std::to_string(static_cast<int>(dtype)));
}

template <class Fn>
void dispatch_host_dtype(DType dtype, Fn&& fn) {
  dispatch_dtype<Half, BFloat16>(dtype, static_cast<Fn&&>(fn));
}

#ifdef __CUDACC__
template <class Fn>
void dispatch_cuda_dtype(DType dtype, Fn&& fn) {
  dispatch_dtype<__half, __nv_bfloat16>(dtype, static_cast<Fn&&>(fn));
}
#endif

// ---------------------------------------------------------------------------------------
// Host conversions for the reference kernels: 16-bit values are computed in float (fp32
// statistics and accumulation, as on the GPU), fp64 stays fp64. Rounding is to nearest even,
// matching torch's own casts, so reference outputs equal eager outputs bit for bit.

inline std::uint32_t float_bits(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

inline float bits_float(std::uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu;
  const std::uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = static_cast<float>(mantissa) * bits_float(0x33800000u);  // 2^-24
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf / NaN
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));  // rebias 15 -> 127
}

inline std::uint16_t float_to_half(float value) {
  std::uint32_t magnitude = float_bits(value);
  const std::uint16_t sign = static_cast<std::uint16_t>((magnitude >> 16) & 0x8000u);
  magnitude &= 0x7fffffffu;
  if (magnitude > 0x7f800000u) return sign | 0x7e00u;  // NaN stays a (quiet) NaN
  if (magnitude >= 0x47800000u) return sign | 0x7c00u;  // >= 2^16: infinity
  if (magnitude < 0x38800000u) {
    // Below 2^-14 the result is subnormal: adding 0.5f lines the half's last mantissa bit up
    // with float's, so the FPU's own round-to-nearest-even does the rounding.
    const float shifted = bits_float(magnitude) + 0.5f;
    return sign | static_cast<std::uint16_t>(float_bits(shifted) - 0x3f000000u);
  }
  // Normal: rebias the exponent, then round the 13 dropped mantissa bits to nearest even.
  // A carry out of the mantissa bumps the exponent, up to infinity for [65520, 65536).
  const std::uint32_t lowest_kept_bit = (magnitude >> 13) & 1u;
  magnitude += 0xc8000000u + 0xfffu + lowest_kept_bit;  // 0xc8000000 = (15 - 127) << 23 mod 2^32
  return sign | static_cast<std::uint16_t>(magnitude >> 13);
}

inline float bfloat16_to_float(std::uint16_t b) { return bits_float(static_cast<std::uint32_t>(b) << 16); }

inline std::uint16_t float_to_bfloat16(float value) {
  const std::uint32_t bits = float_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x40u);  // quiet NaN
  const std::uint32_t lowest_kept_bit = (bits >> 16) & 1u;
  return static_cast<std::uint16_t>((bits + 0x7fffu + lowest_kept_bit) >> 16);
}

// Compute type of each storage type on the reference path, with load / store helpers.
template <class T>
struct HostMath {
  using compute = float;
};
template <>
struct HostMath<double> {
  using compute = double;
};

inline float load(float v) { return v; }
inline double load(double v) { return v; }
inline float load(Half v) { return half_to_float(v.bits); }
inline float load(BFloat16 v) { return bfloat16_to_float(v.bits); }

template <class T>
T store(typename HostMath<T>::compute v);
template <>
inline float store<float>(float v) { return v; }
template <>
inline double store<double>(double v) { return v; }
template <>
inline Half store<Half>(float v) { return Half{float_to_half(v)}; }
template <>
inline BFloat16 store<BFloat16>(float v) { return BFloat16{float_to_bfloat16(v)}; }

// ---------------------------------------------------------------------------------------
// CUDA error checks: every runtime call, and cudaGetLastError() after every launch, so a
// failure surfaces as a Python RuntimeError naming the op instead of a later, unrelated one.

#ifdef __CUDACC__
inline void cuda_check(cudaError_t status, const char* op, const char* call) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(op) + ": " + call + " failed: " + cudaGetErrorString(status));
  }
}

#define ENGINE_CUDA_CHECK(op, call) ::engine::cuda_check((call), (op), #call)

// Makes `device` current for one launch and restores the caller's device afterwards, so
// torch's idea of the current device is left as it was.
class CudaDeviceScope {
 public:
  CudaDeviceScope(int device, const char* op) {
    ENGINE_CUDA_CHECK(op, cudaGetDevice(&previous_));
    if (device != previous_) ENGINE_CUDA_CHECK(op, cudaSetDevice(device));
    changed_ = device != previous_;
  }
  ~CudaDeviceScope() {
    if (changed_) cudaSetDevice(previous_);
  }
  CudaDeviceScope(const CudaDeviceScope&) = delete;
  CudaDeviceScope& operator=(const CudaDeviceScope&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};
#endif

// ---------------------------------------------------------------------------------------
// Launchers, one block per op family. `*_cpu` (csrc/<op>_ref.cpp) take host pointers;
// `*_cuda` (csrc/<op>.cu, only with ENGINE_WITH_CUDA) take device pointers, the device
// index and a cudaStream_t passed as void*. Inputs are checked by csrc/binding.cpp.

// patchify: image (B, C, H, W) <-> tokens (B, N, C*p*p), N = (H/p)*(W/p) patches in
// row-major order, each patch vector ordered (channel, row in patch, column in patch).
struct PatchShape {
  std::int64_t batch, channels, height, width, patch;
};

void patchify_cpu(const void* image, void* tokens, const PatchShape& shape, DType dtype);
void unpatchify_cpu(const void* tokens, void* image, const PatchShape& shape, DType dtype);
#ifdef ENGINE_WITH_CUDA
void patchify_cuda(const void* image, void* tokens, const PatchShape& shape, DType dtype, int device, void* stream);
void unpatchify_cuda(const void* tokens, void* image, const PatchShape& shape, DType dtype, int device, void* stream);
#endif

// norm_modulate / add_norm_modulate (engine/ops/norm_modulate.py):
//   forward   r = x + gate * y (y optional, gate optional = 1), h = LN(r) * (1 + scale) + shift
//   backward  dx = dr + dLN(dh), dy = dx * gate, and d_shift, d_scale, d_gate summed over N
// LN has no affine, eps kNormModulateEps, statistics in fp32 (fp64 for fp64 on the reference
// path). x, y, r, h, dh, dr, dx, dy: (B, N, D) in `dtype`; gate, shift, scale and their grads:
// (B, D) fp32; mean, rstd: (B, N) fp32. Absent optional buffers are nullptr.
struct NormModulateShape {
  std::int64_t batch, tokens, dim;
};

struct NormModulateForward {
  const void* x;
  const void* y;  // nullptr: plain norm_modulate of x (then r is nullptr too)
  const float* gate;
  const float* shift;
  const float* scale;
  void* r;
  void* h;
  float* mean;
  float* rstd;
};

struct NormModulateBackward {
  const void* dh;
  const void* dr;    // nullptr: r has no gradient of its own
  const void* r;     // the LN input (x for plain norm_modulate)
  const void* y;     // given exactly when gate is (only d_gate reads it)
  const float* gate;
  const float* scale;
  const float* mean;
  const float* rstd;
  void* dx;
  void* dy;          // given exactly when gate is
  float* dgate;      // given exactly when gate is
  float* dshift;
  float* dscale;
  float* workspace;  // norm_modulate_bwd_workspace_elements(...) fp32
};

constexpr double kNormModulateEps = 1e-6;

// The CUDA kernels hold a row in the registers of one block (at most 512 threads of 8 to 12
// elements) and the sample's modulation in its shared memory (3 * D fp32 <= 48 KiB).
constexpr std::int64_t kNormModulateMaxCudaDim = 4096;

// The CUDA backward gives each block a chunk of at least kNormModulateMinChunkRows rows of one
// sample, and each block writes one (3, D) fp32 row of partial d_shift / d_scale / d_gate sums:
// the workspace is (B, chunks, 3, D) with at most ceil(N / kNormModulateMinChunkRows) chunks.
constexpr std::int64_t kNormModulateMinChunkRows = 16;

inline std::int64_t norm_modulate_max_chunks(std::int64_t tokens) {
  return (tokens + kNormModulateMinChunkRows - 1) / kNormModulateMinChunkRows;
}

void norm_modulate_fwd_cpu(const NormModulateForward& io, const NormModulateShape& shape, DType dtype);
void norm_modulate_bwd_cpu(const NormModulateBackward& io, const NormModulateShape& shape, DType dtype);
#ifdef ENGINE_WITH_CUDA
void norm_modulate_fwd_cuda(const NormModulateForward& io, const NormModulateShape& shape, DType dtype, int device,
                            void* stream);
void norm_modulate_bwd_cuda(const NormModulateBackward& io, const NormModulateShape& shape, DType dtype, int device,
                            void* stream);
#endif

// ---------------------------------------------------------------------------------------
// gemm_epilogue (engine/ops/linear.py): cuBLASLt's column-major
//   D (m x n) = op(A) (m x k) * op(B) (k x n),  products accumulated in fp32 (fp64 for fp64),
// op(X) = X or X^T, X read with leading dimension ldX; with C given, acc += C (cuBLASLt's beta = 1:
// C has D's dtype and leading dimension, and is D itself or does not overlap it), then one fused epilogue:
//   None        D = acc
//   Bias        D = acc + bias[i]                                   (bias read, length m)
//   GeluAuxBias aux[i, j] = acc + bias[i] (in D's dtype); D = GELU_tanh(acc + bias[i])
//   DGelu       D = acc * GELU_tanh'(aux[i, j])                    (aux read: GeluAuxBias's output)
// aux has D's dtype and leading dimension ld_aux; bias has its own dtype.
// On the GPU cuBLASLt offers several candidate kernels (algorithms) for one call signature;
// `algo` picks one (0 = its heuristic's first choice) and the call returns how many there are,
// so the caller can time each and keep the fastest (engine/ops/linear.py does).

enum class GemmEpilogue : int { None = 0, Bias = 1, GeluAuxBias = 2, DGelu = 3 };

inline bool is_gemm_epilogue_code(int code) { return code >= 0 && code <= 3; }

struct GemmCall {
  bool trans_a, trans_b;
  std::int64_t m, n, k, lda, ldb, ldd, ld_aux;
  const void* a;
  const void* b;
  void* d;
  const void* c;  // nullptr: nothing added
  void* bias;  // nullptr for None and DGelu
  void* aux;   // GeluAuxBias (written) and DGelu (read) only
  DType ab_dtype, d_dtype, bias_dtype;
  GemmEpilogue epilogue;
};

void gemm_epilogue_cpu(const GemmCall& call);
#ifdef ENGINE_WITH_CUBLASLT
// Runs candidate `algo` (an error when there are not that many) and returns the candidate count.
int gemm_epilogue_cuda(const GemmCall& call, int algo, void* workspace, std::int64_t workspace_bytes, int device,
                       void* stream);
#endif

}  // namespace engine
