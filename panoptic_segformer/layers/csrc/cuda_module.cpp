// The CUDA extension panoptic_segformer._C. Loading it registers the CUDA kernels of the
// multi-scale deformable attention operator (ms_deform_attn_cuda.cu) with PyTorch's dispatcher;
// the operator itself is defined by the CPU extension, which the Python loader imports first.

#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA kernels of panoptic_segformer (registers panoptic_segformer::ms_deform_attn)";
}
