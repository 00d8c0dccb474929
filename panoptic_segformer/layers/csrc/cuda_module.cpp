// The CUDA extension panoptic_segformer._C. Loading it registers the CUDA kernels of the
// multi-scale deformable attention operator (ms_deform_attn_cuda.cu) with PyTorch's dispatcher;
// the operator itself is defined by the CPU extension, which the Python loader imports first.
//
// The module holds nothing else, so it is defined with Python's C API alone, as PyTorch's guide
// to custom operators does: torch/extension.h (pybind11 and all of libtorch's C++ API) would
// triple the extension's build time for an empty module.

#include <Python.h>

#define PSF_STRINGIFY_(x) #x
#define PSF_STRINGIFY(x) PSF_STRINGIFY_(x)
#define PSF_CONCAT_(a, b) a##b
#define PSF_CONCAT(a, b) PSF_CONCAT_(a, b)

extern "C" PyMODINIT_FUNC PSF_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      PSF_STRINGIFY(TORCH_EXTENSION_NAME),
      "CUDA kernels of panoptic_segformer (registers panoptic_segformer::ms_deform_attn)",
      -1,
      nullptr,
  };
  return PyModule_Create(&module);
}
