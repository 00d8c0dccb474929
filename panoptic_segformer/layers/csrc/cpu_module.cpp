// The CPU extension panoptic_segformer._cpu: the Python bindings of the mask-statistics kernel
// (mask_statistics.cpp).

#include <torch/extension.h>

#include "mask_statistics.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU kernels of panoptic_segformer (mask statistics)";
  m.def("resized_mask_statistics", &panoptic_segformer::resized_mask_statistics,
        "Bilinear resize, binarisation and statistics of query masks (CPU)", py::arg("masks"),
        py::arg("height"), py::arg("width"), py::arg("threshold"), py::arg("use_avx2"));
  m.def("avx2_supported", &panoptic_segformer::avx2_supported,
        "Whether this CPU and build have the AVX2 variant (same results, wider vectors)");
}
