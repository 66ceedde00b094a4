// C++ reference of patchify / unpatchify: what engine._C runs on CPU pointers (device -1),
// so CI checks the binding and its dispatch without a GPU. Plain loops; a permutation
// moves values unchanged, so this is exact for every dtype.
#include "common.h"

namespace engine {
namespace {

// Walks the image in memory order; each element's token slot follows from its coordinates.
template <class T, bool kToTokens>
void permute_patches(const T* source, T* destination, const PatchShape& s) {
  const std::int64_t patches_per_row = s.width / s.patch;
  const std::int64_t n_tokens = (s.height / s.patch) * patches_per_row;
  const std::int64_t patch_dim = s.channels * s.patch * s.patch;
  std::int64_t image_index = 0;
  for (std::int64_t b = 0; b < s.batch; ++b) {
    for (std::int64_t c = 0; c < s.channels; ++c) {
      for (std::int64_t y = 0; y < s.height; ++y) {
        for (std::int64_t x = 0; x < s.width; ++x, ++image_index) {
          const std::int64_t token = (y / s.patch) * patches_per_row + x / s.patch;
          const std::int64_t within = (c * s.patch + y % s.patch) * s.patch + x % s.patch;
          const std::int64_t token_index = (b * n_tokens + token) * patch_dim + within;
          if (kToTokens) {
            destination[token_index] = source[image_index];
          } else {
            destination[image_index] = source[token_index];
          }
        }
      }
    }
  }
}

}  // namespace

void patchify_cpu(const void* image, void* tokens, const PatchShape& shape, DType dtype) {
  dispatch_host_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    permute_patches<T, true>(static_cast<const T*>(image), static_cast<T*>(tokens), shape);
  });
}

void unpatchify_cpu(const void* tokens, void* image, const PatchShape& shape, DType dtype) {
  dispatch_host_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    permute_patches<T, false>(static_cast<const T*>(tokens), static_cast<T*>(image), shape);
  });
}

}  // namespace engine
