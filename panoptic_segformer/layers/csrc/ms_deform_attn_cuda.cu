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
// The per-sample arithmetic (corners, bilinear weights, the zero padding, the non-finite rule, the
// gradients) is ms_deform_attn_math.h, shared with the CPU kernel; what is here is GPU-specific:
// the thread layout, the warp reductions and the atomics.
//
// Arithmetic is done in opmath (float for half/bfloat16/float, double for double).
//
// Determinism: the forward pass is deterministic. The backward pass adds into grad_value with
// atomicAdd in whatever order the threads arrive, so it calls alertNotDeterministic: under
// torch.use_deterministic_algorithms(True) it raises (or warns with warn_only=True), as CUDA
// grid_sample's backward does.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Context.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "ms_deform_attn.h"
#include "ms_deform_attn_math.h"

namespace panoptic_segformer {
namespace {

// Levels a call may have: the level shapes are passed to the kernel by value.
constexpr int kMaxLevels = 16;
// Channels one lane handles (D <= 32 * kMaxChunks, i.e. up to 256 channels per head).
constexpr int kMaxChunks = 8;
constexpr int kThreadsPerBlock = 256;
constexpr int64_t kIntMax = std::numeric_limits<int>::max();

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

// The shared arithmetic with 32-bit token offsets (check_cuda_limits bounds S * M * D).
template <typename acc_t>
using Bilinear = msda::Bilinear<acc_t, int>;

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
        if (msda::outside_point_poisons(b, a)) {
#pragma unroll
          for (int k = 0; k < kMaxChunks; ++k) acc[k] = msda::quiet_nan<acc_t>();
        }
        continue;
      }
#pragma unroll
      for (int k = 0; k < kMaxChunks; ++k) {
        const int d = lane + (k << sz.log2_group);
        if (k >= sz.chunks || d >= sz.D) break;
        acc_t v[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          v[c] = b.valid[c] ? static_cast<acc_t>(value_level[b.offset[c] * token_stride + d])
                            : acc_t(0);
        }
        acc[k] += a * msda::interpolate(b, v[0], v[1], v[2], v[3]);
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
        grad_a = grad_x = grad_y = msda::quiet_nan<acc_t>();
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
          const auto g = msda::channel_grads(b, a, grad_out[k], v[0], v[1], v[2], v[3]);
          grad_a += g.attention_weight;
          grad_x += g.x;
          grad_y += g.y;
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            if (b.valid[c]) {
              atomicAdd(grad_value_head + level_offset + b.offset[c] * token_stride + d,
                        msda::corner_value_grad(b, c, g.value_scale));
            }
          }
        }
      }
      grad_a = group_sum(grad_a, sz.group);
      grad_x = group_sum(grad_x, sz.group);
      grad_y = group_sum(grad_y, sz.group);
      if (active && lane == 0) {
        grad_attention_weights[point] = static_cast<coord_t>(grad_a);
        grad_sampling_locations[2 * point] =
            static_cast<coord_t>(msda::location_grad(grad_x, shapes.width[l]));
        grad_sampling_locations[2 * point + 1] =
            static_cast<coord_t>(msda::location_grad(grad_y, shapes.height[l]));
      }
    }
  }
}

// What this kernel's layout adds to the operator's checks: the level shapes travel by value
// (kMaxLevels), a lane holds kMaxChunks chunks of channels, and sizes, token offsets and one
// batch element's value are indexed with 32-bit integers.
void check_cuda_limits(const char* kernel, const at::Tensor& value,
                       const at::Tensor& sampling_locations) {
  const int64_t l = sampling_locations.size(3);
  TORCH_CHECK(l <= kMaxLevels, kernel, ": the CUDA kernel takes at most ", kMaxLevels,
              " levels, got ", l);
  TORCH_CHECK(value.size(3) <= 32 * kMaxChunks, kernel, ": the CUDA kernel takes at most ",
              32 * kMaxChunks, " channels per head, got D = ", value.size(3));
  const char* names[] = {"S", "M", "D", "Q", "L", "P"};
  const int64_t sizes[] = {value.size(1),
                           value.size(2),
                           value.size(3),
                           sampling_locations.size(1),
                           l,
                           sampling_locations.size(4)};
  for (int i = 0; i < 6; ++i) {
    TORCH_CHECK(sizes[i] <= kIntMax, kernel, ": ", names[i], " = ", sizes[i],
                " is too large for the CUDA kernel's 32-bit sizes");
  }
  const int64_t per_batch = value.size(1) * value.size(2) * value.size(3);
  TORCH_CHECK(per_batch <= kIntMax, kernel, ": S * M * D = ", per_batch,
              " is too large for the CUDA kernel's 32-bit token offsets");
}

LevelShapes make_level_shapes(const Levels& levels) {
  LevelShapes shapes{};
  for (int64_t l = 0; l < levels.size(); ++l) {
    shapes.height[l] = static_cast<int>(levels.height[l]);
    shapes.width[l] = static_cast<int>(levels.width[l]);
    shapes.start[l] = static_cast<int>(levels.start[l]);
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

struct ForwardLauncher {
  at::Tensor value, sampling_locations, attention_weights;
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
  at::Tensor value, sampling_locations, attention_weights, grad_output;
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

at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  const char* kernel = "ms_deform_attn (CUDA)";
  const Levels levels = check_inputs(kernel, c10::DeviceType::CUDA, value, spatial_shapes,
                                     level_start_index, sampling_locations, attention_weights);
  check_cuda_limits(kernel, value, sampling_locations);
  const c10::cuda::CUDAGuard guard(value.device());
  const Sizes sz = make_sizes(value, sampling_locations);
  auto output = at::empty({value.size(0), sz.Q, sz.M * sz.D}, value.options());
  if (output.numel() == 0) return output;
  const LevelShapes shapes = make_level_shapes(levels);
  dispatch_dtypes(value.scalar_type(), sampling_locations.scalar_type(),
                  ForwardLauncher{value.contiguous(), sampling_locations.contiguous(),
                                  attention_weights.contiguous(), output, shapes, sz});
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_cuda_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  const char* kernel = "ms_deform_attn_backward (CUDA)";
  const Levels levels =
      check_backward_inputs(kernel, c10::DeviceType::CUDA, value, spatial_shapes,
                            level_start_index, sampling_locations, attention_weights, grad_output);
  check_cuda_limits(kernel, value, sampling_locations);
  const c10::cuda::CUDAGuard guard(value.device());
  const Sizes sz = make_sizes(value, sampling_locations);
  // grad_value is accumulated by atomics in opmath precision and cast back at the end.
  auto grad_value_acc =
      at::zeros(value.sizes(), value.options().dtype(at::toOpMathType(value.scalar_type())));
  auto grad_sampling_locations = at::empty(sampling_locations.sizes(),
                                           sampling_locations.options());
  auto grad_attention_weights = at::empty(attention_weights.sizes(), attention_weights.options());
  if (sz.groups == 0) {
    // Nothing asked: the kernel writes every element otherwise.
    grad_sampling_locations.zero_();
    grad_attention_weights.zero_();
  } else {
    at::globalContext().alertNotDeterministic("ms_deform_attn_backward_cuda");
    const LevelShapes shapes = make_level_shapes(levels);
    dispatch_dtypes(value.scalar_type(), sampling_locations.scalar_type(),
                    BackwardLauncher{value.contiguous(), sampling_locations.contiguous(),
                                     attention_weights.contiguous(), grad_output.contiguous(),
                                     grad_value_acc, grad_sampling_locations,
                                     grad_attention_weights, shapes, sz});
  }
  auto grad_value = grad_value_acc.scalar_type() == value.scalar_type()
                        ? grad_value_acc
                        : grad_value_acc.to(value.scalar_type());
  return {grad_value, grad_sampling_locations, grad_attention_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(panoptic_segformer, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cuda_forward);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_cuda_backward);
}

}  // namespace panoptic_segformer
