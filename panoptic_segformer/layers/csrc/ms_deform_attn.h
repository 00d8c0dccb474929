// Multi-scale deformable attention: the operator's host-side pieces shared by its CPU and CUDA
// kernels (argument checks, level shapes, dtype dispatch) and the kernels' entry points.
//
// The operator is registered with PyTorch's dispatcher as
//   panoptic_segformer::ms_deform_attn(value, spatial_shapes, level_start_index,
//                                      sampling_locations, attention_weights) -> output
//   panoptic_segformer::ms_deform_attn_backward(..., grad_output)
//       -> (grad_value, grad_sampling_locations, grad_attention_weights)
// (schema in ms_deform_attn_op.cpp, CPU kernels in ms_deform_attn_cpu.cpp, CUDA kernels in
// ms_deform_attn_cuda.cu); its fake (shape) implementation and autograd formula are registered
// from Python (panoptic_segformer/layers/ms_deform_attn_func.py).
//
// Shapes: value (N, S, M, D); spatial_shapes (L, 2) integer (H, W) per level; level_start_index
// (L,) integer; sampling_locations (N, Q, M, L, P, 2); attention_weights (N, Q, M, L, P);
// output (N, Q, M * D). Locations and weights share the value's dtype, or are float32 with a
// float16/bfloat16 value. spatial_shapes and level_start_index may live on any device; they are
// read on the host (a synchronisation when they are on a GPU).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

namespace panoptic_segformer {

// The level shapes on the host, checked against each other and against value.
struct Levels {
  std::vector<int64_t> height, width, start;
  int64_t size() const { return static_cast<int64_t>(height.size()); }
};

// Checks every argument, naming the bad one (the Python wrapper checks first with friendlier
// messages; these keep a direct caller of the operator from reading out of bounds), and returns
// the level shapes. `device_type` is the kernel's: value, locations and weights must be there.
Levels check_inputs(const char* kernel, c10::DeviceType device_type, const at::Tensor& value,
                    const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                    const at::Tensor& sampling_locations, const at::Tensor& attention_weights);

// The checks of check_inputs plus those of grad_output (N, Q, M * D) in the value's dtype.
Levels check_backward_inputs(const char* kernel, c10::DeviceType device_type,
                             const at::Tensor& value, const at::Tensor& spatial_shapes,
                             const at::Tensor& level_start_index,
                             const at::Tensor& sampling_locations,
                             const at::Tensor& attention_weights, const at::Tensor& grad_output);

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
              ", sampling_locations/attention_weights ", coord_type,
              " (value float16/bfloat16/float32/float64; locations and weights of the same dtype, "
              "or float32 with a float16/bfloat16 value)");
}

at::Tensor ms_deform_attn_cpu_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_cpu_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output);

}  // namespace panoptic_segformer
