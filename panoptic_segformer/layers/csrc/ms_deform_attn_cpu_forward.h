// Multi-scale deformable attention: the CPU forward pass over a range of (n, m, q) triples, free
// of ATen, so that two hosts run the same loop: the PyTorch CPU kernel (ms_deform_attn_cpu.cpp)
// and the ONNX Runtime custom operator (panoptic_segformer/deploy/csrc/ms_deform_attn_ort.cpp).
// Both split the triples over their thread pools and compile this loop for the baseline and for
// AVX2 (same operations in the same order, no FMA), so they give the same bits.
//
// Shape shorthand: N batch, S flattened value tokens over all levels, M heads, D channels per
// head, Q queries, L levels, P sampling points per level and head. value (N, S, M, D),
// sampling_locations (N, Q, M, L, P, 2), attention_weights (N, Q, M, L, P), output (N, Q, M * D).

#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ms_deform_attn_math.h"

namespace panoptic_segformer {
namespace msda {

struct Sizes {
  int64_t N, S, M, D, Q, L, P;
};

// Per level l: height[l], width[l] and its first token start[l] in value's S axis.
struct LevelShapes {
  const int64_t* height;
  const int64_t* width;
  const int64_t* start;
};

// The four corner rows of one sampling point in one head (D channels each): rows of value for
// corners on the map, a row of zeros for the others.
template <typename scalar_t, typename acc_t>
struct Corners {
  const scalar_t* row[4];

  PSF_INLINE Corners(const Bilinear<acc_t, int64_t>& b, const scalar_t* value_level,
                     int64_t token_stride, const scalar_t* zeros) {
    for (int c = 0; c < 4; ++c) {
      row[c] = b.valid[c] ? value_level + b.offset[c] * token_stride : zeros;
    }
  }
};

template <typename scalar_t, typename coord_t>
struct ForwardArgs {
  const scalar_t* value;
  const coord_t* sampling_locations;
  const coord_t* attention_weights;
  scalar_t* output;
  LevelShapes levels;
  Sizes sz;
};

// Triples [begin, end) of the forward pass, in (n, m, q) order, q fastest, accumulated in acc_t.
template <typename scalar_t, typename coord_t, typename acc_t>
PSF_INLINE void forward_triples(const ForwardArgs<scalar_t, coord_t>& args, int64_t begin,
                                int64_t end) {
  const Sizes& sz = args.sz;
  const LevelShapes& levels = args.levels;
  const int64_t token_stride = sz.M * sz.D;  // one S step in value
  const int64_t points = sz.L * sz.P;        // per (n, q, m)
  std::vector<acc_t> acc_buffer(sz.D);
  const std::vector<scalar_t> zeros(sz.D, scalar_t(0));
  acc_t* __restrict acc = acc_buffer.data();
  for (int64_t t = begin; t < end; ++t) {
    const int64_t q = t % sz.Q;
    const int64_t m = (t / sz.Q) % sz.M;
    const int64_t n = t / (sz.Q * sz.M);
    const int64_t nqm = (n * sz.Q + q) * sz.M + m;
    const coord_t* loc = args.sampling_locations + nqm * points * 2;
    const coord_t* attn = args.attention_weights + nqm * points;
    const scalar_t* value_head = args.value + n * sz.S * token_stride + m * sz.D;
    std::fill(acc, acc + sz.D, acc_t(0));
    bool poisoned = false;
    for (int64_t l = 0; l < sz.L; ++l) {
      const scalar_t* value_level = value_head + levels.start[l] * token_stride;
      for (int64_t p = 0; p < sz.P; ++p, loc += 2, ++attn) {
        const Bilinear<acc_t, int64_t> b(static_cast<acc_t>(loc[0]), static_cast<acc_t>(loc[1]),
                                         levels.height[l], levels.width[l]);
        const acc_t a = static_cast<acc_t>(*attn);
        if (!b.inside) {
          poisoned = poisoned || outside_point_poisons(b, a);
          continue;
        }
        const Corners<scalar_t, acc_t> corners(b, value_level, token_stride, zeros.data());
        const scalar_t* __restrict v0 = corners.row[0];
        const scalar_t* __restrict v1 = corners.row[1];
        const scalar_t* __restrict v2 = corners.row[2];
        const scalar_t* __restrict v3 = corners.row[3];
        for (int64_t d = 0; d < sz.D; ++d) {
          acc[d] += a * interpolate(b, static_cast<acc_t>(v0[d]), static_cast<acc_t>(v1[d]),
                                    static_cast<acc_t>(v2[d]), static_cast<acc_t>(v3[d]));
        }
      }
    }
    // output (N, Q, M * D)
    scalar_t* out = args.output + (n * sz.Q + q) * token_stride + m * sz.D;
    const acc_t nan = quiet_nan<acc_t>();
    for (int64_t d = 0; d < sz.D; ++d) {
      out[d] = static_cast<scalar_t>(poisoned ? nan : acc[d]);
    }
  }
}

}  // namespace msda
}  // namespace panoptic_segformer
