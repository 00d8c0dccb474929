// The CPU extension panoptic_segformer._cpu. Loading it registers the multi-scale deformable
// attention operator and its CPU kernels (ms_deform_attn_op.cpp, ms_deform_attn_cpu.cpp) with
// PyTorch's dispatcher; its Python bindings switch the kernel's AVX2 variant.

#include <torch/extension.h>

#include "cpu_features.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU kernels of panoptic_segformer (ms_deform_attn operator)";
  m.def("avx2_supported", &panoptic_segformer::avx2_supported,
        "Whether this CPU and build have the AVX2 variants (same results, wider vectors)");
  m.def("set_msda_avx2", &panoptic_segformer::set_msda_avx2,
        "Lets the deformable-attention CPU kernel use its AVX2 variant where the CPU has it "
        "(default) or not; returns the previous setting",
        py::arg("enabled"));
}
