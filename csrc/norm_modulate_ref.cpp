// C++ reference of norm_modulate / add_norm_modulate: what engine._C runs on host pointers
// (device -1), so CI checks the ABI and the op's math without a GPU. Plain loops over rows.
// Elementwise values are computed as the GPU does (fp32 for 16-bit and fp32 activations, fp64
// for fp64) and rounded to the activation dtype once; every sum (statistics, row reductions,
// modulation gradients over N) accumulates in double, so the only error left is that rounding.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace engine {
namespace {

template <class T>
void forward(const NormModulateForward& io, const NormModulateShape& s) {
  using Compute = typename HostMath<T>::compute;
  const T* x = static_cast<const T*>(io.x);
  const T* y = static_cast<const T*>(io.y);
  T* r = static_cast<T*>(io.r);
  T* h = static_cast<T*>(io.h);
  std::vector<double> normed(static_cast<std::size_t>(s.dim));  // the row of r, as stored
  for (std::int64_t b = 0; b < s.batch; ++b) {
    const float* gate = io.gate ? io.gate + b * s.dim : nullptr;  // (D,)
    const float* shift = io.shift + b * s.dim;
    const float* scale = io.scale + b * s.dim;
    for (std::int64_t n = 0; n < s.tokens; ++n) {
      const std::int64_t row = b * s.tokens + n;
      const std::int64_t base = row * s.dim;
      double sum = 0.0;
      for (std::int64_t d = 0; d < s.dim; ++d) {
        Compute value = load(x[base + d]);
        if (y) {
          // r is rounded to the activation dtype, and h normalises r as stored.
          const Compute update = gate ? static_cast<Compute>(gate[d]) * load(y[base + d]) : load(y[base + d]);
          r[base + d] = store<T>(value + update);
          value = load(r[base + d]);
        }
        normed[d] = value;
        sum += value;
      }
      const double mean = sum / static_cast<double>(s.dim);
      double squares = 0.0;
      for (std::int64_t d = 0; d < s.dim; ++d) squares += (normed[d] - mean) * (normed[d] - mean);
      const double rstd = 1.0 / std::sqrt(squares / static_cast<double>(s.dim) + kNormModulateEps);
      for (std::int64_t d = 0; d < s.dim; ++d) {
        const double modulated = (normed[d] - mean) * rstd * (1.0 + scale[d]) + shift[d];
        h[base + d] = store<T>(static_cast<Compute>(modulated));
      }
      io.mean[row] = static_cast<float>(mean);
      io.rstd[row] = static_cast<float>(rstd);
    }
  }
}

template <class T>
void backward(const NormModulateBackward& io, const NormModulateShape& s) {
  using Compute = typename HostMath<T>::compute;
  const T* dh = static_cast<const T*>(io.dh);
  const T* dr = static_cast<const T*>(io.dr);
  const T* r = static_cast<const T*>(io.r);
  const T* y = static_cast<const T*>(io.y);
  T* dx = static_cast<T*>(io.dx);
  T* dy = static_cast<T*>(io.dy);
  const auto dim = static_cast<std::size_t>(s.dim);
  std::vector<double> xhat(dim), g(dim);                        // one row
  std::vector<double> dshift(dim), dscale(dim), dgate(dim);     // one sample's sums over N
  for (std::int64_t b = 0; b < s.batch; ++b) {
    const float* gate = io.gate ? io.gate + b * s.dim : nullptr;  // (D,)
    const float* scale = io.scale + b * s.dim;
    std::fill(dshift.begin(), dshift.end(), 0.0);
    std::fill(dscale.begin(), dscale.end(), 0.0);
    std::fill(dgate.begin(), dgate.end(), 0.0);
    for (std::int64_t n = 0; n < s.tokens; ++n) {
      const std::int64_t row = b * s.tokens + n;
      const std::int64_t base = row * s.dim;
      const double mean = io.mean[row];
      const double rstd = io.rstd[row];
      double g_sum = 0.0, g_xhat_sum = 0.0;
      for (std::int64_t d = 0; d < s.dim; ++d) {
        const double grad_h = load(dh[base + d]);
        xhat[d] = (load(r[base + d]) - mean) * rstd;
        g[d] = grad_h * (1.0 + scale[d]);
        g_sum += g[d];
        g_xhat_sum += g[d] * xhat[d];
        dshift[d] += grad_h;
        dscale[d] += grad_h * xhat[d];
      }
      const double g_mean = g_sum / static_cast<double>(s.dim);
      const double g_xhat_mean = g_xhat_sum / static_cast<double>(s.dim);
      for (std::int64_t d = 0; d < s.dim; ++d) {
        double total = rstd * (g[d] - g_mean - xhat[d] * g_xhat_mean);  // dr_total
        if (dr) total += load(dr[base + d]);
        dx[base + d] = store<T>(static_cast<Compute>(total));
        if (gate) {
          dy[base + d] = store<T>(static_cast<Compute>(total * gate[d]));
          dgate[d] += total * load(y[base + d]);
        }
      }
    }
    for (std::int64_t d = 0; d < s.dim; ++d) {
      io.dshift[b * s.dim + d] = static_cast<float>(dshift[d]);
      io.dscale[b * s.dim + d] = static_cast<float>(dscale[d]);
      if (io.gate) io.dgate[b * s.dim + d] = static_cast<float>(dgate[d]);
    }
  }
}

}  // namespace

void norm_modulate_fwd_cpu(const NormModulateForward& io, const NormModulateShape& shape, DType dtype) {
  dispatch_host_dtype(dtype, [&](auto tag) { forward<typename decltype(tag)::type>(io, shape); });
}

void norm_modulate_bwd_cpu(const NormModulateBackward& io, const NormModulateShape& shape, DType dtype) {
  dispatch_host_dtype(dtype, [&](auto tag) { backward<typename decltype(tag)::type>(io, shape); });
}

}  // namespace engine
