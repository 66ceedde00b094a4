// The Python face of engine._C. Each function checks its inputs (ValueError naming the
// argument) and hands them to the C++ reference launcher (device -1: host pointers) or the
// CUDA one (device >= 0). Pointers, shapes, dtype codes and streams arrive as Python ints.
#include <pybind11/pybind11.h>

#include <iterator>

#include "common.h"

namespace py = pybind11;
using engine::DType;

namespace {

// ---------------------------------------------------------------------------------------
// Checks shared by every op family.

void* checked_pointer(std::uintptr_t address, const char* field) {
  if (address == 0) throw py::value_error(std::string(field) + ": null pointer");
  return reinterpret_cast<void*>(address);
}

std::int64_t checked_positive(std::int64_t value, const char* field) {
  if (value <= 0) throw py::value_error(std::string(field) + ": must be positive, got " + std::to_string(value));
  return value;
}

DType checked_dtype(int code) {
  if (!engine::is_dtype_code(code)) {
    throw py::value_error("dtype: unknown dtype code " + std::to_string(code) +
                          "; expected 0 (float32), 1 (float16), 2 (bfloat16) or 3 (float64)");
  }
  return static_cast<DType>(code);
}

int checked_device(int device) {
  if (device < -1) {
    throw py::value_error("device: " + std::to_string(device) + " is neither -1 (host pointers) nor a CUDA device index");
  }
  return device;
}

// Element count of a buffer with these extents, refusing sizes that overflow int64.
std::int64_t checked_elements(std::initializer_list<std::int64_t> extents, const char* field) {
  std::int64_t elements = 1;
  for (std::int64_t extent : extents) {
    if (__builtin_mul_overflow(elements, extent, &elements)) {
      throw py::value_error(std::string(field) + ": element count overflows int64");
    }
  }
  return elements;
}

// The kernels read one buffer while writing the other, so the two must not share bytes.
void check_disjoint(std::uintptr_t input, std::uintptr_t output, std::int64_t bytes, const char* output_field) {
  const std::uintptr_t size = static_cast<std::uintptr_t>(bytes);
  if (input < output + size && output < input + size) {
    throw py::value_error(std::string(output_field) + ": output buffer overlaps the input buffer");
  }
}

// ---------------------------------------------------------------------------------------
// patchify / unpatchify

engine::PatchShape checked_patch_shape(std::int64_t batch, std::int64_t channels, std::int64_t height,
                                       std::int64_t width, std::int64_t patch) {
  const engine::PatchShape shape{checked_positive(batch, "batch"), checked_positive(channels, "channels"),
                                 checked_positive(height, "height"), checked_positive(width, "width"),
                                 checked_positive(patch, "patch")};
  if (height % patch != 0) {
    throw py::value_error("height: " + std::to_string(height) + " is not divisible by patch " + std::to_string(patch));
  }
  if (width % patch != 0) {
    throw py::value_error("width: " + std::to_string(width) + " is not divisible by patch " + std::to_string(patch));
  }
  return shape;
}

// Both directions take the same arguments; `to_tokens` says which buffer is read.
void permute_patches(bool to_tokens, std::uintptr_t source_ptr, const char* source_field,
                     std::uintptr_t destination_ptr, const char* destination_field, std::int64_t batch,
                     std::int64_t channels, std::int64_t height, std::int64_t width, std::int64_t patch,
                     int dtype_code, int device, std::uintptr_t stream) {
  const engine::PatchShape shape = checked_patch_shape(batch, channels, height, width, patch);
  const DType dtype = checked_dtype(dtype_code);
  const void* source = checked_pointer(source_ptr, source_field);
  void* destination = checked_pointer(destination_ptr, destination_field);
  checked_device(device);
  const std::int64_t elements = checked_elements({batch, channels, height, width}, "batch*channels*height*width");
  const std::int64_t bytes = checked_elements({elements, static_cast<std::int64_t>(engine::element_size(dtype))},
                                              "batch*channels*height*width*element_size");
  check_disjoint(source_ptr, destination_ptr, bytes, destination_field);

  py::gil_scoped_release release_gil;
  if (device == -1) {
    if (to_tokens) {
      engine::patchify_cpu(source, destination, shape, dtype);
    } else {
      engine::unpatchify_cpu(source, destination, shape, dtype);
    }
    return;
  }
#ifdef ENGINE_WITH_CUDA
  void* cuda_stream = reinterpret_cast<void*>(stream);
  if (to_tokens) {
    engine::patchify_cuda(source, destination, shape, dtype, device, cuda_stream);
  } else {
    engine::unpatchify_cuda(source, destination, shape, dtype, device, cuda_stream);
  }
#else
  (void)stream;
  throw std::runtime_error(std::string(to_tokens ? "patchify" : "unpatchify") +
                           ": engine._C was built without CUDA, so it has no kernels for device pointers (device >= 0)");
#endif
}

void patchify(std::uintptr_t image_ptr, std::uintptr_t tokens_ptr, std::int64_t batch, std::int64_t channels,
              std::int64_t height, std::int64_t width, std::int64_t patch, int dtype, int device,
              std::uintptr_t stream) {
  permute_patches(true, image_ptr, "image_ptr", tokens_ptr, "tokens_ptr", batch, channels, height, width,
                  patch, dtype, device, stream);
}

void unpatchify(std::uintptr_t tokens_ptr, std::uintptr_t image_ptr, std::int64_t batch, std::int64_t channels,
                std::int64_t height, std::int64_t width, std::int64_t patch, int dtype, int device,
                std::uintptr_t stream) {
  permute_patches(false, tokens_ptr, "tokens_ptr", image_ptr, "image_ptr", batch, channels, height,
                  width, patch, dtype, device, stream);
}

// ---------------------------------------------------------------------------------------
// norm_modulate / add_norm_modulate

void check_absent(std::uintptr_t address, const char* field, const char* why) {
  if (address != 0) throw py::value_error(std::string(field) + ": must be 0 (absent) " + why);
}

void* checked_pointer_when(std::uintptr_t address, const char* field, const char* why) {
  if (address == 0) throw py::value_error(std::string(field) + ": null pointer; " + why);
  return reinterpret_cast<void*>(address);
}

// A buffer a kernel reads or writes; address 0 = absent.
struct Buffer {
  std::uintptr_t address;
  std::int64_t bytes;
  const char* field;
};

bool overlaps(const Buffer& a, const Buffer& b) {
  return a.address != 0 && b.address != 0 && a.address < b.address + static_cast<std::uintptr_t>(b.bytes) &&
         b.address < a.address + static_cast<std::uintptr_t>(a.bytes);
}

// The kernels read their inputs while writing their outputs: every output must share no byte
// with an input or with another output.
void check_outputs_disjoint(std::initializer_list<Buffer> inputs, std::initializer_list<Buffer> outputs) {
  for (auto output = outputs.begin(); output != outputs.end(); ++output) {
    for (const Buffer& input : inputs) {
      if (overlaps(*output, input)) {
        throw py::value_error(std::string(output->field) + ": output buffer overlaps input " + input.field);
      }
    }
    for (auto other = std::next(output); other != outputs.end(); ++other) {
      if (overlaps(*output, *other)) {
        throw py::value_error(std::string(other->field) + ": output buffer overlaps output " + output->field);
      }
    }
  }
}

// Shape, dtype and device of one call, with the byte sizes of its three kinds of buffers.
struct NormModulateCall {
  engine::NormModulateShape shape;
  DType dtype;
  std::int64_t activation_bytes;  // (B, N, D) of dtype
  std::int64_t modulation_bytes;  // (B, D) fp32
  std::int64_t row_stat_bytes;    // (B, N) fp32
};

NormModulateCall checked_norm_modulate_call(std::int64_t batch, std::int64_t tokens, std::int64_t dim,
                                            int dtype_code, int device) {
  const engine::NormModulateShape shape{checked_positive(batch, "B"), checked_positive(tokens, "N"),
                                        checked_positive(dim, "D")};
  const DType dtype = checked_dtype(dtype_code);
  checked_device(device);
  if (device >= 0 && dtype == DType::Float64) {
    throw py::value_error("dtype: float64 (3) runs only on host pointers (device -1); "
                          "the CUDA kernels take float32, float16 or bfloat16");
  }
  if (device >= 0 && dim > engine::kNormModulateMaxCudaDim) {
    throw py::value_error("D: " + std::to_string(dim) + " exceeds the CUDA kernels' limit of " +
                          std::to_string(engine::kNormModulateMaxCudaDim) + " (a row is held in registers)");
  }
  const std::int64_t elements = checked_elements({batch, tokens, dim}, "B*N*D");
  return {shape, dtype,
          checked_elements({elements, static_cast<std::int64_t>(engine::element_size(dtype))}, "B*N*D*element_size"),
          checked_elements({batch, dim, 4}, "B*D*4"), checked_elements({batch, tokens, 4}, "B*N*4")};
}

std::int64_t norm_modulate_bwd_workspace(std::int64_t batch, std::int64_t tokens, std::int64_t dim) {
  checked_positive(batch, "B");
  checked_positive(tokens, "N");
  checked_positive(dim, "D");
  return checked_elements({batch, engine::norm_modulate_max_chunks(tokens), 3, dim}, "workspace elements");
}

void norm_modulate_fwd(std::uintptr_t x, std::uintptr_t y, std::uintptr_t gate, std::uintptr_t shift,
                       std::uintptr_t scale, std::uintptr_t r_out, std::uintptr_t h_out, std::uintptr_t mean_out,
                       std::uintptr_t rstd_out, std::int64_t batch, std::int64_t tokens, std::int64_t dim,
                       int dtype, int device, std::uintptr_t stream) {
  const NormModulateCall call = checked_norm_modulate_call(batch, tokens, dim, dtype, device);
  engine::NormModulateForward io{};
  io.x = checked_pointer(x, "x");
  io.shift = static_cast<const float*>(checked_pointer(shift, "shift"));
  io.scale = static_cast<const float*>(checked_pointer(scale, "scale"));
  io.h = checked_pointer(h_out, "h_out");
  io.mean = static_cast<float*>(checked_pointer(mean_out, "mean_out"));
  io.rstd = static_cast<float*>(checked_pointer(rstd_out, "rstd_out"));
  if (y != 0) {
    io.y = reinterpret_cast<const void*>(y);
    io.r = checked_pointer_when(r_out, "r_out", "with y given (add_norm_modulate) the residual r is written there");
    io.gate = reinterpret_cast<const float*>(gate);
  } else {
    check_absent(r_out, "r_out", "without y: plain norm_modulate writes no residual");
    check_absent(gate, "gate", "without y: the gate scales y");
  }
  const std::int64_t act = call.activation_bytes, mod = call.modulation_bytes, stat = call.row_stat_bytes;
  check_outputs_disjoint({{x, act, "x"}, {y, act, "y"}, {gate, mod, "gate"}, {shift, mod, "shift"}, {scale, mod, "scale"}},
                         {{r_out, act, "r_out"}, {h_out, act, "h_out"}, {mean_out, stat, "mean_out"},
                          {rstd_out, stat, "rstd_out"}});

  py::gil_scoped_release release_gil;
  if (device == -1) {
    engine::norm_modulate_fwd_cpu(io, call.shape, call.dtype);
    return;
  }
#ifdef ENGINE_WITH_CUDA
  engine::norm_modulate_fwd_cuda(io, call.shape, call.dtype, device, reinterpret_cast<void*>(stream));
#else
  (void)stream;
  throw std::runtime_error("norm_modulate_fwd: engine._C was built without CUDA, so it has no kernels for device pointers (device >= 0)");
#endif
}

void norm_modulate_bwd(std::uintptr_t dh, std::uintptr_t dr, std::uintptr_t r, std::uintptr_t y, std::uintptr_t gate,
                       std::uintptr_t scale, std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t dx_out,
                       std::uintptr_t dy_out, std::uintptr_t dgate_out, std::uintptr_t dshift_out,
                       std::uintptr_t dscale_out, std::uintptr_t workspace, std::int64_t batch, std::int64_t tokens,
                       std::int64_t dim, int dtype, int device, std::uintptr_t stream) {
  const NormModulateCall call = checked_norm_modulate_call(batch, tokens, dim, dtype, device);
  engine::NormModulateBackward io{};
  io.dh = checked_pointer(dh, "dh");
  io.dr = reinterpret_cast<const void*>(dr);
  io.r = checked_pointer(r, "r");
  io.scale = static_cast<const float*>(checked_pointer(scale, "scale"));
  io.mean = static_cast<const float*>(checked_pointer(mean, "mean"));
  io.rstd = static_cast<const float*>(checked_pointer(rstd, "rstd"));
  io.dx = checked_pointer(dx_out, "dx_out");
  io.dshift = static_cast<float*>(checked_pointer(dshift_out, "dshift_out"));
  io.dscale = static_cast<float*>(checked_pointer(dscale_out, "dscale_out"));
  io.workspace = static_cast<float*>(checked_pointer(workspace, "workspace"));
  if (gate != 0) {
    io.gate = reinterpret_cast<const float*>(gate);
    io.y = checked_pointer_when(y, "y", "with gate given, d_gate = sum_N dr_total * y reads y");
    io.dy = checked_pointer_when(dy_out, "dy_out", "with gate given, dy = dr_total * gate is written there");
    io.dgate = static_cast<float*>(checked_pointer_when(dgate_out, "dgate_out", "with gate given, d_gate is written there"));
  } else {
    check_absent(y, "y", "without gate: only d_gate reads y");
    check_absent(dy_out, "dy_out", "without gate: ungated, dy equals dx");
    check_absent(dgate_out, "dgate_out", "without gate: there is no d_gate");
  }
  const std::int64_t act = call.activation_bytes, mod = call.modulation_bytes, stat = call.row_stat_bytes;
  const std::int64_t workspace_bytes = checked_elements({norm_modulate_bwd_workspace(batch, tokens, dim), 4}, "workspace bytes");
  check_outputs_disjoint({{dh, act, "dh"}, {dr, act, "dr"}, {r, act, "r"}, {y, act, "y"}, {gate, mod, "gate"},
                          {scale, mod, "scale"}, {mean, stat, "mean"}, {rstd, stat, "rstd"}},
                         {{dx_out, act, "dx_out"}, {dy_out, act, "dy_out"}, {dgate_out, mod, "dgate_out"},
                          {dshift_out, mod, "dshift_out"}, {dscale_out, mod, "dscale_out"},
                          {workspace, workspace_bytes, "workspace"}});

  py::gil_scoped_release release_gil;
  if (device == -1) {
    engine::norm_modulate_bwd_cpu(io, call.shape, call.dtype);
    return;
  }
#ifdef ENGINE_WITH_CUDA
  engine::norm_modulate_bwd_cuda(io, call.shape, call.dtype, device, reinterpret_cast<void*>(stream));
#else
  (void)stream;
  throw std::runtime_error("norm_modulate_bwd: engine._C was built without CUDA, so it has no kernels for device pointers (device >= 0)");
#endif
}

// ---------------------------------------------------------------------------------------
// gemm_epilogue

int gemm_epilogue(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, std::uintptr_t a_ptr,
                  std::int64_t lda, std::uintptr_t b_ptr, std::int64_t ldb, std::uintptr_t d_ptr, std::int64_t ldd,
                  int epilogue, std::uintptr_t bias_ptr, std::uintptr_t aux_ptr, std::int64_t ld_aux, int ab_dtype,
                  int d_dtype, int bias_dtype, std::uintptr_t workspace_ptr, std::int64_t workspace_bytes, int device,
                  std::uintptr_t stream, int algo, std::uintptr_t c_ptr) {
  if (!engine::is_gemm_epilogue_code(epilogue)) {
    throw py::value_error("epilogue: unknown code " + std::to_string(epilogue) +
                          "; expected 0 (none), 1 (bias), 2 (gelu_aux_bias) or 3 (dgelu)");
  }
  engine::GemmCall call{};
  call.trans_a = trans_a;
  call.trans_b = trans_b;
  call.m = checked_positive(m, "m");
  call.n = checked_positive(n, "n");
  call.k = checked_positive(k, "k");
  // Leading dimensions: at least the rows of each column-major operand as stored.
  auto checked_ld = [](std::int64_t ld, std::int64_t rows, const char* field) {
    if (ld < rows) {
      throw py::value_error(std::string(field) + ": " + std::to_string(ld) + " is below the " +
                            std::to_string(rows) + " rows of the column-major operand");
    }
    return ld;
  };
  call.lda = checked_ld(lda, trans_a ? k : m, "lda");
  call.ldb = checked_ld(ldb, trans_b ? n : k, "ldb");
  call.ldd = checked_ld(ldd, m, "ldd");
  call.a = checked_pointer(a_ptr, "a");
  call.b = checked_pointer(b_ptr, "b");
  call.d = checked_pointer(d_ptr, "d");
  call.c = reinterpret_cast<const void*>(c_ptr);
  call.ab_dtype = checked_dtype(ab_dtype);
  call.d_dtype = checked_dtype(d_dtype);
  call.bias_dtype = checked_dtype(bias_dtype);
  call.epilogue = static_cast<engine::GemmEpilogue>(epilogue);
  const bool with_aux = call.epilogue == engine::GemmEpilogue::GeluAuxBias ||
                        call.epilogue == engine::GemmEpilogue::DGelu;
  const bool with_bias = call.epilogue == engine::GemmEpilogue::Bias ||
                         call.epilogue == engine::GemmEpilogue::GeluAuxBias;
  if (with_bias) {
    call.bias = checked_pointer_when(bias_ptr, "bias", "bias and gelu_aux_bias add a bias vector");
  } else {
    check_absent(bias_ptr, "bias", "for this epilogue");
  }
  if (with_aux) {
    call.aux = checked_pointer_when(aux_ptr, "aux", "gelu_aux_bias writes the GELU input there, dgelu reads it");
    call.ld_aux = checked_ld(ld_aux, m, "ld_aux");
  } else {
    check_absent(aux_ptr, "aux", "for this epilogue");
  }
  checked_device(device);
  if (algo < 0) throw py::value_error("algo: " + std::to_string(algo) + " is negative (0 = cuBLASLt's first choice)");

  py::gil_scoped_release release_gil;
  if (device == -1) {
    if (algo != 0) {
      throw py::value_error("algo: the C++ reference has one algorithm (0), got " + std::to_string(algo));
    }
    engine::gemm_epilogue_cpu(call);
    return 1;
  }
#ifdef ENGINE_WITH_CUBLASLT
  return engine::gemm_epilogue_cuda(call, algo, reinterpret_cast<void*>(workspace_ptr), workspace_bytes, device,
                                    reinterpret_cast<void*>(stream));
#else
  (void)stream;
  (void)workspace_ptr;
  (void)workspace_bytes;
  throw std::runtime_error("gemm_epilogue: engine._C was built without cuBLASLt (see has_cublaslt()), so it has "
                           "no GPU path; rebuild with cuBLASLt found (ENGINE_CUBLAS_ROOT)");
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "engine kernels: CUDA on device pointers, C++ reference on host pointers (device=-1)";

  m.def("has_cuda", [] {
#ifdef ENGINE_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the module was compiled with nvcc and has CUDA kernels.");
  m.def("has_cublaslt", [] {
#ifdef ENGINE_WITH_CUBLASLT
    return true;
#else
    return false;
#endif
  }, "Whether gemm_epilogue has its cuBLASLt (GPU) path.");
  m.def("cuda_archs", [] { return std::string(ENGINE_CUDA_ARCHS); },
        "GPU architectures the CUDA kernels were compiled for, comma separated ('' without CUDA).");

  m.def("patchify", &patchify,
        "image (B, C, H, W) -> tokens (B, (H/p)*(W/p), C*p*p), both contiguous.",
        py::arg("image_ptr"), py::arg("tokens_ptr"), py::arg("batch"), py::arg("channels"), py::arg("height"),
        py::arg("width"), py::arg("patch"), py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("unpatchify", &unpatchify,
        "tokens (B, (H/p)*(W/p), C*p*p) -> image (B, C, H, W), both contiguous.",
        py::arg("tokens_ptr"), py::arg("image_ptr"), py::arg("batch"), py::arg("channels"), py::arg("height"),
        py::arg("width"), py::arg("patch"), py::arg("dtype"), py::arg("device"), py::arg("stream"));

  m.def("norm_modulate_fwd", &norm_modulate_fwd,
        "r = x + gate * y (when y != 0; gate 0 = 1), h = LayerNorm(r or x, eps 1e-6) * (1 + scale) + shift, "
        "with per-row fp32 mean and rstd. x, y, r_out, h_out: (B, N, D) of dtype; gate, shift, scale: (B, D) fp32; "
        "mean_out, rstd_out: (B, N) fp32; all contiguous, pointers as ints, 0 = absent.",
        py::arg("x"), py::arg("y"), py::arg("gate"), py::arg("shift"), py::arg("scale"), py::arg("r_out"),
        py::arg("h_out"), py::arg("mean_out"), py::arg("rstd_out"), py::arg("B"), py::arg("N"), py::arg("D"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("norm_modulate_bwd_workspace", &norm_modulate_bwd_workspace,
        "fp32 elements of the scratch buffer norm_modulate_bwd needs for (B, N, D).",
        py::arg("B"), py::arg("N"), py::arg("D"));
  m.def("norm_modulate_bwd", &norm_modulate_bwd,
        "Gradients of norm_modulate_fwd: dx = dr + dLN(dh) (dr 0 = absent), and with gate: dy = dx * gate and "
        "dgate_out = sum_N dx * y; dshift_out = sum_N dh, dscale_out = sum_N dh * xhat, all fp32 (B, D). "
        "r is the LayerNorm input (x for plain norm_modulate); y, dy_out, dgate_out are given exactly when gate is.",
        py::arg("dh"), py::arg("dr"), py::arg("r"), py::arg("y"), py::arg("gate"), py::arg("scale"), py::arg("mean"),
        py::arg("rstd"), py::arg("dx_out"), py::arg("dy_out"), py::arg("dgate_out"), py::arg("dshift_out"),
        py::arg("dscale_out"), py::arg("workspace"), py::arg("B"), py::arg("N"), py::arg("D"), py::arg("dtype"),
        py::arg("device"), py::arg("stream"));

  m.def("gemm_epilogue", &gemm_epilogue,
        "cuBLASLt's column-major D (m x n) = op(A) op(B) with one fused epilogue (csrc/common.h): 0 none, 1 bias, "
        "2 gelu_aux_bias (aux = pre-activation, D = GELU(acc + bias)), 3 dgelu (D = acc * GELU'(aux)); c: a matrix added to acc before the "
        "epilogue (D's dtype and ldd; 0 = none). Pointers as ints, 0 = absent; workspace: "
        "device bytes for cuBLASLt. "
        "algo picks one of cuBLASLt's candidate kernels for this call (0 = its heuristic's first choice); returns "
        "how many candidates there are (1 for the C++ reference).",
        py::arg("trans_a"), py::arg("trans_b"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("a"), py::arg("lda"),
        py::arg("b"), py::arg("ldb"), py::arg("d"), py::arg("ldd"), py::arg("epilogue"), py::arg("bias"),
        py::arg("aux"), py::arg("ld_aux"), py::arg("ab_dtype"), py::arg("d_dtype"), py::arg("bias_dtype"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("device"), py::arg("stream"), py::arg("algo") = 0, py::arg("c") = 0);
}
