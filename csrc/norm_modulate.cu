// CUDA kernels of norm_modulate / add_norm_modulate (math in csrc/common.h and
// engine/ops/norm_modulate.py). Both ops are bandwidth-bound (a few flops per byte), so the
// design goal is to move every activation byte exactly once, in wide coalesced accesses:
//
// - A block owns a chunk of consecutive rows of ONE sample, so it reads the sample's
//   modulation once, and the backward sums d_shift / d_scale / d_gate over its rows in
//   registers. Every thread owns the same columns in every row: NV packs of VEC consecutive
//   elements, pack k of thread t at element (k * blockDim.x + t) * VEC, so each load or store
//   instruction of a warp covers one contiguous span of the row.
// - The whole row lives in the block's registers: the statistics are exact two-pass sums,
//   and the next row's loads are issued before the current row's reductions (in the backward:
//   dh and r; dr and y once this row is done with them), so a row's memory latency overlaps
//   the previous row's arithmetic and barriers.
// - The grid is one wave: as many chunks per sample as fill every SM's resident-block slots
//   once, so no SM idles through a half-empty last wave.
// - The backward writes one partial row per block into a (B, chunks, 3, D) fp32 workspace;
//   a small second kernel sums the chunks of each sample (deterministic, no atomics).
#include <algorithm>
#include <tuple>
#include <type_traits>
#include <utility>

#include "common.h"

namespace engine {
namespace {

// Upper bound on a block's threads; __launch_bounds__ then leaves up to 128 registers a thread.
constexpr int kMaxThreads = 512;
constexpr int kWarp = 32;
constexpr float kEps = static_cast<float>(kNormModulateEps);

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// VEC consecutive elements moved by one load / store instruction (8 bytes for 16-bit types
// and VEC = 4, 16 bytes for fp32).
template <class E, int VEC>
struct alignas(sizeof(E) * VEC) Pack {
  E v[VEC];
};

template <class E, int VEC>
__device__ __forceinline__ Pack<E, VEC> load_pack(const E* address) {
  return *reinterpret_cast<const Pack<E, VEC>*>(address);
}

template <class E, int VEC>
__device__ __forceinline__ void store_pack(E* address, const Pack<E, VEC>& pack) {
  *reinterpret_cast<Pack<E, VEC>*>(address) = pack;
}

// Sums each of K per-thread values over the block; every thread gets the same totals.
// `scratch` (2 * K * kWarp floats) holds two sets of per-warp slots used alternately, so one
// barrier per reduction suffices: a set is rewritten two reductions later, and every thread
// finished reading it before arriving at the barrier of the reduction in between.
template <int K>
__device__ __forceinline__ void block_sum(float (&values)[K], float* scratch, int& parity) {
#pragma unroll
  for (int i = 0; i < K; ++i) {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      values[i] += __shfl_xor_sync(0xffffffffu, values[i], offset);  // butterfly: all lanes agree
    }
  }
  const int warps = blockDim.x / kWarp;
  if (warps == 1) return;
  float* slots = scratch + parity * K * kWarp;
  parity ^= 1;
  if (threadIdx.x % kWarp == 0) {
#pragma unroll
    for (int i = 0; i < K; ++i) slots[i * kWarp + threadIdx.x / kWarp] = values[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < K; ++i) {
    float total = 0.0f;
    for (int w = 0; w < warps; ++w) total += slots[i * kWarp + w];
    values[i] = total;
  }
}

// This thread's packs of a row: their first element's column, and whether the pack is in the row.
template <int VEC, int NV>
struct RowSlice {
  int column[NV];
  bool valid[NV];

  __device__ __forceinline__ explicit RowSlice(int dim) {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int pack = k * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x);
      column[k] = pack * VEC;
      valid[k] = pack < dim / VEC;
    }
  }

  // Copies this thread's columns of a (D,) fp32 modulation row into shared memory. Each
  // thread later reads back only the columns it wrote, so no barrier is needed.
  __device__ __forceinline__ void stage(const float* row, float* shared) const {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      if (valid[k]) store_pack(shared + column[k], load_pack<float, VEC>(row + column[k]));
    }
  }

  // Loads this thread's packs of the row at `row`; packs outside the row read as zero.
  template <class E>
  __device__ __forceinline__ void load(const E* row, Pack<E, VEC> (&packs)[NV]) const {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      if (valid[k]) {
        packs[k] = load_pack<E, VEC>(row + column[k]);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) packs[k].v[j] = E(0.0f);
      }
    }
  }
};

// Block b of the grid: sample b / chunks, rows [first, end) of that sample.
struct ChunkRows {
  std::int64_t sample, first, end;
};

__device__ __forceinline__ ChunkRows chunk_rows(std::int64_t tokens, std::int64_t rows_per_chunk,
                                                std::int64_t chunks) {
  const std::int64_t sample = blockIdx.x / chunks;
  const std::int64_t first = (blockIdx.x % chunks) * rows_per_chunk;
  const std::int64_t end = first + rows_per_chunk < tokens ? first + rows_per_chunk : tokens;
  return {sample, first, end};
}

template <class T>
struct ForwardParams {
  const T* x;
  const T* y;
  const float* gate;
  const float* shift;
  const float* scale;
  T* r;
  T* h;
  float* mean;
  float* rstd;
  std::int64_t tokens, rows_per_chunk, chunks;
  int dim;
};

template <class T, int VEC, int NV>
__global__ void __launch_bounds__(kMaxThreads) norm_modulate_fwd_kernel(ForwardParams<T> p) {
  using TPack = Pack<T, VEC>;
  using FPack = Pack<float, VEC>;
  __shared__ float scratch[2 * kWarp];
  extern __shared__ float4 modulation_storage[];  // float4: 16-byte aligned for the packs
  const ChunkRows chunk = chunk_rows(p.tokens, p.rows_per_chunk, p.chunks);
  const RowSlice<VEC, NV> slice(p.dim);
  const bool has_y = p.y != nullptr;
  const bool has_gate = p.gate != nullptr;

  // The sample's modulation (shift, scale, gate), read once for the whole chunk and kept in
  // shared memory: in registers it would cost 3 * NV * VEC of them, and occupancy.
  float* shift = reinterpret_cast<float*>(modulation_storage);  // (D,)
  float* scale = shift + p.dim;
  float* gate = scale + p.dim;
  slice.stage(p.shift + chunk.sample * p.dim, shift);
  slice.stage(p.scale + chunk.sample * p.dim, scale);
  if (has_gate) slice.stage(p.gate + chunk.sample * p.dim, gate);

  TPack x_next[NV] = {}, y_next[NV] = {};
  std::int64_t offset = (chunk.sample * p.tokens + chunk.first) * p.dim;  // start of the current row
  slice.load(p.x + offset, x_next);
  if (has_y) slice.load(p.y + offset, y_next);
  int parity = 0;
  for (std::int64_t row = chunk.first; row < chunk.end; ++row, offset += p.dim) {
    float r[NV][VEC];  // the LN input, as stored
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      TPack stored;
      const FPack gate_k = has_gate && slice.valid[k] ? load_pack<float, VEC>(gate + slice.column[k]) : FPack{};
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        r[k][j] = to_float(x_next[k].v[j]);
        if (has_y) {
          // r = x + gate * y is rounded to the activation dtype, and h normalises r as stored:
          // the backward re-reads the stored r and must see the values the statistics saw.
          const float update = to_float(y_next[k].v[j]);
          stored.v[j] = from_float<T>(r[k][j] + (has_gate ? gate_k.v[j] * update : update));
          r[k][j] = to_float(stored.v[j]);
        }
      }
      if (has_y && slice.valid[k]) store_pack(p.r + offset + slice.column[k], stored);
    }
    if (row + 1 < chunk.end) {  // next row's loads in flight during this row's reductions
      slice.load(p.x + offset + p.dim, x_next);
      if (has_y) slice.load(p.y + offset + p.dim, y_next);
    }

    float sum[1] = {0.0f};
#pragma unroll
    for (int k = 0; k < NV; ++k) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum[0] += slice.valid[k] ? r[k][j] : 0.0f;
    }
    block_sum(sum, scratch, parity);
    const float mean = sum[0] / static_cast<float>(p.dim);
    float squares[1] = {0.0f};
#pragma unroll
    for (int k = 0; k < NV; ++k) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float centred = r[k][j] - mean;
        squares[0] += slice.valid[k] ? centred * centred : 0.0f;
      }
    }
    block_sum(squares, scratch, parity);
    const float rstd = rsqrtf(squares[0] / static_cast<float>(p.dim) + kEps);

#pragma unroll
    for (int k = 0; k < NV; ++k) {
      if (!slice.valid[k]) continue;
      const FPack shift_k = load_pack<float, VEC>(shift + slice.column[k]);
      const FPack scale_k = load_pack<float, VEC>(scale + slice.column[k]);
      TPack h;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        h.v[j] = from_float<T>((r[k][j] - mean) * rstd * (1.0f + scale_k.v[j]) + shift_k.v[j]);
      }
      store_pack(p.h + offset + slice.column[k], h);
    }
    if (threadIdx.x == 0) {
      p.mean[chunk.sample * p.tokens + row] = mean;
      p.rstd[chunk.sample * p.tokens + row] = rstd;
    }
  }
}

template <class T>
struct BackwardParams {
  const T* dh;
  const T* dr;
  const T* r;
  const T* y;
  const float* gate;
  const float* scale;
  const float* mean;
  const float* rstd;
  T* dx;
  T* dy;
  float* partials;  // (B, chunks, 3, D): d_shift, d_scale, d_gate sums of each chunk
  std::int64_t tokens, rows_per_chunk, chunks;
  int dim;
};

template <class T, int VEC, int NV>
__global__ void __launch_bounds__(kMaxThreads) norm_modulate_bwd_kernel(BackwardParams<T> p) {
  using TPack = Pack<T, VEC>;
  using FPack = Pack<float, VEC>;
  __shared__ float scratch[2 * 2 * kWarp];
  extern __shared__ float4 modulation_storage[];  // float4: 16-byte aligned for the packs
  const ChunkRows chunk = chunk_rows(p.tokens, p.rows_per_chunk, p.chunks);
  const RowSlice<VEC, NV> slice(p.dim);
  const bool has_dr = p.dr != nullptr;
  const bool has_gate = p.gate != nullptr;

  // The sample's scale and gate in shared memory, as in the forward: the registers go to the
  // three per-column sums below.
  float* scale = reinterpret_cast<float*>(modulation_storage);  // (D,)
  float* gate = scale + p.dim;
  slice.stage(p.scale + chunk.sample * p.dim, scale);
  if (has_gate) slice.stage(p.gate + chunk.sample * p.dim, gate);
  float dshift[NV][VEC] = {}, dscale[NV][VEC] = {}, dgate[NV][VEC] = {};  // this chunk's sums over rows

  TPack dh_next[NV] = {}, r_next[NV] = {}, dr_next[NV] = {}, y_next[NV] = {};
  std::int64_t row_index = chunk.sample * p.tokens + chunk.first;  // flat (b, n) of the current row
  float mean_next = p.mean[row_index], rstd_next = p.rstd[row_index];
  slice.load(p.dh + row_index * p.dim, dh_next);
  slice.load(p.r + row_index * p.dim, r_next);
  if (has_dr) slice.load(p.dr + row_index * p.dim, dr_next);
  if (has_gate) slice.load(p.y + row_index * p.dim, y_next);
  int parity = 0;
  for (std::int64_t row = chunk.first; row < chunk.end; ++row, ++row_index) {
    const std::int64_t offset = row_index * p.dim;
    const float mean = mean_next, rstd = rstd_next;
    float xhat[NV][VEC], g[NV][VEC];
    float sums[2] = {0.0f, 0.0f};  // sum_D g, sum_D g * xhat
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const FPack scale_k = slice.valid[k] ? load_pack<float, VEC>(scale + slice.column[k]) : FPack{};
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float grad_h = to_float(dh_next[k].v[j]);
        xhat[k][j] = (to_float(r_next[k].v[j]) - mean) * rstd;
        g[k][j] = grad_h * (1.0f + scale_k.v[j]);
        dshift[k][j] += grad_h;
        dscale[k][j] += grad_h * xhat[k][j];
        // Packs outside the row loaded as zero, so they add nothing here.
        sums[0] += g[k][j];
        sums[1] += g[k][j] * xhat[k][j];
      }
    }
    const bool more_rows = row + 1 < chunk.end;
    if (more_rows) {  // next row's dh and r in flight during this row's reduction
      mean_next = p.mean[row_index + 1];
      rstd_next = p.rstd[row_index + 1];
      slice.load(p.dh + offset + p.dim, dh_next);
      slice.load(p.r + offset + p.dim, r_next);
    }

    block_sum(sums, scratch, parity);
    const float g_mean = sums[0] / static_cast<float>(p.dim);
    const float g_xhat_mean = sums[1] / static_cast<float>(p.dim);
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      if (!slice.valid[k]) continue;
      const FPack gate_k = has_gate ? load_pack<float, VEC>(gate + slice.column[k]) : FPack{};
      TPack dx, dy;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float total = rstd * (g[k][j] - g_mean - xhat[k][j] * g_xhat_mean);  // dr_total
        if (has_dr) total += to_float(dr_next[k].v[j]);
        dx.v[j] = from_float<T>(total);
        if (has_gate) {
          dy.v[j] = from_float<T>(total * gate_k.v[j]);
          dgate[k][j] += total * to_float(y_next[k].v[j]);
        }
      }
      store_pack(p.dx + offset + slice.column[k], dx);
      if (has_gate) store_pack(p.dy + offset + slice.column[k], dy);
    }
    // dr and y are read only after the reduction, so their next-row loads go out once this
    // row is done with them (holding two rows of them would cost registers).
    if (more_rows) {
      if (has_dr) slice.load(p.dr + offset + p.dim, dr_next);
      if (has_gate) slice.load(p.y + offset + p.dim, y_next);
    }
  }

  float* partial = p.partials + (chunk.sample * p.chunks + blockIdx.x % p.chunks) * 3 * p.dim;  // (3, D)
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    if (!slice.valid[k]) continue;
    FPack shift_sum, scale_sum, gate_sum;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      shift_sum.v[j] = dshift[k][j];
      scale_sum.v[j] = dscale[k][j];
      gate_sum.v[j] = dgate[k][j];
    }
    store_pack(partial + slice.column[k], shift_sum);
    store_pack(partial + p.dim + slice.column[k], scale_sum);
    if (has_gate) store_pack(partial + 2 * p.dim + slice.column[k], gate_sum);
  }
}

// d_shift, d_scale (and d_gate) of each sample: sums over its chunks' partial rows. One
// thread per (sample, column); consecutive threads read consecutive columns.
__global__ void norm_modulate_reduce_kernel(const float* __restrict__ partials, float* __restrict__ dshift,
                                            float* __restrict__ dscale, float* __restrict__ dgate,
                                            std::int64_t column_blocks, std::int64_t chunks, int dim) {
  const std::int64_t sample = blockIdx.x / column_blocks;
  const int column = static_cast<int>(blockIdx.x % column_blocks) * blockDim.x + threadIdx.x;
  if (column >= dim) return;
  float shift_sum = 0.0f, scale_sum = 0.0f, gate_sum = 0.0f;
  const float* partial = partials + sample * chunks * 3 * dim + column;
  for (std::int64_t c = 0; c < chunks; ++c, partial += 3 * dim) {
    shift_sum += partial[0];
    scale_sum += partial[dim];
    if (dgate != nullptr) gate_sum += partial[2 * dim];
  }
  dshift[sample * dim + column] = shift_sum;
  dscale[sample * dim + column] = scale_sum;
  if (dgate != nullptr) dgate[sample * dim + column] = gate_sum;
}

// ---------------------------------------------------------------------------------------
// Launch configuration.

template <int... NV>
struct PackCounts {};

// Row layouts compiled for each path: packs per thread, ties going to the earlier entry.
// Vector path (D % 4 == 0, aligned buffers): 3 packs of 4 first, which fits PixArt's D = 1152
// exactly in 96 threads and D = 768 in 64. The scalar path covers any other D.
using VectorLayouts = PackCounts<3, 2, 1>;
using ScalarLayouts = PackCounts<4, 8>;
constexpr int kVectorWidth = 4;

// Threads (whole warps) a row of `vectors` packs needs at `packs` packs a thread.
inline int threads_for(int vectors, int packs) {
  const int threads = (vectors + packs - 1) / packs;
  return (threads + kWarp - 1) / kWarp * kWarp;
}

// Calls launch(VEC, NV, threads) with the layout of PACKS that leaves the fewest idle element
// slots in a row of `dim` elements, among those within kMaxThreads.
template <int VEC, int... PACKS, class Launch>
void launch_with_layout(PackCounts<PACKS...>, int dim, const char* op, Launch&& launch) {
  const int vectors = dim / VEC;
  constexpr int packs[] = {PACKS...};
  int best = -1, best_idle = 0;
  for (int i = 0; i < static_cast<int>(sizeof...(PACKS)); ++i) {
    const int threads = threads_for(vectors, packs[i]);
    const int idle = threads * packs[i] - vectors;
    if (threads <= kMaxThreads && (best < 0 || idle < best_idle)) {
      best = i;
      best_idle = idle;
    }
  }
  if (best < 0) {
    throw std::invalid_argument(std::string(op) + ": D = " + std::to_string(dim) + " exceeds the CUDA kernels' limit of " +
                                std::to_string(kNormModulateMaxCudaDim));
  }
  int i = 0;
  ((i++ == best ? launch(std::integral_constant<int, VEC>{}, std::integral_constant<int, PACKS>{},
                         threads_for(vectors, PACKS))
                : void()),
   ...);
}

bool aligned(const void* address, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(address) % bytes == 0;
}

// Over 48 KB of dynamic shared memory (D = 4096: 3 x 4096 fp32 modulation values plus the
// kernel's static reduction buffers) needs an explicit opt-in, or the launch fails with
// "invalid argument" (seen on an H200, 2026-11-21).
template <class Kernel>
void allow_shared_memory(Kernel kernel, std::size_t shared_bytes, const char* op) {
  if (shared_bytes > 32 * 1024) {
    ENGINE_CUDA_CHECK(op, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(shared_bytes)));
  }
}

// Chunks per sample: enough blocks to fill every SM's resident-block slots once (one wave),
// capped by `max_chunks`. Returns {rows per chunk, chunks per sample}.
template <class Kernel>
std::pair<std::int64_t, std::int64_t> chunking(Kernel kernel, int threads, std::size_t shared_bytes, int device,
                                               const NormModulateShape& s, std::int64_t max_chunks, const char* op) {
  int sms = 0, blocks_per_sm = 0;
  ENGINE_CUDA_CHECK(op, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  ENGINE_CUDA_CHECK(op, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, threads, shared_bytes));
  const std::int64_t slots = static_cast<std::int64_t>(sms) * std::max(blocks_per_sm, 1);
  const std::int64_t chunks = std::clamp<std::int64_t>(slots / s.batch, 1, std::min(max_chunks, s.tokens));
  const std::int64_t rows_per_chunk = (s.tokens + chunks - 1) / chunks;
  return {rows_per_chunk, (s.tokens + rows_per_chunk - 1) / rows_per_chunk};
}

// Calls fn(TypeTag<T>{}) for the CUDA activation types (binding.cpp refuses fp64 on the GPU).
template <class Fn>
void dispatch_activation_type(DType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case DType::Float32: fn(TypeTag<float>{}); return;
    case DType::Float16: fn(TypeTag<__half>{}); return;
    case DType::BFloat16: fn(TypeTag<__nv_bfloat16>{}); return;
    case DType::Float64: break;
  }
  throw std::invalid_argument(std::string(op) + ": the CUDA kernels take float32, float16 or bfloat16 activations");
}

}  // namespace

void norm_modulate_fwd_cuda(const NormModulateForward& io, const NormModulateShape& shape, DType dtype, int device,
                            void* stream) {
  constexpr const char* op = "norm_modulate_fwd";
  CudaDeviceScope scope(device, op);
  dispatch_activation_type(dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    ForwardParams<T> p{static_cast<const T*>(io.x), static_cast<const T*>(io.y), io.gate, io.shift, io.scale,
                       static_cast<T*>(io.r), static_cast<T*>(io.h), io.mean, io.rstd,
                       shape.tokens, 0, 0, static_cast<int>(shape.dim)};
    auto launch = [&](auto vec, auto packs, int threads) {
      auto* kernel = norm_modulate_fwd_kernel<T, decltype(vec)::value, decltype(packs)::value>;
      const std::size_t shared_bytes = 3 * shape.dim * sizeof(float);  // shift, scale, gate
      allow_shared_memory(kernel, shared_bytes, op);
      std::tie(p.rows_per_chunk, p.chunks) = chunking(kernel, threads, shared_bytes, device, shape, shape.tokens, op);
      const auto blocks = static_cast<unsigned int>(shape.batch * p.chunks);
      kernel<<<blocks, threads, shared_bytes, static_cast<cudaStream_t>(stream)>>>(p);
    };
    const std::size_t pack_bytes = kVectorWidth * sizeof(T);
    const bool vector_ok = shape.dim % kVectorWidth == 0 && aligned(io.x, pack_bytes) && aligned(io.y, pack_bytes) &&
                           aligned(io.r, pack_bytes) && aligned(io.h, pack_bytes) && aligned(io.gate, 16) &&
                           aligned(io.shift, 16) && aligned(io.scale, 16);
    if (vector_ok) {
      launch_with_layout<kVectorWidth>(VectorLayouts{}, p.dim, op, launch);
    } else {
      launch_with_layout<1>(ScalarLayouts{}, p.dim, op, launch);
    }
  });
  ENGINE_CUDA_CHECK(op, cudaGetLastError());
}

void norm_modulate_bwd_cuda(const NormModulateBackward& io, const NormModulateShape& shape, DType dtype, int device,
                            void* stream) {
  constexpr const char* op = "norm_modulate_bwd";
  CudaDeviceScope scope(device, op);
  auto cuda_stream = static_cast<cudaStream_t>(stream);
  std::int64_t chunks = 0;
  dispatch_activation_type(dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    BackwardParams<T> p{static_cast<const T*>(io.dh), static_cast<const T*>(io.dr), static_cast<const T*>(io.r),
                        static_cast<const T*>(io.y), io.gate, io.scale, io.mean, io.rstd,
                        static_cast<T*>(io.dx), static_cast<T*>(io.dy), io.workspace,
                        shape.tokens, 0, 0, static_cast<int>(shape.dim)};
    auto launch = [&](auto vec, auto packs, int threads) {
      auto* kernel = norm_modulate_bwd_kernel<T, decltype(vec)::value, decltype(packs)::value>;
      const std::size_t shared_bytes = 2 * shape.dim * sizeof(float);  // scale, gate
      allow_shared_memory(kernel, shared_bytes, op);
      std::tie(p.rows_per_chunk, p.chunks) =
          chunking(kernel, threads, shared_bytes, device, shape, norm_modulate_max_chunks(shape.tokens), op);
      const auto blocks = static_cast<unsigned int>(shape.batch * p.chunks);
      kernel<<<blocks, threads, shared_bytes, cuda_stream>>>(p);
      chunks = p.chunks;
    };
    const std::size_t pack_bytes = kVectorWidth * sizeof(T);
    const bool vector_ok = shape.dim % kVectorWidth == 0 && aligned(io.dh, pack_bytes) &&
                           aligned(io.dr, pack_bytes) && aligned(io.r, pack_bytes) && aligned(io.y, pack_bytes) &&
                           aligned(io.dx, pack_bytes) && aligned(io.dy, pack_bytes) && aligned(io.gate, 16) &&
                           aligned(io.scale, 16) && aligned(io.workspace, 16);
    if (vector_ok) {
      launch_with_layout<kVectorWidth>(VectorLayouts{}, p.dim, op, launch);
    } else {
      launch_with_layout<1>(ScalarLayouts{}, p.dim, op, launch);
    }
  });
  ENGINE_CUDA_CHECK(op, cudaGetLastError());

  constexpr int kReduceThreads = 256;
  const std::int64_t column_blocks = (shape.dim + kReduceThreads - 1) / kReduceThreads;
  const auto blocks = static_cast<unsigned int>(shape.batch * column_blocks);
  norm_modulate_reduce_kernel<<<blocks, kReduceThreads, 0, cuda_stream>>>(
      io.workspace, io.dshift, io.dscale, io.dgate, column_blocks, chunks, static_cast<int>(shape.dim));
  ENGINE_CUDA_CHECK(op, cudaGetLastError());
}

}  // namespace engine
