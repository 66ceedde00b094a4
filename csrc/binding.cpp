// The Python face of engine._C. Each function checks its inputs (ValueError naming the
// argument) and hands them to the C++ reference launcher (device -1: host pointers) or the
// CUDA one (device >= 0). Pointers, shapes, dtype codes and streams arrive as Python ints.
#include <pybind11/pybind11.h>

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
}
