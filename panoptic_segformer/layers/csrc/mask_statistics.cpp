// Fused CPU post-processing of query masks: bilinear resize, binarisation and the statistics
// of mask-wise merging in one pass, so the resized float masks are never written to memory.
//
// For every query mask (h, w) -> (H, W) it writes
//   binary (H, W)  value > threshold
//   area           pixels of binary
//   inside         sum of the values of those pixels
//   rows (H), cols (W)  whether a row / column holds a pixel of binary,
// where value is the bilinear resize of F.interpolate(mode="bilinear", align_corners=False),
// computed by one fixed sequence of float32 operations (see `bilinear_axis` and `blend`): no
// fused multiply-adds (the build passes -ffp-contract=off), no reassociation. Every build on every
// CPU therefore gives the same bits, whatever PyTorch release is installed; F.interpolate itself
// rounds differently between releases and CPU capabilities, so the two agree to a few float32
// ulps, not bit for bit. The sums of `inside` use a fixed association too.
// The Python caller (panoptic_segformer/modeling/postprocessing.py) checks the arguments with
// friendlier messages first and falls back to PyTorch operations where this is unavailable.

#include "mask_statistics.h"

#include "cpu_features.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace panoptic_segformer {
namespace {

// Source indices and weights of one resized axis (align_corners=False): output index i reads
// source (i + 0.5) * in / out - 0.5, clamped at 0, between input indices i0 and i1 = i0 + 1 (or
// i0 at the last index), with weights 1 - lambda and lambda. All in float32, one rounding per
// operation; tests/modeling/test_mask_statistics.py re-derives this in PyTorch operations.
struct Axis {
  int64_t size_in;
  std::vector<int64_t> index0, index1;
  std::vector<float> weight0, weight1;
};

Axis bilinear_axis(int64_t input_size, int64_t output_size) {
  Axis axis;
  axis.size_in = input_size;
  axis.index0.resize(output_size);
  axis.index1.resize(output_size);
  axis.weight0.resize(output_size);
  axis.weight1.resize(output_size);
  const float scale = static_cast<float>(input_size) / static_cast<float>(output_size);
  for (int64_t i = 0; i < output_size; ++i) {
    float source = scale * (static_cast<float>(i) + 0.5f) - 0.5f;
    source = source < 0.0f ? 0.0f : source;
    const int64_t i0 = std::min(static_cast<int64_t>(std::floor(source)), input_size - 1);
    const float lambda1 = std::min(std::max(source - static_cast<float>(i0), 0.0f), 1.0f);
    axis.index0[i] = i0;
    axis.index1[i] = i0 + (i0 < input_size - 1 ? 1 : 0);
    axis.weight1[i] = lambda1;
    axis.weight0[i] = 1.0f - lambda1;
  }
  return axis;
}

// p * wp + q * wq: two products and a sum, each rounded to float32.
inline float blend(float p, float wp, float q, float wq) { return p * wp + q * wq; }

// Lanes of the partial sums of `inside` along a row: element x goes to lane x % kLanes, the lanes
// are added in order at the end of the row. A fixed association, so the sum does not depend on
// the vector width the compiler picks; each lane sums at most W / kLanes values in float32.
constexpr int kLanes = 8;

// The pointers and sizes one query's work reads and writes.
struct QueryArgs {
  const float* mask;      // (h, w) input
  int64_t in_h;
  int64_t height, width;  // output size
  const Axis* ys;
  const Axis* xs;
  float limit;
  float* widened;         // (h, W) scratch: the input rows resized along the width
  float* values;          // (W) scratch: one output row
  uint8_t* binary;        // (H, W) out
  uint8_t* rows;          // (H) out
  uint8_t* cols;          // (W) out, zeroed by the caller
  int64_t* area;
  double* inside;
};

#if defined(__GNUC__)
#define PSF_ALWAYS_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define PSF_ALWAYS_INLINE __forceinline
#else
#define PSF_ALWAYS_INLINE inline
#endif

// One query, written as short loops the compiler vectorises; inlined into the two entry points
// below, which differ only in the instruction set they may use (not in the results).
PSF_ALWAYS_INLINE void resize_query(const QueryArgs& a) {
  const int64_t width = a.width;
  const Axis& xs = *a.xs;
  const Axis& ys = *a.ys;
  const int64_t in_w = xs.size_in;
  for (int64_t r = 0; r < a.in_h; ++r) {
    const float* __restrict src = a.mask + r * in_w;
    float* __restrict dst = a.widened + r * width;
    for (int64_t x = 0; x < width; ++x) {
      dst[x] = blend(src[xs.index0[x]], xs.weight0[x], src[xs.index1[x]], xs.weight1[x]);
    }
  }
  int64_t area = 0;
  double inside = 0.0;
  float* __restrict values = a.values;
  uint8_t* __restrict cols = a.cols;
  const int64_t full = width - width % kLanes;
  for (int64_t y = 0; y < a.height; ++y) {
    const float* __restrict top = a.widened + ys.index0[y] * width;
    const float* __restrict bottom = a.widened + ys.index1[y] * width;
    const float w0 = ys.weight0[y], w1 = ys.weight1[y];
    uint8_t* __restrict out = a.binary + y * width;
    for (int64_t x = 0; x < width; ++x) {
      values[x] = blend(top[x], w0, bottom[x], w1);
    }
    int32_t row_area = 0;
    float lanes[kLanes] = {};
    for (int64_t x0 = 0; x0 < full; x0 += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const float v = values[x0 + j];
        lanes[j] += v > a.limit ? v : 0.0f;
      }
    }
    for (int64_t x = full; x < width; ++x) {
      lanes[x - full] += values[x] > a.limit ? values[x] : 0.0f;
    }
    for (int64_t x = 0; x < width; ++x) {
      out[x] = values[x] > a.limit;
    }
    for (int64_t x = 0; x < width; ++x) {
      row_area += out[x];
      cols[x] |= out[x];
    }
    double row_inside = 0.0;
    for (int j = 0; j < kLanes; ++j) row_inside += lanes[j];
    a.rows[y] = row_area > 0;
    area += row_area;
    inside += row_inside;
  }
  *a.area = area;
  *a.inside = inside;
}

void resize_query_baseline(const QueryArgs& a) { resize_query(a); }

#ifdef PSF_HAVE_AVX2_VARIANT
// Wider vectors, the same operations: identical results (no "fma" target, and
// -ffp-contract=off in any case).
__attribute__((target("avx2"))) void resize_query_avx2(const QueryArgs& a) { resize_query(a); }
#endif

}  // namespace

std::vector<at::Tensor> resized_mask_statistics(const at::Tensor& masks, int64_t height,
                                                int64_t width, double threshold, bool use_avx2) {
  TORCH_CHECK(masks.device().is_cpu() && masks.scalar_type() == at::kFloat && masks.dim() == 3,
              "resized_mask_statistics: masks must be a float32 (Q, h, w) CPU tensor, got ",
              masks.scalar_type(), " ", masks.sizes(), " on ", masks.device());
  TORCH_CHECK(height > 0 && width > 0,
              "resized_mask_statistics: the output size must be positive, got ", height, "x",
              width);
  TORCH_CHECK(!use_avx2 || avx2_supported(),
              "resized_mask_statistics: use_avx2=True but this CPU or build has no AVX2 variant");
  const auto input = masks.contiguous();
  const int64_t num_queries = input.size(0), in_h = input.size(1), in_w = input.size(2);
  TORCH_CHECK(in_h > 0 && in_w > 0, "resized_mask_statistics: masks must not be empty, got ",
              input.sizes());
  const auto bool_options = input.options().dtype(at::kBool);
  auto binary = at::empty({num_queries, height, width}, bool_options);
  auto rows = at::empty({num_queries, height}, bool_options);
  auto cols = at::zeros({num_queries, width}, bool_options);
  auto areas = at::empty({num_queries}, input.options().dtype(at::kLong));
  auto inside = at::empty({num_queries}, input.options().dtype(at::kDouble));

  const Axis ys = bilinear_axis(in_h, height), xs = bilinear_axis(in_w, width);
  const float* source = input.data_ptr<float>();
  // bool tensors hold one byte, 0 or 1, per element
  auto* binary_data = reinterpret_cast<uint8_t*>(binary.data_ptr<bool>());
  auto* rows_data = reinterpret_cast<uint8_t*>(rows.data_ptr<bool>());
  auto* cols_data = reinterpret_cast<uint8_t*>(cols.data_ptr<bool>());
  int64_t* areas_data = areas.data_ptr<int64_t>();
  double* inside_data = inside.data_ptr<double>();

  at::parallel_for(0, num_queries, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> widened(static_cast<size_t>(in_h * width));
    std::vector<float> values(static_cast<size_t>(width));
    for (int64_t q = begin; q < end; ++q) {
      const QueryArgs args{source + q * in_h * in_w, in_h, height, width, &ys, &xs,
                           static_cast<float>(threshold), widened.data(), values.data(),
                           binary_data + q * height * width, rows_data + q * height,
                           cols_data + q * width, areas_data + q, inside_data + q};
#ifdef PSF_HAVE_AVX2_VARIANT
      if (use_avx2) {
        resize_query_avx2(args);
        continue;
      }
#endif
      resize_query_baseline(args);
    }
  });
  return {binary, areas, inside, rows, cols};
}

}  // namespace panoptic_segformer

