// Multi-scale deformable attention (Deformable DETR, Zhu et al. ICLR 2021), CUDA kernels.
//
// Shape shorthand: N batch, S flattened value tokens over all levels, M heads, D channels per
// head, Q queries, L levels, P sampling points per level and head.
//
// Thread layout: one group of G lanes (G a power of two, at most 32, so a group never straddles
// a warp) handles one (n, q, m) triple; lane g owns channels g, g + G, g + 2G, ... of the head.
// Consecutive lanes read consecutive channels of a sampled pixel, so every bilinear corner is one
// coalesced load. In the backward pass the per-channel partial gradients of a sampling location
// and its attention weight are summed with a segmented warp shuffle, so those two gradients need
// no atomics; only grad_value (many queries hit one pixel) is scattered with atomicAdd.
//
// Level shapes travel in a kernel-argument struct, not in device memory: no loads for them, and
// no host synchronisation is needed when the caller keeps them on the CPU.
//
// Arithmetic is done in opmath (float for half/bfloat16/float, double for double).

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>

#include <limits>

#include "ms_deform_attn.h"

namespace panoptic_segformer {
namespace {

constexpr int kThreadsPerBlock = 256;

struct LevelShapes {
  int height[kMaxLevels];
  int width[kMaxLevels];
  int start[kMaxLevels];  // first token of the level in the flattened S axis
};

struct Sizes {
  int S, M, D, Q, L, P;
  int group;        // G, lanes per (n, q, m)
  int log2_group;
  int chunks;       // ceil(D / G), channels per lane
  int64_t groups;   // N * Q * M
};

// Bilinear sampling of one point with Deformable DETR's convention: normalised (x, y) in [0, 1],
// align_corners=False (pixel centres at (i + 0.5) / size), zeros outside the map.
template <typename acc_t>
struct Bilinear {
  bool finite;          // the location is finite (else the outputs it feeds become NaN)
  bool inside;          // any corner can be non-zero
  int offset[4];        // token offsets (y * W + x) of the corners, relative to the level start
  bool valid[4];        // corner inside the map
  acc_t weight[4];      // bilinear weights, zero for invalid corners
  acc_t lx, ly, hx, hy; // fractional parts, for the location gradient

  __device__ __forceinline__ Bilinear(acc_t loc_x, acc_t loc_y, int height, int width) {
    const acc_t x = loc_x * width - acc_t(0.5);
    const acc_t y = loc_y * height - acc_t(0.5);
    finite = isfinite(x) && isfinite(y);
    inside = x > acc_t(-1) && y > acc_t(-1) && x < acc_t(width) && y < acc_t(height);
    if (!inside) {
      lx = ly = hx = hy = acc_t(0);
      for (int c = 0; c < 4; ++c) {
        offset[c] = 0;
        valid[c] = false;
        weight[c] = acc_t(0);
      }
      return;
    }
    const int x0 = static_cast<int>(floor(x));
    const int y0 = static_cast<int>(floor(y));
    const int x1 = x0 + 1;
    const int y1 = y0 + 1;
    lx = x - x0;
    ly = y - y0;
    hx = acc_t(1) - lx;
    hy = acc_t(1) - ly;
    const bool vx0 = x0 >= 0, vx1 = x1 < width, vy0 = y0 >= 0, vy1 = y1 < height;
    // Corner order: (y0, x0), (y0, x1), (y1, x0), (y1, x1).
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
};

template <typename T>
__device__ __forceinline__ T group_sum(T v, int group) {
  // Segmented butterfly over the G lanes of a group; every lane of the warp takes part.
  for (int mask = group >> 1; mask > 0; mask >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, mask, group);
  }
  return v;
}

template <typename scalar_t, typename coord_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    ms_deform_attn_forward_kernel(const scalar_t* __restrict__ value,
                                  const coord_t* __restrict__ sampling_locations,
                                  const coord_t* __restrict__ attention_weights,
                                  scalar_t* __restrict__ output, const LevelShapes shapes,
                                  const Sizes sz) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t group = thread >> sz.log2_group;
  const int lane = static_cast<int>(thread & (sz.group - 1));
  if (group >= sz.groups) return;  // no shuffles in the forward pass, so early exit is safe

  const int m = static_cast<int>(group % sz.M);
  const int64_t n = group / (static_cast<int64_t>(sz.Q) * sz.M);
  const int64_t token_stride = static_cast<int64_t>(sz.M) * sz.D;  // one S step in value
  // value (N, S, M, D): this lane's head starts at ((n * S) * M + m) * D.
  const scalar_t* value_head = value + n * sz.S * token_stride + m * sz.D;
  // sampling_locations (N, Q, M, L, P, 2) and attention_weights (N, Q, M, L, P) are
  // contiguous, so the (n, q, m) block starts at group * L * P (* 2).
  const coord_t* loc = sampling_locations + group * sz.L * sz.P * 2;
  const coord_t* attn = attention_weights + group * sz.L * sz.P;

  acc_t acc[kMaxChunks];
#pragma unroll
  for (int k = 0; k < kMaxChunks; ++k) acc[k] = acc_t(0);

  for (int l = 0; l < sz.L; ++l) {
    const scalar_t* value_level = value_head + shapes.start[l] * token_stride;
    for (int p = 0; p < sz.P; ++p, loc += 2, ++attn) {
      const Bilinear<acc_t> b(static_cast<acc_t>(loc[0]), static_cast<acc_t>(loc[1]),
                              shapes.height[l], shapes.width[l]);
      const acc_t a = static_cast<acc_t>(*attn);
      if (!b.inside) {
        // Outside the map the sample is zero, but a NaN/inf location or weight still poisons
        // the result, as 0 * weight and grid_sample's NaN do in the PyTorch path.
        if (!b.finite || !isfinite(a)) {
#pragma unroll
          for (int k = 0; k < kMaxChunks; ++k) acc[k] = std::numeric_limits<acc_t>::quiet_NaN();
        }
        continue;
      }
#pragma unroll
      for (int k = 0; k < kMaxChunks; ++k) {
        const int d = lane + (k << sz.log2_group);
        if (k >= sz.chunks || d >= sz.D) break;
        acc_t sampled = acc_t(0);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if (b.valid[c]) {
            sampled += b.weight[c] * static_cast<acc_t>(value_level[b.offset[c] * token_stride + d]);
          }
        }
        acc[k] += a * sampled;
      }
    }
  }
  // output (N, Q, M * D): the (n, q, m) block starts at group * D.
  scalar_t* out = output + group * sz.D;
#pragma unroll
  for (int k = 0; k < kMaxChunks; ++k) {
    const int d = lane + (k << sz.log2_group);
    if (k >= sz.chunks || d >= sz.D) break;
    out[d] = static_cast<scalar_t>(acc[k]);
  }
}

template <typename scalar_t, typename coord_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    ms_deform_attn_backward_kernel(const scalar_t* __restrict__ value,
                                   const coord_t* __restrict__ sampling_locations,
                                   const coord_t* __restrict__ attention_weights,
                                   const scalar_t* __restrict__ grad_output,
                                   at::opmath_type<scalar_t>* __restrict__ grad_value,
                                   coord_t* __restrict__ grad_sampling_locations,
                                   coord_t* __restrict__ grad_attention_weights,
                                   const LevelShapes shapes, const Sizes sz) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t raw_group = thread >> sz.log2_group;
  const int lane = static_cast<int>(thread & (sz.group - 1));
  // Lanes past the end still run the loop (with zero contributions) because the group sums
  // below are warp-wide shuffles.
  const bool active = raw_group < sz.groups;
  const int64_t group = active ? raw_group : 0;

  const int m = static_cast<int>(group % sz.M);
  const int64_t n = group / (static_cast<int64_t>(sz.Q) * sz.M);
  const int64_t token_stride = static_cast<int64_t>(sz.M) * sz.D;
  const int64_t head_offset = n * sz.S * token_stride + m * sz.D;
  const scalar_t* value_head = value + head_offset;
  acc_t* grad_value_head = grad_value + head_offset;
  const int64_t point_base = group * sz.L * sz.P;

  acc_t grad_out[kMaxChunks];
#pragma unroll
  for (int k = 0; k < kMaxChunks; ++k) {
    const int d = lane + (k << sz.log2_group);
    grad_out[k] = (active && k < sz.chunks && d < sz.D)
                      ? static_cast<acc_t>(grad_output[group * sz.D + d])
                      : acc_t(0);
  }

  for (int l = 0; l < sz.L; ++l) {
    const int64_t level_offset = shapes.start[l] * token_stride;
    for (int p = 0; p < sz.P; ++p) {
      const int64_t point = point_base + l * sz.P + p;
      acc_t loc_x = acc_t(0), loc_y = acc_t(0), a = acc_t(0);
      if (active) {
        loc_x = static_cast<acc_t>(sampling_locations[2 * point]);
        loc_y = static_cast<acc_t>(sampling_locations[2 * point + 1]);
        a = static_cast<acc_t>(attention_weights[point]);
      }
      const Bilinear<acc_t> b(loc_x, loc_y, shapes.height[l], shapes.width[l]);
      acc_t grad_a = acc_t(0), grad_x = acc_t(0), grad_y = acc_t(0);
      if (!b.finite) {
        grad_a = grad_x = grad_y = std::numeric_limits<acc_t>::quiet_NaN();
      } else if (active && b.inside) {
#pragma unroll
        for (int k = 0; k < kMaxChunks; ++k) {
          const int d = lane + (k << sz.log2_group);
          if (k >= sz.chunks || d >= sz.D) break;
          acc_t v[4];
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            v[c] = b.valid[c] ? static_cast<acc_t>(
                                    value_head[level_offset + b.offset[c] * token_stride + d])
                              : acc_t(0);
          }
          const acc_t sampled =
              b.weight[0] * v[0] + b.weight[1] * v[1] + b.weight[2] * v[2] + b.weight[3] * v[3];
          const acc_t g = grad_out[k];
          grad_a += g * sampled;
          const acc_t ga = g * a;
          // d sampled / d x and d y (x, y in pixels of this level).
          grad_x += ga * (b.hy * (v[1] - v[0]) + b.ly * (v[3] - v[2]));
          grad_y += ga * (b.hx * (v[2] - v[0]) + b.lx * (v[3] - v[1]));
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            if (b.valid[c]) {
              atomicAdd(grad_value_head + level_offset + b.offset[c] * token_stride + d,
                        b.weight[c] * ga);
            }
          }
        }
      }
      grad_a = group_sum(grad_a, sz.group);
      grad_x = group_sum(grad_x, sz.group);
      grad_y = group_sum(grad_y, sz.group);
      if (active && lane == 0) {
        grad_attention_weights[point] = static_cast<coord_t>(grad_a);
        // x = loc_x * W - 0.5, so d/d loc_x = W * d/dx.
        grad_sampling_locations[2 * point] = static_cast<coord_t>(grad_x * shapes.width[l]);
        grad_sampling_locations[2 * point + 1] = static_cast<coord_t>(grad_y * shapes.height[l]);
      }
    }
  }
}

LevelShapes make_level_shapes(const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index) {
  LevelShapes shapes{};
  const auto hw = spatial_shapes.accessor<int64_t, 2>();
  const auto start = level_start_index.accessor<int64_t, 1>();
  for (int64_t l = 0; l < spatial_shapes.size(0); ++l) {
    shapes.height[l] = static_cast<int>(hw[l][0]);
    shapes.width[l] = static_cast<int>(hw[l][1]);
    shapes.start[l] = static_cast<int>(start[l]);
  }
  return shapes;
}

Sizes make_sizes(const at::Tensor& value, const at::Tensor& sampling_locations) {
  Sizes sz{};
  sz.S = static_cast<int>(value.size(1));
  sz.M = static_cast<int>(value.size(2));
  sz.D = static_cast<int>(value.size(3));
  sz.Q = static_cast<int>(sampling_locations.size(1));
  sz.L = static_cast<int>(sampling_locations.size(3));
  sz.P = static_cast<int>(sampling_locations.size(4));
  // G: the largest power of two not above min(D, 32).
  sz.log2_group = 0;
  while ((2 << sz.log2_group) <= std::min(sz.D, 32)) ++sz.log2_group;
  sz.group = 1 << sz.log2_group;
  sz.chunks = (sz.D + sz.group - 1) / sz.group;
  sz.groups = value.size(0) * static_cast<int64_t>(sz.Q) * sz.M;
  return sz;
}

dim3 grid_for(const Sizes& sz) {
  const int64_t blocks = (sz.groups * sz.group + kThreadsPerBlock - 1) / kThreadsPerBlock;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "ms_deform_attn: N * Q * M = ",
              sz.groups, " is too large for one kernel launch");
  return dim3(static_cast<unsigned int>(blocks));
}

// Calls fn.template operator()<scalar_t, coord_t>() for the supported dtype pairs: coordinates
// and weights in the value's dtype, or in float32 for a half/bfloat16 value (autocast).
template <typename Fn>
void dispatch_dtypes(at::ScalarType value_type, at::ScalarType coord_type, const Fn& fn) {
  using at::ScalarType;
  const bool same = value_type == coord_type;
  const bool float_coords = coord_type == ScalarType::Float;
  switch (value_type) {
    case ScalarType::Double:
      if (same) return fn.template operator()<double, double>();
      break;
    case ScalarType::Float:
      if (same) return fn.template operator()<float, float>();
      break;
    case ScalarType::Half:
      if (same) return fn.template operator()<at::Half, at::Half>();
      if (float_coords) return fn.template operator()<at::Half, float>();
      break;
    case ScalarType::BFloat16:
      if (same) return fn.template operator()<at::BFloat16, at::BFloat16>();
      if (float_coords) return fn.template operator()<at::BFloat16, float>();
      break;
    default:
      break;
  }
  TORCH_CHECK(false, "ms_deform_attn: unsupported dtypes: value ", value_type,
              ", sampling_locations/attention_weights ", coord_type);
}

struct ForwardLauncher {
  const at::Tensor& value;
  const at::Tensor& sampling_locations;
  const at::Tensor& attention_weights;
  at::Tensor& output;
  const LevelShapes& shapes;
  const Sizes& sz;

  template <typename scalar_t, typename coord_t>
  void operator()() const {
    ms_deform_attn_forward_kernel<scalar_t, coord_t>
        <<<grid_for(sz), kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
            value.data_ptr<scalar_t>(), sampling_locations.data_ptr<coord_t>(),
            attention_weights.data_ptr<coord_t>(), output.data_ptr<scalar_t>(), shapes, sz);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

struct BackwardLauncher {
  const at::Tensor& value;
  const at::Tensor& sampling_locations;
  const at::Tensor& attention_weights;
  const at::Tensor& grad_output;
  at::Tensor& grad_value_acc;
  at::Tensor& grad_sampling_locations;
  at::Tensor& grad_attention_weights;
  const LevelShapes& shapes;
  const Sizes& sz;

  template <typename scalar_t, typename coord_t>
  void operator()() const {
    using acc_t = at::opmath_type<scalar_t>;
    ms_deform_attn_backward_kernel<scalar_t, coord_t>
        <<<grid_for(sz), kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
            value.data_ptr<scalar_t>(), sampling_locations.data_ptr<coord_t>(),
            attention_weights.data_ptr<coord_t>(), grad_output.data_ptr<scalar_t>(),
            grad_value_acc.data_ptr<acc_t>(), grad_sampling_locations.data_ptr<coord_t>(),
            grad_attention_weights.data_ptr<coord_t>(), shapes, sz);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  const c10::cuda::CUDAGuard guard(value.device());
  const Sizes sz = make_sizes(value, sampling_locations);
  auto output = at::empty({value.size(0), sz.Q, sz.M * sz.D}, value.options());
  if (output.numel() == 0) return output;
  const LevelShapes shapes = make_level_shapes(spatial_shapes, level_start_index);
  dispatch_dtypes(value.scalar_type(), sampling_locations.scalar_type(),
                  ForwardLauncher{value, sampling_locations, attention_weights, output, shapes, sz});
  return output;
}

std::vector<at::Tensor> ms_deform_attn_cuda_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  const c10::cuda::CUDAGuard guard(value.device());
  const Sizes sz = make_sizes(value, sampling_locations);
  // grad_value is accumulated by atomics in opmath precision and cast back at the end.
  auto grad_value_acc =
      at::zeros(value.sizes(), value.options().dtype(at::toOpMathType(value.scalar_type())));
  auto grad_sampling_locations = at::empty_like(sampling_locations);
  auto grad_attention_weights = at::empty_like(attention_weights);
  if (sz.groups == 0 || value.numel() == 0) {
    // Nothing to sample from or nothing asked: the kernel writes every element otherwise.
    grad_sampling_locations.zero_();
    grad_attention_weights.zero_();
  } else {
    const LevelShapes shapes = make_level_shapes(spatial_shapes, level_start_index);
    dispatch_dtypes(value.scalar_type(), sampling_locations.scalar_type(),
                    BackwardLauncher{value, sampling_locations, attention_weights, grad_output,
                                     grad_value_acc, grad_sampling_locations,
                                     grad_attention_weights, shapes, sz});
  }
  auto grad_value = grad_value_acc.scalar_type() == value.scalar_type()
                        ? grad_value_acc
                        : grad_value_acc.to(value.scalar_type());
  return {grad_value, grad_sampling_locations, grad_attention_weights};
}

}  // namespace panoptic_segformer
