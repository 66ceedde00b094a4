// CUDA patchify / unpatchify. Both kernels write their output contiguously across a warp and
// gather their input in runs of p elements (stores that cover whole sectors matter more than
// loads, which L2 shares between neighbouring warps), and both decode indices once per thread
// rather than per element: a first version decoding every element with 64-bit div/mod ran at
// a quarter of eager's speed on an H200, bound by those divisions.
#include <algorithm>
#include <limits>

#include "common.h"

namespace engine {
namespace {

constexpr int kThreads = 256;
constexpr std::int64_t kMaxBlocks = 1 << 20;  // grid-stride loops cover the rest

// patchify: one block per patch row (b, r) at a time. threadIdx.x walks the patch vector k
// (decoded into channel c, patch row i, patch column j once), threadIdx.y the row's tokens q,
// so consecutive threads write consecutive token elements.
template <class T, class Index>
__global__ void patchify_kernel(const T* __restrict__ image, T* __restrict__ tokens, PatchShape s) {
  const Index channels = s.channels, height = s.height, width = s.width, patch = s.patch;
  const Index patch_rows = height / patch;
  const Index patches_per_row = width / patch;
  const Index patch_dim = channels * patch * patch;
  const Index sample_rows = static_cast<Index>(s.batch) * patch_rows;
  for (Index sample_row = blockIdx.x; sample_row < sample_rows; sample_row += gridDim.x) {
    const Index b = sample_row / patch_rows;
    const Index r = sample_row % patch_rows;
    for (Index k = threadIdx.x; k < patch_dim; k += blockDim.x) {
      const Index c = k / (patch * patch);
      const Index i = (k / patch) % patch;
      const Index j = k % patch;
      // image (b, c, r*p + i, q*p + j) and token (b, r*Wp + q) entry k, both linear in q.
      Index image_index = ((b * channels + c) * height + r * patch + i) * width + threadIdx.y * patch + j;
      Index token_index = (sample_row * patches_per_row + threadIdx.y) * patch_dim + k;
      for (Index q = threadIdx.y; q < patches_per_row; q += blockDim.y) {
        tokens[token_index] = image[image_index];
        image_index += blockDim.y * patch;
        token_index += blockDim.y * patch_dim;
      }
    }
  }
}

// unpatchify: one thread per (sample, patch row, image column x) at a time, moving the C*p
// values of that column inside the patch row; for each (c, i) a warp writes consecutive x.
template <class T, class Index>
__global__ void unpatchify_kernel(const T* __restrict__ tokens, T* __restrict__ image, PatchShape s) {
  const Index channels = s.channels, height = s.height, width = s.width, patch = s.patch;
  const Index patch_rows = height / patch;
  const Index patches_per_row = width / patch;
  const Index patch_dim = channels * patch * patch;
  const Index columns = static_cast<Index>(s.batch) * patch_rows * width;
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index column = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; column < columns; column += stride) {
    const Index x = column % width;
    const Index sample_row = column / width;  // b * patch_rows + r
    const Index b = sample_row / patch_rows;
    const Index r = sample_row % patch_rows;
    // Offsets of the (c = 0, i = 0) value: image (b, 0, r*p, x), token (b, r*Wp + x/p) entry x%p.
    const Index image_base = (b * channels * height + r * patch) * width + x;
    const Index token_base = (sample_row * patches_per_row + x / patch) * patch_dim + x % patch;
    for (Index c = 0; c < channels; ++c) {
      for (Index i = 0; i < patch; ++i) {
        image[image_base + (c * height + i) * width] = tokens[token_base + (c * patch + i) * patch];
      }
    }
  }
}

// 32-bit indices when every offset (and offset + grid stride) fits: 32-bit division is
// several times cheaper than 64-bit.
bool fits_32_bit(const PatchShape& s) {
  return s.batch * s.channels * s.height * s.width <= std::numeric_limits<std::int32_t>::max();
}

}  // namespace

void patchify_cuda(const void* image, void* tokens, const PatchShape& shape, DType dtype, int device, void* stream) {
  CudaDeviceScope scope(device, "patchify");
  // threadIdx.x over the patch vector (up to kThreads wide), threadIdx.y over a row's tokens.
  const std::int64_t patch_dim = shape.channels * shape.patch * shape.patch;
  const int threads_x = static_cast<int>(std::min<std::int64_t>(patch_dim, kThreads));
  const int threads_y = static_cast<int>(std::max<std::int64_t>(1, std::min<std::int64_t>(kThreads / threads_x, shape.width / shape.patch)));
  const dim3 block(threads_x, threads_y);
  const auto blocks = static_cast<unsigned int>(std::min(shape.batch * (shape.height / shape.patch), kMaxBlocks));
  dispatch_cuda_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto* in = static_cast<const T*>(image);
    auto* out = static_cast<T*>(tokens);
    auto cuda_stream = static_cast<cudaStream_t>(stream);
    if (fits_32_bit(shape)) {
      patchify_kernel<T, std::uint32_t><<<blocks, block, 0, cuda_stream>>>(in, out, shape);
    } else {
      patchify_kernel<T, std::int64_t><<<blocks, block, 0, cuda_stream>>>(in, out, shape);
    }
  });
  ENGINE_CUDA_CHECK("patchify", cudaGetLastError());
}

void unpatchify_cuda(const void* tokens, void* image, const PatchShape& shape, DType dtype, int device, void* stream) {
  CudaDeviceScope scope(device, "unpatchify");
  const std::int64_t columns = shape.batch * (shape.height / shape.patch) * shape.width;
  const auto blocks = static_cast<unsigned int>(std::min((columns + kThreads - 1) / kThreads, kMaxBlocks));
  dispatch_cuda_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto* in = static_cast<const T*>(tokens);
    auto* out = static_cast<T*>(image);
    auto cuda_stream = static_cast<cudaStream_t>(stream);
    if (fits_32_bit(shape)) {
      unpatchify_kernel<T, std::uint32_t><<<blocks, kThreads, 0, cuda_stream>>>(in, out, shape);
    } else {
      unpatchify_kernel<T, std::int64_t><<<blocks, kThreads, 0, cuda_stream>>>(in, out, shape);
    }
  });
  ENGINE_CUDA_CHECK("unpatchify", cudaGetLastError());
}

}  // namespace engine
