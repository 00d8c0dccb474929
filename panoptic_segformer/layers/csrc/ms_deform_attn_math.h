// Multi-scale deformable attention: the per-sample arithmetic, shared by the CPU kernel
// (ms_deform_attn_cpu.cpp) and the CUDA kernels (ms_deform_attn_cuda.cu).
//
// Everything here is an inline function of one sampling point or one channel, marked
// host-and-device for nvcc and plain inline for a C++ compiler. The kernels around it only decide
// which (n, q, m, l, p, channel) each thread handles, how partial sums are reduced and how
// grad_value is accumulated (atomics on the GPU, a race-free partition on the CPU).
//
// Conventions (Deformable DETR's): a sampling location (loc_x, loc_y) is normalised to [0, 1] over
// the level; pixel (i, j) of an H x W level has its centre at ((j + 0.5) / W, (i + 0.5) / H)
// (align_corners=False); the four neighbouring pixels are blended bilinearly and pixels outside
// the map read zero.
//
// Non-finite locations (the one rule every implementation follows, the PyTorch path included):
// a point whose loc_x or loc_y is NaN or infinite samples NaN, so its query's output for that head
// is NaN; its location and attention-weight gradients are NaN and it adds nothing to grad_value.
// A finite location outside the map samples exactly zero, so out += a * 0 there, which is NaN
// only when the attention weight a is itself NaN or infinite; its gradients are zero.

#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

// PSF_HOST_DEVICE: compiled for the host and the device by nvcc, empty for a C++ compiler.
// PSF_INLINE: that, always inlined (into the kernels' vectorised loops, too).
#if defined(__CUDACC__) || defined(__HIPCC__)
#define PSF_HOST_DEVICE __host__ __device__
#define PSF_INLINE PSF_HOST_DEVICE __forceinline__
#else
#define PSF_HOST_DEVICE
#if defined(__GNUC__)
#define PSF_INLINE PSF_HOST_DEVICE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define PSF_INLINE PSF_HOST_DEVICE __forceinline
#else
#define PSF_INLINE PSF_HOST_DEVICE inline
#endif
#endif

namespace panoptic_segformer {
namespace msda {

template <typename acc_t>
PSF_INLINE bool is_finite(acc_t v) {
#ifdef __CUDA_ARCH__
  return ::isfinite(v);
#else
  return std::isfinite(v);
#endif
}

template <typename acc_t>
PSF_INLINE acc_t quiet_nan() {
  return std::numeric_limits<acc_t>::quiet_NaN();
}

// Where one sampling point falls on its level: the four corners, which of them lie on the map,
// their bilinear weights (zero for corners off the map) and the fractional position. index_t is
// the kernel's index type (int on the GPU, where the launcher checks that offsets fit).
template <typename acc_t, typename index_t>
struct Bilinear {
  bool finite;           // loc_x and loc_y are finite (else the point samples NaN)
  bool inside;           // some corner lies on the map (else the sample is exactly zero)
  index_t offset[4];     // token offsets y * W + x of the corners, relative to the level start
  bool valid[4];         // corner on the map
  acc_t weight[4];       // bilinear weights, zero for corners off the map
  acc_t lx, ly, hx, hy;  // fractional parts and their complements, for the location gradient

  // Corner order: (y0, x0), (y0, x1), (y1, x0), (y1, x1).
  PSF_INLINE Bilinear(acc_t loc_x, acc_t loc_y, index_t height, index_t width) {
    finite = is_finite(loc_x) && is_finite(loc_y);
    // Pixel coordinates: centre of pixel j at x = j. A finite location far outside may overflow
    // to +-inf here, which the comparisons below still place outside.
    const acc_t x = loc_x * static_cast<acc_t>(width) - acc_t(0.5);
    const acc_t y = loc_y * static_cast<acc_t>(height) - acc_t(0.5);
    inside = finite && x > acc_t(-1) && y > acc_t(-1) && x < static_cast<acc_t>(width) &&
             y < static_cast<acc_t>(height);
    if (!inside) {
      lx = ly = hx = hy = acc_t(0);
      for (int c = 0; c < 4; ++c) {
        offset[c] = 0;
        valid[c] = false;
        weight[c] = acc_t(0);
      }
      return;
    }
    // -1 < x < W, so floor(x) is in [-1, W - 1] and fits index_t.
    const index_t x0 = static_cast<index_t>(floor_(x));
    const index_t y0 = static_cast<index_t>(floor_(y));
    const index_t x1 = x0 + 1;
    const index_t y1 = y0 + 1;
    lx = x - static_cast<acc_t>(x0);
    ly = y - static_cast<acc_t>(y0);
    hx = acc_t(1) - lx;
    hy = acc_t(1) - ly;
    const bool vx0 = x0 >= 0, vx1 = x1 < width, vy0 = y0 >= 0, vy1 = y1 < height;
    valid[0] = vy0 && vx0;
    valid[1] = vy0 && vx1;
    valid[2] = vy1 && vx0;
    valid[3] = vy1 && vx1;
    offset[0] = y0 * width + x0;
    offset[1] = y0 * width + x1;
    offset[2] = y1 * width + x0;
    offset[3] = y1 * width + x1;
    weight[0] = valid[0] ? hy * hx : acc_t(0);
    weight[1] = valid[1] ? hy * lx : acc_t(0);
    weight[2] = valid[2] ? ly * hx : acc_t(0);
    weight[3] = valid[3] ? ly * lx : acc_t(0);
  }

 private:
  static PSF_INLINE acc_t floor_(acc_t v) {
#ifdef __CUDA_ARCH__
    return ::floor(v);
#else
    return std::floor(v);
#endif
  }
};

// Whether a point that samples no pixel (!b.inside) still makes the output NaN: its location is
// not finite, or its attention weight is not (a * 0 is NaN for a NaN or infinite a).
template <typename acc_t, typename index_t>
PSF_INLINE bool outside_point_poisons(const Bilinear<acc_t, index_t>& b, acc_t attention_weight) {
  return !b.finite || !is_finite(attention_weight);
}

// The bilinear sample of one channel from its four corner values (zero for corners off the map).
template <typename acc_t, typename index_t>
PSF_INLINE acc_t interpolate(const Bilinear<acc_t, index_t>& b, acc_t v0, acc_t v1, acc_t v2,
                             acc_t v3) {
  return b.weight[0] * v0 + b.weight[1] * v1 + b.weight[2] * v2 + b.weight[3] * v3;
}

// One channel's share of the gradients of one sampling point, for the output gradient g of that
// channel and the point's attention weight a (sample s = interpolate(...), out += a * s):
//   d out / d a = s;  d out / d x = a * (hy (v1 - v0) + ly (v3 - v2)), likewise y (pixel units);
//   d out / d value of corner c = a * weight[c], i.e. corner_value_grad(b, c, value_scale).
template <typename acc_t>
struct ChannelGrads {
  acc_t attention_weight;  // g * s
  acc_t x;                 // g * a * d s / d x
  acc_t y;                 // g * a * d s / d y
  acc_t value_scale;       // g * a
};

template <typename acc_t, typename index_t>
PSF_INLINE ChannelGrads<acc_t> channel_grads(const Bilinear<acc_t, index_t>& b,
                                             acc_t attention_weight, acc_t grad_output, acc_t v0,
                                             acc_t v1, acc_t v2, acc_t v3) {
  const acc_t ga = grad_output * attention_weight;
  ChannelGrads<acc_t> g;
  g.attention_weight = grad_output * interpolate(b, v0, v1, v2, v3);
  g.x = ga * (b.hy * (v1 - v0) + b.ly * (v3 - v2));
  g.y = ga * (b.hx * (v2 - v0) + b.lx * (v3 - v1));
  g.value_scale = ga;
  return g;
}

template <typename acc_t, typename index_t>
PSF_INLINE acc_t corner_value_grad(const Bilinear<acc_t, index_t>& b, int corner,
                                   acc_t value_scale) {
  return b.weight[corner] * value_scale;
}

// From pixel units back to the normalised location: x = loc_x * W - 0.5, so d/d loc_x = W d/dx.
template <typename acc_t, typename index_t>
PSF_INLINE acc_t location_grad(acc_t grad_pixels, index_t size) {
  return grad_pixels * static_cast<acc_t>(size);
}

}  // namespace msda
}  // namespace panoptic_segformer
