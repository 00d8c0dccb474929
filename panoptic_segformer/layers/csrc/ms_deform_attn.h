// Multi-scale deformable attention: declarations shared by the CUDA kernels and the bindings.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace panoptic_segformer {

// Levels a call may have: the level shapes are passed to the kernel by value.
constexpr int kMaxLevels = 16;
// Channels one lane handles (D <= 32 * kMaxChunks, i.e. up to 256 channels per head).
constexpr int kMaxChunks = 8;

// value (N, S, M, D); spatial_shapes (L, 2) and level_start_index (L,) int64 on the CPU;
// sampling_locations (N, Q, M, L, P, 2); attention_weights (N, Q, M, L, P). Returns (N, Q, M*D).
at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights);

// Returns {grad_value, grad_sampling_locations, grad_attention_weights}.
std::vector<at::Tensor> ms_deform_attn_cuda_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output);

}  // namespace panoptic_segformer
