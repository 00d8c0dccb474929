// Fused CPU post-processing of query masks (mask_statistics.cpp).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace panoptic_segformer {

// masks (Q, h, w) float32 CPU -> {binary (Q, H, W) bool, areas (Q,) int64, inside (Q,) float64,
// rows (Q, H) bool, cols (Q, W) bool}, with the masks bilinearly resized to (H, W); use_avx2 picks
// the AVX2 variant (cpu_features.h).
std::vector<at::Tensor> resized_mask_statistics(const at::Tensor& masks, int64_t height,
                                                int64_t width, double threshold, bool use_avx2);

}  // namespace panoptic_segformer
