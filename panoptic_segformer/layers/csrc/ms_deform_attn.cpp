// Python bindings of the CUDA multi-scale deformable attention, with the argument checks that
// keep a direct caller from reading out of bounds. The Python wrapper
// (panoptic_segformer/layers/ms_deform_attn_func.py) validates with friendlier messages first.

#include <torch/extension.h>

#include <limits>

#include "ms_deform_attn.h"

namespace panoptic_segformer {
namespace {

void check_cuda_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "ms_deform_attn: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "ms_deform_attn: ", name, " must be contiguous");
}

void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                  const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                  const at::Tensor& attention_weights) {
  check_cuda_contiguous(value, "value");
  check_cuda_contiguous(sampling_locations, "sampling_locations");
  check_cuda_contiguous(attention_weights, "attention_weights");
  TORCH_CHECK(sampling_locations.device() == value.device() &&
                  attention_weights.device() == value.device(),
              "ms_deform_attn: value, sampling_locations and attention_weights must be on one "
              "device, got ", value.device(), ", ", sampling_locations.device(), ", ",
              attention_weights.device());
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got ",
              value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (N, Q, M, L, P, 2), got ",
              sampling_locations.sizes());
  TORCH_CHECK(sampling_locations.scalar_type() == attention_weights.scalar_type(),
              "ms_deform_attn: sampling_locations and attention_weights must share a dtype");
  const auto n = value.size(0), m = value.size(2), d = value.size(3);
  const auto q = sampling_locations.size(1), l = sampling_locations.size(3),
             p = sampling_locations.size(4);
  TORCH_CHECK(sampling_locations.size(0) == n && sampling_locations.size(2) == m,
              "ms_deform_attn: sampling_locations ", sampling_locations.sizes(),
              " does not match value ", value.sizes());
  TORCH_CHECK(attention_weights.sizes() == at::IntArrayRef({n, q, m, l, p}),
              "ms_deform_attn: attention_weights must be ", at::IntArrayRef({n, q, m, l, p}),
              ", got ", attention_weights.sizes());
  TORCH_CHECK(l >= 1 && l <= kMaxLevels, "ms_deform_attn: the CUDA kernel takes 1 to ",
              kMaxLevels, " levels, got ", l);
  TORCH_CHECK(d >= 1 && d <= 32 * kMaxChunks, "ms_deform_attn: the CUDA kernel takes 1 to ",
              32 * kMaxChunks, " channels per head, got ", d);
  TORCH_CHECK(!spatial_shapes.is_cuda() && !level_start_index.is_cuda(),
              "ms_deform_attn: spatial_shapes and level_start_index must be CPU tensors");
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong &&
                  level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == l &&
                  spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (", l, ", 2), got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == l,
              "ms_deform_attn: level_start_index must be (", l, ",), got ",
              level_start_index.sizes());
  const auto hw = spatial_shapes.accessor<int64_t, 2>();
  const auto start = level_start_index.accessor<int64_t, 1>();
  int64_t tokens = 0;
  for (int64_t i = 0; i < l; ++i) {
    TORCH_CHECK(hw[i][0] >= 1 && hw[i][1] >= 1, "ms_deform_attn: level ", i,
                " has a non-positive shape (", hw[i][0], ", ", hw[i][1], ")");
    TORCH_CHECK(start[i] == tokens, "ms_deform_attn: level_start_index[", i, "] is ", start[i],
                " but the levels before it hold ", tokens, " tokens");
    tokens += hw[i][0] * hw[i][1];
  }
  TORCH_CHECK(tokens == value.size(1), "ms_deform_attn: spatial_shapes cover ", tokens,
              " tokens but value has S = ", value.size(1));
  // The kernels index one batch element's tokens with 32-bit integers.
  TORCH_CHECK(tokens * m * d <= std::numeric_limits<int32_t>::max(),
              "ms_deform_attn: S * M * D = ", tokens * m * d, " is too large for the CUDA kernel");
}

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                   const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                   const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  return ms_deform_attn_cuda_forward(value, spatial_shapes, level_start_index, sampling_locations,
                                     attention_weights);
}

std::vector<at::Tensor> backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index,
                                 const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights,
                                 const at::Tensor& grad_output) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_cuda_contiguous(grad_output, "grad_output");
  TORCH_CHECK(grad_output.device() == value.device(), "ms_deform_attn: grad_output is on ",
              grad_output.device(), " but value is on ", value.device());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(),
              "ms_deform_attn: grad_output must have the dtype of value");
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({value.size(0), sampling_locations.size(1),
                                                      value.size(2) * value.size(3)}),
              "ms_deform_attn: grad_output has the wrong shape ", grad_output.sizes());
  return ms_deform_attn_cuda_backward(value, spatial_shapes, level_start_index,
                                      sampling_locations, attention_weights, grad_output);
}

}  // namespace
}  // namespace panoptic_segformer

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA multi-scale deformable attention (panoptic_segformer)";
  m.def("ms_deform_attn_forward", &panoptic_segformer::forward,
        "forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)");
  m.def("ms_deform_attn_backward", &panoptic_segformer::backward,
        "backward(value, spatial_shapes, level_start_index, sampling_locations, "
        "attention_weights, grad_output) -> [grad_value, grad_sampling_locations, "
        "grad_attention_weights]");
}
