// Fused CPU post-processing of query masks: bilinear resize, binarisation and the statistics
// of mask-wise merging in one pass, so the resized float masks are never written to memory.
//
// For every query mask (h, w) -> (H, W), with the arithmetic of PyTorch's CPU
// F.interpolate(mode="bilinear", align_corners=False) (separable: each output pixel is
// t0 * wy0 + t1 * wy1 with t = s0 * wx0 + s1 * wx1 along the width), it writes
//   binary (H, W)  value > threshold
//   area           pixels of binary
//   inside         sum of the values of those pixels (accumulated in float64)
//   rows (H), cols (W)  whether a row / column holds a pixel of binary.
// The Python caller (panoptic_segformer/modeling/postprocessing.py) checks the arguments with
// friendlier messages first and falls back to PyTorch operations where this is unavailable.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace panoptic_segformer {
namespace {

// Source indices and weights of one resized axis, as PyTorch's upsample kernels compute them
// (aten/src/ATen/native/UpSample.h: area_pixel_compute_source_index, guard_index_and_lambda).
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
    if (input_size == output_size) {
      axis.index0[i] = axis.index1[i] = i;
      axis.weight0[i] = 1.0f;
      axis.weight1[i] = 0.0f;
      continue;
    }
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

// One query, with `blend(a, wa, b, wb)` = a * wa + b * wb. Written as short loops the compiler
// vectorises; inlined into the two callers below, which differ in target ISA.
#if defined(__GNUC__)
#define PSF_ALWAYS_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define PSF_ALWAYS_INLINE __forceinline
#else
#define PSF_ALWAYS_INLINE inline
#endif

template <typename Blend>
PSF_ALWAYS_INLINE void resize_query(const QueryArgs& a, Blend blend) {
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
  for (int64_t y = 0; y < a.height; ++y) {
    const float* __restrict top = a.widened + ys.index0[y] * width;
    const float* __restrict bottom = a.widened + ys.index1[y] * width;
    const float w0 = ys.weight0[y], w1 = ys.weight1[y];
    uint8_t* __restrict out = a.binary + y * width;
    for (int64_t x = 0; x < width; ++x) {
      values[x] = blend(top[x], w0, bottom[x], w1);
    }
    int32_t row_area = 0;
    float row_inside = 0.0f;
#pragma omp simd reduction(+ : row_area, row_inside)
    for (int64_t x = 0; x < width; ++x) {
      const bool on = values[x] > a.limit;
      row_area += on;
      row_inside += on ? values[x] : 0.0f;
    }
    for (int64_t x = 0; x < width; ++x) {
      out[x] = values[x] > a.limit;
    }
    for (int64_t x = 0; x < width; ++x) {
      cols[x] |= out[x];
    }
    a.rows[y] = row_area > 0;
    area += row_area;
    inside += row_inside;
  }
  *a.area = area;
  *a.inside = inside;
}

void resize_query_plain(const QueryArgs& a) {
  resize_query(a, [](float p, float wp, float q, float wq) { return p * wp + q * wq; });
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define PSF_HAVE_FMA_VARIANT 1
// PyTorch's AVX2 / AVX-512 kernels compute the blend as fma(p, wp, q * wq): so does this one,
// for the same bits as F.interpolate there.
__attribute__((target("avx2,fma"))) void resize_query_fma(const QueryArgs& a) {
  resize_query(a, [](float p, float wp, float q, float wq) { return std::fma(p, wp, q * wq); });
}
#endif

}  // namespace

bool fma_supported() {
#ifdef PSF_HAVE_FMA_VARIANT
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

std::vector<at::Tensor> resized_mask_statistics(const at::Tensor& masks, int64_t height,
                                                int64_t width, double threshold,
                                                bool fused_multiply_add) {
  TORCH_CHECK(masks.device().is_cpu() && masks.scalar_type() == at::kFloat && masks.dim() == 3,
              "resized_mask_statistics: masks must be a float32 (Q, h, w) CPU tensor, got ",
              masks.scalar_type(), " ", masks.sizes(), " on ", masks.device());
  TORCH_CHECK(height > 0 && width > 0,
              "resized_mask_statistics: the output size must be positive, got ", height, "x",
              width);
  TORCH_CHECK(!fused_multiply_add || fma_supported(),
              "resized_mask_statistics: fused_multiply_add=True but this CPU or build has no "
              "FMA variant");
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
#ifdef PSF_HAVE_FMA_VARIANT
      if (fused_multiply_add) {
        resize_query_fma(args);
        continue;
      }
#endif
      resize_query_plain(args);
    }
  });
  return {binary, areas, inside, rows, cols};
}

}  // namespace panoptic_segformer

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("resized_mask_statistics", &panoptic_segformer::resized_mask_statistics,
        "Bilinear resize, binarisation and statistics of query masks (CPU)", py::arg("masks"),
        py::arg("height"), py::arg("width"), py::arg("threshold"),
        py::arg("fused_multiply_add"));
  m.def("fma_supported", &panoptic_segformer::fma_supported,
        "Whether this CPU and build have the fused multiply-add variant");
}
