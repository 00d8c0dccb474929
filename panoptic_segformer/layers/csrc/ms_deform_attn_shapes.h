// Multi-scale deformable attention: the checks of the sizes and of the level table that every
// kernel indexes with, free of ATen, so that the PyTorch operator (ms_deform_attn_checks.cpp, for
// its CPU and CUDA kernels) and the ONNX Runtime operator (deploy/csrc/ms_deform_attn_ort.cpp)
// refuse the same inputs.
//
// Sizes come from tensors, but a tensor with a zero dimension may declare any other sizes, and
// the level table (H, W per level) is data: a level of 2^32 x 2^32 makes H * W wrap to 0 in
// int64, so that a sum of level sizes could match a small value while the kernels index far past
// it. Every product here is computed with an overflow check, each level is non-empty and bounded
// by value's token count S, and each start is the running total.
//
// Shape shorthand: N batch, S value tokens, M heads, D channels per head, Q queries, L levels,
// P points per level and head.

#pragma once

#include <cstdint>
#include <limits>
#include <string>

namespace panoptic_segformer {
namespace msda {

// *out = a * b for non-negative a, b; false when it does not fit in int64.
inline bool checked_mul(int64_t a, int64_t b, int64_t* out) {
  if (a < 0 || b < 0) return false;
  if (a != 0 && b > std::numeric_limits<int64_t>::max() / a) return false;
  *out = a * b;
  return true;
}

// Whether the product of the non-zero sizes among n fits in int64; then so does the product of
// any of them, which is what the kernels compute as offsets (a zero dimension would otherwise
// hide an overflow of the others, e.g. M * D of an output (0, Q, M * D)).
inline bool product_fits(const int64_t* sizes, int n) {
  int64_t product = 1;
  for (int i = 0; i < n; ++i) {
    if (sizes[i] != 0 && !checked_mul(product, sizes[i], &product)) return false;
  }
  return true;
}

// Why the sizes cannot be indexed in int64, or "" when they can: value (N, S, M, D),
// sampling_locations (N, Q, M, L, P, 2) and the output (N, Q, M * D).
inline std::string index_overflow(int64_t n, int64_t s, int64_t m, int64_t d, int64_t q,
                                  int64_t l, int64_t p) {
  const int64_t value[] = {n, s, m, d};
  const int64_t locations[] = {n, q, m, l, p, 2};
  const int64_t output[] = {n, q, m, d};
  if (!product_fits(value, 4)) return "N * S * M * D overflows int64";
  if (!product_fits(locations, 6)) return "N * Q * M * L * P * 2 overflows int64";
  if (!product_fits(output, 4)) return "N * Q * M * D overflows int64";
  return "";
}

// Why the level table does not describe value's S tokens, or "" when it does: every level
// non-empty, each H * W and the running total within S (computed without overflow), each start
// equal to the tokens of the levels before it, and the levels covering S exactly. `shapes` holds
// (H, W) per level, row-major.
inline std::string level_error(const int64_t* shapes, const int64_t* starts, int64_t levels,
                               int64_t s) {
  int64_t tokens = 0;
  for (int64_t l = 0; l < levels; ++l) {
    const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
    const std::string level = "spatial_shapes[" + std::to_string(l) + "] = (" +
                              std::to_string(h) + ", " + std::to_string(w) + ")";
    if (h < 1 || w < 1) return level + " must be positive";
    if (starts[l] != tokens) {
      return "level_start_index[" + std::to_string(l) + "] = " + std::to_string(starts[l]) +
             " but the levels before it hold " + std::to_string(tokens) + " tokens";
    }
    int64_t size = 0;
    if (!checked_mul(h, w, &size) || size > s - tokens) {
      return level + " holds more tokens than the " + std::to_string(s - tokens) +
             " value has left after the levels before it (S = " + std::to_string(s) + ")";
    }
    tokens += size;
  }
  if (tokens != s) {
    return "spatial_shapes cover " + std::to_string(tokens) + " tokens but value has S = " +
           std::to_string(s);
  }
  return "";
}

}  // namespace msda
}  // namespace panoptic_segformer
