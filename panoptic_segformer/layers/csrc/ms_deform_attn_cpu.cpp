// Multi-scale deformable attention (Deformable DETR, Zhu et al. ICLR 2021), CPU kernels.
//
// Shape shorthand: N batch, S flattened value tokens over all levels, M heads, D channels per
// head, Q queries, L levels, P sampling points per level and head.
//
// The per-sample arithmetic is ms_deform_attn_math.h, shared with the CUDA kernels; this file
// only decides who does what:
// * forward: the (n, m, q) triples, query fastest, are split into contiguous ranges over the
//   threads (at::parallel_for), so a thread mostly reads one head of value; per triple the D
//   channels of a head are accumulated in a loop the compiler vectorises. That loop is
//   ms_deform_attn_cpu_forward.h, which the ONNX Runtime operator runs too.
// * backward: one (n, m) head per task. Only that task writes grad_value[n, :, m, :], so no two
//   threads ever write the same element, and within a task the queries, levels and points are
//   visited in a fixed order: the gradients are bit-identical whatever the number of threads.
//   The per-channel terms of the location and attention-weight gradients are summed with a fixed
//   association (fixed_order_sum), so they do not depend on the vector width either.
// Arithmetic is done in opmath (float for half/bfloat16/float, double for double); the build
// passes -ffp-contract=off, so no multiply-add is fused differently from one compiler to another,
// and the AVX2 build of the loops (picked at run time) gives the same bits as the baseline one.

#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu_features.h"
#include "ms_deform_attn.h"
#include "ms_deform_attn_cpu_forward.h"
#include "ms_deform_attn_math.h"

namespace panoptic_segformer {
namespace {

using msda::Bilinear;
using msda::Corners;
using msda::ForwardArgs;
using msda::Sizes;

Sizes make_sizes(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return {value.size(0),
          value.size(1),
          value.size(2),
          value.size(3),
          sampling_locations.size(1),
          sampling_locations.size(3),
          sampling_locations.size(4)};
}

// Sum of x[0], ..., x[n - 1] with one fixed association: lane j adds up x[j], x[j + 8], ... in
// order, then the 8 lanes are added as a fixed tree.
template <typename acc_t>
PSF_INLINE acc_t fixed_order_sum(const acc_t* __restrict x, int64_t n) {
  constexpr int kLanes = 8;
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lanes[j] += x[i + j];
  }
  for (int j = 0; i < n; ++i, ++j) lanes[j] += x[i];
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
         ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

template <typename scalar_t, typename coord_t>
struct BackwardArgs {
  const scalar_t* value;
  const coord_t* sampling_locations;
  const coord_t* attention_weights;
  const scalar_t* grad_output;
  at::opmath_type<scalar_t>* grad_value;
  coord_t* grad_sampling_locations;
  coord_t* grad_attention_weights;
  const Levels* levels;
  Sizes sz;
};

// Heads [begin, end) of the backward pass: each (n, m) head is the only writer of
// grad_value[n, :, m, :] (see the file comment).
template <typename scalar_t, typename coord_t>
PSF_INLINE void backward_heads(const BackwardArgs<scalar_t, coord_t>& args, int64_t begin,
                               int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const Sizes& sz = args.sz;
  const Levels& levels = *args.levels;
  const int64_t token_stride = sz.M * sz.D;
  const int64_t points = sz.L * sz.P;
  const std::vector<scalar_t> zeros(sz.D, scalar_t(0));
  std::vector<acc_t> scratch(5 * sz.D);
  acc_t* __restrict g_out = scratch.data();
  acc_t* __restrict terms_a = g_out + sz.D;
  acc_t* __restrict terms_x = terms_a + sz.D;
  acc_t* __restrict terms_y = terms_x + sz.D;
  acc_t* __restrict value_scale = terms_y + sz.D;
  const acc_t nan = msda::quiet_nan<acc_t>();
  coord_t* grad_loc = args.grad_sampling_locations;
  coord_t* grad_attn = args.grad_attention_weights;
  for (int64_t head = begin; head < end; ++head) {
    const int64_t n = head / sz.M;
    const int64_t m = head % sz.M;
    const int64_t head_offset = n * sz.S * token_stride + m * sz.D;
    for (int64_t q = 0; q < sz.Q; ++q) {
      const int64_t nqm = (n * sz.Q + q) * sz.M + m;
      const scalar_t* go = args.grad_output + (n * sz.Q + q) * token_stride + m * sz.D;
      for (int64_t d = 0; d < sz.D; ++d) g_out[d] = static_cast<acc_t>(go[d]);
      for (int64_t l = 0; l < sz.L; ++l) {
        const int64_t level_offset = head_offset + levels.start[l] * token_stride;
        for (int64_t p = 0; p < sz.P; ++p) {
          const int64_t point = nqm * points + l * sz.P + p;
          const Bilinear<acc_t, int64_t> b(
              static_cast<acc_t>(args.sampling_locations[2 * point]),
              static_cast<acc_t>(args.sampling_locations[2 * point + 1]), levels.height[l],
              levels.width[l]);
          if (!b.finite) {
            grad_attn[point] = static_cast<coord_t>(nan);
            grad_loc[2 * point] = static_cast<coord_t>(nan);
            grad_loc[2 * point + 1] = static_cast<coord_t>(nan);
            continue;
          }
          if (!b.inside) {
            grad_attn[point] = coord_t(0);
            grad_loc[2 * point] = coord_t(0);
            grad_loc[2 * point + 1] = coord_t(0);
            continue;
          }
          const acc_t a = static_cast<acc_t>(args.attention_weights[point]);
          const Corners<scalar_t, acc_t> corners(b, args.value + level_offset, token_stride,
                                                 zeros.data());
          const scalar_t* __restrict v0 = corners.row[0];
          const scalar_t* __restrict v1 = corners.row[1];
          const scalar_t* __restrict v2 = corners.row[2];
          const scalar_t* __restrict v3 = corners.row[3];
          for (int64_t d = 0; d < sz.D; ++d) {
            const auto g = msda::channel_grads(b, a, g_out[d], static_cast<acc_t>(v0[d]),
                                               static_cast<acc_t>(v1[d]),
                                               static_cast<acc_t>(v2[d]),
                                               static_cast<acc_t>(v3[d]));
            terms_a[d] = g.attention_weight;
            terms_x[d] = g.x;
            terms_y[d] = g.y;
            value_scale[d] = g.value_scale;
          }
          for (int c = 0; c < 4; ++c) {
            if (!b.valid[c]) continue;
            acc_t* __restrict gv = args.grad_value + level_offset + b.offset[c] * token_stride;
            for (int64_t d = 0; d < sz.D; ++d) {
              gv[d] += msda::corner_value_grad(b, c, value_scale[d]);
            }
          }
          grad_attn[point] = static_cast<coord_t>(fixed_order_sum(terms_a, sz.D));
          grad_loc[2 * point] = static_cast<coord_t>(
              msda::location_grad(fixed_order_sum(terms_x, sz.D), levels.width[l]));
          grad_loc[2 * point + 1] = static_cast<coord_t>(
              msda::location_grad(fixed_order_sum(terms_y, sz.D), levels.height[l]));
        }
      }
    }
  }
}

// Two builds of each: the baseline of the architecture, and (x86, GCC or Clang) one that may
// use AVX2 for the channel loops, picked at run time when the CPU has it. The same operations in
// the same order (no FMA: -ffp-contract=off, and "fma" is not targeted), so the same bits.
template <typename scalar_t, typename coord_t>
void forward_triples_baseline(const ForwardArgs<scalar_t, coord_t>& args, int64_t begin,
                              int64_t end) {
  msda::forward_triples<scalar_t, coord_t, at::opmath_type<scalar_t>>(args, begin, end);
}

template <typename scalar_t, typename coord_t>
void backward_heads_baseline(const BackwardArgs<scalar_t, coord_t>& args, int64_t begin,
                             int64_t end) {
  backward_heads(args, begin, end);
}

#ifdef PSF_HAVE_AVX2_VARIANT
template <typename scalar_t, typename coord_t>
__attribute__((target("avx2"))) void forward_triples_avx2(
    const ForwardArgs<scalar_t, coord_t>& args, int64_t begin, int64_t end) {
  msda::forward_triples<scalar_t, coord_t, at::opmath_type<scalar_t>>(args, begin, end);
}

template <typename scalar_t, typename coord_t>
__attribute__((target("avx2"))) void backward_heads_avx2(
    const BackwardArgs<scalar_t, coord_t>& args, int64_t begin, int64_t end) {
  backward_heads(args, begin, end);
}
#endif

template <typename scalar_t, typename coord_t>
void forward_kernel(const ForwardArgs<scalar_t, coord_t>& args) {
  auto work = &forward_triples_baseline<scalar_t, coord_t>;
#ifdef PSF_HAVE_AVX2_VARIANT
  if (use_avx2()) work = &forward_triples_avx2<scalar_t, coord_t>;
#endif
  // Triples in (n, m, q) order, q fastest: a thread's contiguous range stays in few heads.
  const int64_t triples = args.sz.N * args.sz.M * args.sz.Q;
  at::parallel_for(0, triples, 16,
                   [&](int64_t begin, int64_t end) { work(args, begin, end); });
}

template <typename scalar_t, typename coord_t>
void backward_kernel(const BackwardArgs<scalar_t, coord_t>& args) {
  auto work = &backward_heads_baseline<scalar_t, coord_t>;
#ifdef PSF_HAVE_AVX2_VARIANT
  if (use_avx2()) work = &backward_heads_avx2<scalar_t, coord_t>;
#endif
  // One (n, m) head per task: the only writer of grad_value[n, :, m, :].
  at::parallel_for(0, args.sz.N * args.sz.M, 1,
                   [&](int64_t begin, int64_t end) { work(args, begin, end); });
}

struct ForwardLauncher {
  at::Tensor value, sampling_locations, attention_weights;
  at::Tensor& output;
  const Levels& levels;
  const Sizes& sz;

  template <typename scalar_t, typename coord_t>
  void operator()() const {
    const msda::LevelShapes shapes{levels.height.data(), levels.width.data(),
                                   levels.start.data()};
    forward_kernel<scalar_t, coord_t>({value.data_ptr<scalar_t>(),
                                       sampling_locations.data_ptr<coord_t>(),
                                       attention_weights.data_ptr<coord_t>(),
                                       output.data_ptr<scalar_t>(), shapes, sz});
  }
};

struct BackwardLauncher {
  at::Tensor value, sampling_locations, attention_weights, grad_output;
  at::Tensor& grad_value_acc;
  at::Tensor& grad_sampling_locations;
  at::Tensor& grad_attention_weights;
  const Levels& levels;
  const Sizes& sz;

  template <typename scalar_t, typename coord_t>
  void operator()() const {
    backward_kernel<scalar_t, coord_t>(
        {value.data_ptr<scalar_t>(), sampling_locations.data_ptr<coord_t>(),
         attention_weights.data_ptr<coord_t>(), grad_output.data_ptr<scalar_t>(),
         grad_value_acc.data_ptr<at::opmath_type<scalar_t>>(),
         grad_sampling_locations.data_ptr<coord_t>(), grad_attention_weights.data_ptr<coord_t>(),
         &levels, sz});
  }
};

}  // namespace

at::Tensor ms_deform_attn_cpu_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const Levels levels = check_inputs("ms_deform_attn (CPU)", c10::DeviceType::CPU, value,
                                     spatial_shapes, level_start_index, sampling_locations,
                                     attention_weights);
  const Sizes sz = make_sizes(value, sampling_locations);
  auto output = at::empty({sz.N, sz.Q, sz.M * sz.D}, value.options());
  if (output.numel() > 0) {
    dispatch_dtypes(value.scalar_type(), sampling_locations.scalar_type(),
                    ForwardLauncher{value.contiguous(), sampling_locations.contiguous(),
                                    attention_weights.contiguous(), output, levels, sz});
  }
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_cpu_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  const Levels levels = check_backward_inputs("ms_deform_attn_backward (CPU)",
                                              c10::DeviceType::CPU, value, spatial_shapes,
                                              level_start_index, sampling_locations,
                                              attention_weights, grad_output);
  const Sizes sz = make_sizes(value, sampling_locations);
  // grad_value is accumulated in opmath precision and cast back at the end (a no-op for
  // float32 and float64, which accumulate in place).
  auto grad_value_acc = at::zeros(
      value.sizes(), value.options().dtype(at::toOpMathType(value.scalar_type())));
  auto grad_sampling_locations = at::empty(sampling_locations.sizes(),
                                           sampling_locations.options());
  auto grad_attention_weights = at::empty(attention_weights.sizes(), attention_weights.options());
  if (attention_weights.numel() > 0) {
    dispatch_dtypes(value.scalar_type(), sampling_locations.scalar_type(),
                    BackwardLauncher{value.contiguous(), sampling_locations.contiguous(),
                                     attention_weights.contiguous(), grad_output.contiguous(),
                                     grad_value_acc, grad_sampling_locations,
                                     grad_attention_weights, levels, sz});
  }
  auto grad_value = grad_value_acc.scalar_type() == value.scalar_type()
                        ? grad_value_acc
                        : grad_value_acc.to(value.scalar_type());
  return {grad_value, grad_sampling_locations, grad_attention_weights};
}

TORCH_LIBRARY_IMPL(panoptic_segformer, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cpu_forward);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_cpu_backward);
}

}  // namespace panoptic_segformer
