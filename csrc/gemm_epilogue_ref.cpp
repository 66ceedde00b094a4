// C++ reference of gemm_epilogue: cuBLASLt's column-major GEMM and epilogues as common.h
// states them, in plain loops, so CI checks on the CPU the row-major <-> column-major mapping
// that engine/ops/linear.py builds on. Products of 16-bit and fp32
// inputs accumulate in float, fp64 in double; epilogue math is in the same type; results are
// rounded once, to the output dtype.
#include <cmath>

#include "common.h"

namespace engine {
namespace {

double load_any(const void* base, DType dtype, std::int64_t index) {
  switch (dtype) {
    case DType::Float32: return static_cast<const float*>(base)[index];
    case DType::Float16: return load(static_cast<const Half*>(base)[index]);
    case DType::BFloat16: return load(static_cast<const BFloat16*>(base)[index]);
    case DType::Float64: return static_cast<const double*>(base)[index];
  }
  throw std::invalid_argument("gemm_epilogue: unknown dtype");
}

void store_any(void* base, DType dtype, std::int64_t index, double value) {
  switch (dtype) {
    case DType::Float32: static_cast<float*>(base)[index] = static_cast<float>(value); return;
    case DType::Float16: static_cast<Half*>(base)[index] = store<Half>(static_cast<float>(value)); return;
    case DType::BFloat16: static_cast<BFloat16*>(base)[index] = store<BFloat16>(static_cast<float>(value)); return;
    case DType::Float64: static_cast<double*>(base)[index] = value; return;
  }
  throw std::invalid_argument("gemm_epilogue: unknown dtype");
}

// GELU with the tanh approximation and its derivative, in the accumulation type T.
template <class T>
T gelu_tanh(T x) {
  const T u = T(0.7978845608028654) * (x + T(0.044715) * x * x * x);
  return T(0.5) * x * (T(1) + std::tanh(u));
}

template <class T>
T gelu_tanh_grad(T x) {
  const T u = T(0.7978845608028654) * (x + T(0.044715) * x * x * x);
  const T t = std::tanh(u);
  const T du = T(0.7978845608028654) * (T(1) + T(3) * T(0.044715) * x * x);
  return T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * du;
}

template <class T>
void gemm(const GemmCall& c) {
  // op(A)[i, p] and op(B)[p, j] of the column-major operands
  auto a_at = [&](std::int64_t i, std::int64_t p) {
    return static_cast<T>(load_any(c.a, c.ab_dtype, c.trans_a ? p + i * c.lda : i + p * c.lda));
  };
  auto b_at = [&](std::int64_t p, std::int64_t j) {
    return static_cast<T>(load_any(c.b, c.ab_dtype, c.trans_b ? j + p * c.ldb : p + j * c.ldb));
  };
  for (std::int64_t j = 0; j < c.n; ++j) {
    for (std::int64_t i = 0; i < c.m; ++i) {
      T acc = T(0);
      for (std::int64_t p = 0; p < c.k; ++p) acc += a_at(i, p) * b_at(p, j);
      if (c.c != nullptr) acc += static_cast<T>(load_any(c.c, c.d_dtype, i + j * c.ldd));
      switch (c.epilogue) {
        case GemmEpilogue::None:
          break;
        case GemmEpilogue::Bias:
          acc += static_cast<T>(load_any(c.bias, c.bias_dtype, i));
          break;
        case GemmEpilogue::GeluAuxBias:
          acc += static_cast<T>(load_any(c.bias, c.bias_dtype, i));
          store_any(c.aux, c.d_dtype, i + j * c.ld_aux, acc);
          acc = gelu_tanh(acc);
          break;
        case GemmEpilogue::DGelu:
          acc *= gelu_tanh_grad(static_cast<T>(load_any(c.aux, c.d_dtype, i + j * c.ld_aux)));
          break;
      }
      store_any(c.d, c.d_dtype, i + j * c.ldd, acc);
    }
  }
}

}  // namespace

void gemm_epilogue_cpu(const GemmCall& call) {
  if (call.ab_dtype == DType::Float64) {
    gemm<double>(call);
  } else {
    gemm<float>(call);
  }
}

}  // namespace engine
