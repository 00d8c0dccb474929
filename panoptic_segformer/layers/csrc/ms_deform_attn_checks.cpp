// Argument checks of the multi-scale deformable attention operator, shared by its CPU and CUDA
// kernels (compiled into both extensions).

#include "ms_deform_attn.h"

#include <string>
#include <utility>
#include <vector>

#include "ms_deform_attn_shapes.h"

namespace panoptic_segformer {

Levels check_inputs(const char* kernel, c10::DeviceType device_type, const at::Tensor& value,
                    const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                    const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{value, "value"},
                                {sampling_locations, "sampling_locations"},
                                {attention_weights, "attention_weights"}}) {
    TORCH_CHECK(t.device().type() == device_type, kernel, ": ", name, " must be a ",
                c10::DeviceTypeName(device_type), " tensor, got one on ", t.device());
  }
  TORCH_CHECK(sampling_locations.device() == value.device() &&
                  attention_weights.device() == value.device(),
              kernel, ": value, sampling_locations and attention_weights must be on one device, "
              "got ", value.device(), ", ", sampling_locations.device(), ", ",
              attention_weights.device());
  TORCH_CHECK(value.dim() == 4, kernel, ": value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2, kernel,
              ": sampling_locations must be (N, Q, M, L, P, 2), got ", sampling_locations.sizes());
  const int64_t n = value.size(0), m = value.size(2), d = value.size(3);
  const int64_t q = sampling_locations.size(1), l = sampling_locations.size(3),
                p = sampling_locations.size(4);
  TORCH_CHECK(m >= 1 && d >= 1, kernel, ": value must have at least one head and channel, got ",
              value.sizes());
  TORCH_CHECK(sampling_locations.size(0) == n && sampling_locations.size(2) == m, kernel,
              ": sampling_locations ", sampling_locations.sizes(),
              " must have the batch size and head count of value ", value.sizes());
  TORCH_CHECK(attention_weights.sizes() == at::IntArrayRef({n, q, m, l, p}), kernel,
              ": attention_weights must be (N, Q, M, L, P) = ", at::IntArrayRef({n, q, m, l, p}),
              ", got ", attention_weights.sizes());
  TORCH_CHECK(l >= 1, kernel, ": sampling_locations must have at least one level, got ",
              sampling_locations.sizes());
  for (const auto& [t, name] :
       {std::pair<const at::Tensor&, const char*>{spatial_shapes, "spatial_shapes"},
        {level_start_index, "level_start_index"}}) {
    TORCH_CHECK(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), kernel, ": ", name,
                " must be an integer tensor, got ", t.scalar_type());
  }
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == l &&
                  spatial_shapes.size(1) == 2,
              kernel, ": spatial_shapes must be (L, 2) = (", l, ", 2), got ",
              spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == l, kernel,
              ": level_start_index must be (L,) = (", l, ",), got ", level_start_index.sizes());

  const std::string overflow = msda::index_overflow(n, value.size(1), m, d, q, l, p);
  TORCH_CHECK(overflow.empty(), kernel, ": ", overflow, " (value ", value.sizes(),
              ", sampling_locations ", sampling_locations.sizes(), ")");

  // Read on the host (a synchronisation if the caller keeps them on a GPU).
  const auto shapes = spatial_shapes.to(at::kCPU, at::kLong).contiguous();
  const auto starts = level_start_index.to(at::kCPU, at::kLong).contiguous();
  const int64_t* hw = shapes.data_ptr<int64_t>();
  const int64_t* start = starts.data_ptr<int64_t>();
  const std::string error = msda::level_error(hw, start, l, value.size(1));
  TORCH_CHECK(error.empty(), kernel, ": ", error);
  Levels levels;
  for (int64_t i = 0; i < l; ++i) {
    levels.height.push_back(hw[2 * i]);
    levels.width.push_back(hw[2 * i + 1]);
    levels.start.push_back(start[i]);
  }
  return levels;
}

Levels check_backward_inputs(const char* kernel, c10::DeviceType device_type,
                             const at::Tensor& value, const at::Tensor& spatial_shapes,
                             const at::Tensor& level_start_index,
                             const at::Tensor& sampling_locations,
                             const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  Levels levels = check_inputs(kernel, device_type, value, spatial_shapes, level_start_index,
                               sampling_locations, attention_weights);
  TORCH_CHECK(grad_output.device() == value.device(), kernel, ": grad_output is on ",
              grad_output.device(), " but value is on ", value.device());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(), kernel,
              ": grad_output must have the dtype of value (", value.scalar_type(), "), got ",
              grad_output.scalar_type());
  const std::vector<int64_t> expected{value.size(0), sampling_locations.size(1),
                                      value.size(2) * value.size(3)};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(expected), kernel,
              ": grad_output must be (N, Q, M * D) = ", at::IntArrayRef(expected), ", got ",
              grad_output.sizes());
  return levels;
}

}  // namespace panoptic_segformer
