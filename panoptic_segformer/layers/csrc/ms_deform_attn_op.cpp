// The multi-scale deformable attention operator's schema, registered with PyTorch's dispatcher
// (the CPU extension defines it; its CPU kernels are registered in ms_deform_attn_cpu.cpp, the
// CUDA kernels in ms_deform_attn_cuda.cu when the CUDA extension is loaded). Python adds the
// fake (shape) implementation and the autograd formula (layers/ms_deform_attn_func.py), so the op
// is traced whole by torch.compile and torch.export; C++ users of an exported or scripted model
// load this library and call torch::ops / the dispatcher as for any other operator.

#include <torch/library.h>

TORCH_LIBRARY(panoptic_segformer, m) {
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) "
      "-> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}
