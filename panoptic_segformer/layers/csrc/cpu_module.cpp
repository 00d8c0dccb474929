// The CPU extension panoptic_segformer._cpu: the Python bindings of the mask-statistics kernel
// (mask_statistics.cpp). Loading it also registers the multi-scale deformable attention operator
// and its CPU kernels (ms_deform_attn_op.cpp, ms_deform_attn_cpu.cpp) with PyTorch's dispatcher.

#include <torch/extension.h>

#include "cpu_features.h"
#include "mask_statistics.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU kernels of panoptic_segformer (mask statistics; ms_deform_attn operator)";
  m.def("resized_mask_statistics", &panoptic_segformer::resized_mask_statistics,
        "Bilinear resize, binarisation and statistics of query masks (CPU)", py::arg("masks"),
        py::arg("height"), py::arg("width"), py::arg("threshold"), py::arg("use_avx2"));
  m.def("avx2_supported", &panoptic_segformer::avx2_supported,
        "Whether this CPU and build have the AVX2 variants (same results, wider vectors)");
  m.def("set_msda_avx2", &panoptic_segformer::set_msda_avx2,
        "Lets the deformable-attention CPU kernel use its AVX2 variant where the CPU has it "
        "(default) or not; returns the previous setting",
        py::arg("enabled"));
}
