// gemm_epilogue on the GPU: one cuBLASLt matmul with a fused epilogue (common.h states the
// contract). cuBLASLt, not a kernel of our own: its Hopper GEMMs are what torch runs for
// F.linear (the nvjet kernels of the step profile, ~87% of the measured matmul rate), and the
// epilogues fold the work after them (bias, GELU and its saved input, GELU's backward) into the
// GEMM's output pass. The bias-gradient epilogues (DGELU_BGRAD, BGRADB) measured slower than a
// plain GEMM plus a Triton pass (engine/ops/mlp.py), so they are not offered.
#include <cublasLt.h>

#include <array>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "common.h"

namespace engine {
namespace {

void cublas_check(cublasStatus_t status, const char* call) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string("gemm_epilogue: ") + call + " failed: " + cublasLtGetStatusString(status));
  }
}

#define ENGINE_CUBLAS_CHECK(call) cublas_check((call), #call)

cudaDataType_t cuda_type(DType dtype) {
  switch (dtype) {
    case DType::Float32: return CUDA_R_32F;
    case DType::Float16: return CUDA_R_16F;
    case DType::BFloat16: return CUDA_R_16BF;
    case DType::Float64: return CUDA_R_64F;
  }
  throw std::invalid_argument("gemm_epilogue: unknown dtype");
}

cublasLtEpilogue_t cublas_epilogue(GemmEpilogue epilogue) {
  switch (epilogue) {
    case GemmEpilogue::None: return CUBLASLT_EPILOGUE_DEFAULT;
    case GemmEpilogue::Bias: return CUBLASLT_EPILOGUE_BIAS;
    case GemmEpilogue::GeluAuxBias: return CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
    case GemmEpilogue::DGelu: return CUBLASLT_EPILOGUE_DGELU;
  }
  throw std::invalid_argument("gemm_epilogue: unknown epilogue");
}

// One handle per device, created on first use and kept for the process (cuBLASLt handles are
// not tied to a stream).
cublasLtHandle_t handle_for(int device) {
  static std::mutex mutex;
  static std::vector<cublasLtHandle_t> handles;
  std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<std::size_t>(device) >= handles.size()) handles.resize(device + 1, nullptr);
  if (handles[device] == nullptr) ENGINE_CUBLAS_CHECK(cublasLtCreate(&handles[device]));
  return handles[device];
}

// The largest power of two (up to 256, cuBLASLt's default assumption) that divides the address.
std::uint32_t pointer_alignment(const void* pointer) {
  const auto address = reinterpret_cast<std::uintptr_t>(pointer);
  std::uint32_t alignment = 1;
  while (alignment < 256 && address % (2 * alignment) == 0) alignment *= 2;
  return alignment;
}

// RAII owners of the descriptors of one call.
struct MatmulDesc {
  cublasLtMatmulDesc_t desc = nullptr;
  ~MatmulDesc() { if (desc) cublasLtMatmulDescDestroy(desc); }
  template <class T>
  void set(cublasLtMatmulDescAttributes_t attribute, const T& value) {
    ENGINE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, attribute, &value, sizeof value));
  }
};
struct Layout {
  cublasLtMatrixLayout_t desc = nullptr;
  Layout(cudaDataType_t type, std::int64_t rows, std::int64_t cols, std::int64_t ld) {
    ENGINE_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&desc, type, rows, cols, ld));
  }
  ~Layout() { if (desc) cublasLtMatrixLayoutDestroy(desc); }
};
struct Preference {
  cublasLtMatmulPreference_t desc = nullptr;
  Preference() { ENGINE_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&desc)); }
  ~Preference() { if (desc) cublasLtMatmulPreferenceDestroy(desc); }
};

// Candidates asked of the heuristic per call signature. Its first choice is not always the
// fastest (H100: GELU_AUX_BIAS at 16384 x 1152 -> 4608, 341 us for candidate 0 against 286 for
// candidate 4 of 0-4), so the caller times them instead of trusting the order.
constexpr int kMaxCandidates = 16;

// What decides cuBLASLt's candidate list: shapes, layouts, dtypes, epilogue, operand alignment
// and workspace size (not the pointers themselves).
struct Signature {
  std::array<std::int64_t, 19> fields;
  bool operator<(const Signature& other) const { return fields < other.fields; }
};

// The heuristic query costs tens of microseconds of host time; the engine repeats a handful of
// signatures thousands of times, so each list is asked for once per process.
const std::vector<cublasLtMatmulHeuristicResult_t>& candidates_for(const Signature& key, cublasLtHandle_t handle,
                                                                    const MatmulDesc& op, const Layout& a,
                                                                    const Layout& b, const Layout& out,
                                                                    const Preference& preference) {
  static std::mutex mutex;
  static std::map<Signature, std::vector<cublasLtMatmulHeuristicResult_t>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  std::vector<cublasLtMatmulHeuristicResult_t> results(kMaxCandidates);
  int count = 0;
  ENGINE_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(handle, op.desc, a.desc, b.desc, out.desc, out.desc,
                                                     preference.desc, kMaxCandidates, results.data(), &count));
  results.resize(count);
  return cache.emplace(key, std::move(results)).first->second;
}

}  // namespace

int gemm_epilogue_cuda(const GemmCall& c, int algo, void* workspace, std::int64_t workspace_bytes, int device,
                       void* stream) {
  CudaDeviceScope scope(device, "gemm_epilogue");
  const bool fp64 = c.ab_dtype == DType::Float64;
  MatmulDesc op;
  ENGINE_CUBLAS_CHECK(cublasLtMatmulDescCreate(&op.desc, fp64 ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F,
                                               fp64 ? CUDA_R_64F : CUDA_R_32F));
  op.set(CUBLASLT_MATMUL_DESC_TRANSA, c.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N);
  op.set(CUBLASLT_MATMUL_DESC_TRANSB, c.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N);
  op.set(CUBLASLT_MATMUL_DESC_EPILOGUE, cublas_epilogue(c.epilogue));
  if (c.epilogue == GemmEpilogue::Bias || c.epilogue == GemmEpilogue::GeluAuxBias) {
    op.set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, c.bias);
    op.set(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, cuda_type(c.bias_dtype));
  }
  if (c.epilogue == GemmEpilogue::GeluAuxBias || c.epilogue == GemmEpilogue::DGelu) {
    op.set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, c.aux);
    op.set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, c.ld_aux);
  }
  const cudaDataType_t ab = cuda_type(c.ab_dtype), d = cuda_type(c.d_dtype);
  Layout a(ab, c.trans_a ? c.k : c.m, c.trans_a ? c.m : c.k, c.lda);
  Layout b(ab, c.trans_b ? c.n : c.k, c.trans_b ? c.k : c.n, c.ldb);
  Layout out(d, c.m, c.n, c.ldd);

  cublasLtHandle_t handle = handle_for(device);
  Preference preference;
  const std::uint64_t max_workspace = static_cast<std::uint64_t>(workspace_bytes);
  ENGINE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference.desc, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                           &max_workspace, sizeof max_workspace));
  // Without these the heuristic assumes 256-byte-aligned operands; views that start at an
  // offset (a slice of a fused projection) would then get a kernel they fault in.
  const void* aux_or_d = c.aux != nullptr ? c.aux : c.d;
  const void* c_or_d = c.c != nullptr ? c.c : c.d;  // without C, beta = 0 and cuBLASLt reads none
  const std::pair<cublasLtMatmulPreferenceAttributes_t, const void*> operands[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, c.a}, {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, c.b},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, c_or_d}, {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, c.d}};
  std::array<std::uint32_t, 4> alignments{};
  for (std::size_t i = 0; i < 4; ++i) {
    alignments[i] = pointer_alignment(operands[i].second);
    ENGINE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference.desc, operands[i].first, &alignments[i],
                                                             sizeof alignments[i]));
  }
  const Signature key{{c.trans_a, c.trans_b, c.m, c.n, c.k, c.lda, c.ldb, c.ldd, c.ld_aux,
                       static_cast<std::int64_t>(c.epilogue),
                       static_cast<std::int64_t>(c.ab_dtype) * 64 + static_cast<std::int64_t>(c.d_dtype) * 8 +
                           static_cast<std::int64_t>(c.bias_dtype),
                       alignments[0], alignments[1], alignments[2], alignments[3], pointer_alignment(aux_or_d),
                       workspace_bytes, device, c.c != nullptr}};
  const auto& candidates = candidates_for(key, handle, op, a, b, out, preference);
  const int count = static_cast<int>(candidates.size());
  if (count == 0) {
    throw std::runtime_error("gemm_epilogue: cuBLASLt has no algorithm for m=" + std::to_string(c.m) +
                             " n=" + std::to_string(c.n) + " k=" + std::to_string(c.k) + " epilogue " +
                             std::to_string(static_cast<int>(c.epilogue)) + " with these dtypes and alignments");
  }
  if (algo < 0 || algo >= count) {
    throw std::out_of_range("gemm_epilogue: algo " + std::to_string(algo) + " asked for, cuBLASLt offers " +
                            std::to_string(count) + " candidates for this call");
  }
  const double one64 = 1.0, zero64 = 0.0;
  const float one32 = 1.0f, zero32 = 0.0f;
  const void* alpha = fp64 ? static_cast<const void*>(&one64) : static_cast<const void*>(&one32);
  const bool add_c = c.c != nullptr;
  const void* beta = fp64 ? static_cast<const void*>(add_c ? &one64 : &zero64)
                          : static_cast<const void*>(add_c ? &one32 : &zero32);
  ENGINE_CUBLAS_CHECK(cublasLtMatmul(handle, op.desc, alpha, c.a, a.desc, c.b, b.desc, beta, c_or_d, out.desc, c.d,
                                     out.desc, &candidates[algo].algo, workspace,
                                     static_cast<std::size_t>(workspace_bytes), static_cast<cudaStream_t>(stream)));
  return count;
}

}  // namespace engine
