// ONNX Runtime custom operator panoptic_segformer::MSDeformAttn (domain "panoptic_segformer",
// version 1): multi-scale deformable attention on the CPU execution provider, for ONNX files
// exported with it (panoptic_segformer/deploy/onnx_ops.py). It runs the PyTorch CPU kernel's own
// forward loop (panoptic_segformer/layers/csrc/ms_deform_attn_cpu_forward.h), so an exported
// model gives the bits of the eager one; the portable alternative, one GridSample per level,
// materialises every sample and runs a few times slower.
//
// Inputs (float32 unless said): value (N, S, M, D); spatial_shapes (L, 2) int64, (H, W) per level;
// level_start_index (L,) int64; sampling_locations (N, Q, M, L, P, 2), normalised (x, y);
// attention_weights (N, Q, M, L, P). Output (N, Q, M * D).
//
// Built against ONNX Runtime's C API only (onnxruntime_c_api.h) by
// panoptic_segformer/deploy/ort_ops.py, and loaded with SessionOptions.register_custom_ops_library.
// It asks for API version 17 (KernelContext_ParallelFor), so it runs on ONNX Runtime >= 1.17.

#include <onnxruntime_c_api.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "ms_deform_attn_cpu_forward.h"
#include "ms_deform_attn_shapes.h"

namespace {

using panoptic_segformer::msda::ForwardArgs;
using panoptic_segformer::msda::LevelShapes;
using panoptic_segformer::msda::Sizes;

constexpr uint32_t kApiVersion = 17;
constexpr const char* kDomain = "panoptic_segformer";
constexpr const char* kName = "MSDeformAttn";
constexpr size_t kInputs = 5;
constexpr ONNXTensorElementDataType kInputTypes[kInputs] = {
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
constexpr const char* kInputNames[kInputs] = {"value", "spatial_shapes", "level_start_index",
                                              "sampling_locations", "attention_weights"};
// (n, m, q) triples per task of the thread pool
constexpr int64_t kTriplesPerTask = 256;

#define PSF_RETURN_IF_ERROR(expr)   \
  do {                              \
    OrtStatus* status_ = (expr);    \
    if (status_) return status_;    \
  } while (0)

struct Kernel {
  const OrtApi* api;
};

OrtStatus* invalid(const OrtApi* api, const std::string& message) {
  return api->CreateStatus(ORT_INVALID_ARGUMENT,
                           (std::string(kDomain) + "::" + kName + ": " + message).c_str());
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string text = "(";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + (shape.size() == 1 ? ",)" : ")");
}

// The data and shape of input `index`.
OrtStatus* input(const OrtApi* api, OrtKernelContext* context, size_t index, const void** data,
                 std::vector<int64_t>* shape) {
  const OrtValue* value = nullptr;
  PSF_RETURN_IF_ERROR(api->KernelContext_GetInput(context, index, &value));
  OrtTensorTypeAndShapeInfo* info = nullptr;
  PSF_RETURN_IF_ERROR(api->GetTensorTypeAndShape(value, &info));
  size_t rank = 0;
  OrtStatus* status = api->GetDimensionsCount(info, &rank);
  if (!status) {
    shape->resize(rank);
    status = api->GetDimensions(info, shape->data(), rank);
  }
  api->ReleaseTensorTypeAndShapeInfo(info);
  PSF_RETURN_IF_ERROR(status);
  return api->GetTensorMutableData(const_cast<OrtValue*>(value), const_cast<void**>(data));
}

// Checks the shapes against each other and the level table against value (a mismatch would read
// out of bounds), naming the bad input.
OrtStatus* check_shapes(const OrtApi* api, const std::vector<int64_t> (&shapes)[kInputs],
                        const int64_t* spatial_shapes, const int64_t* level_start_index,
                        Sizes* sz) {
  constexpr size_t kRanks[kInputs] = {4, 2, 1, 6, 5};
  for (size_t i = 0; i < kInputs; ++i) {
    if (shapes[i].size() != kRanks[i]) {
      return invalid(api, std::string(kInputNames[i]) + " of shape " + shape_string(shapes[i]) +
                              ": expected " + std::to_string(kRanks[i]) + " dimensions");
    }
  }
  const std::vector<int64_t>& value = shapes[0];
  const std::vector<int64_t>& locations = shapes[3];
  *sz = {value[0], value[1], value[2], value[3], locations[1], locations[3], locations[4]};
  const std::vector<int64_t> expected_locations = {sz->N, sz->Q, sz->M, sz->L, sz->P, 2};
  const std::vector<int64_t> expected_weights = {sz->N, sz->Q, sz->M, sz->L, sz->P};
  const std::vector<int64_t> expected_shapes = {sz->L, 2};
  const std::vector<int64_t> expected_starts = {sz->L};
  if (locations != expected_locations) {
    return invalid(api, "sampling_locations of shape " + shape_string(locations) +
                            " do not fit value of shape " + shape_string(value) +
                            ": expected (N, Q, M, L, P, 2) with N, M from value");
  }
  if (shapes[4] != expected_weights) {
    return invalid(api, "attention_weights of shape " + shape_string(shapes[4]) + ", expected " +
                            shape_string(expected_weights));
  }
  if (shapes[1] != expected_shapes || shapes[2] != expected_starts) {
    return invalid(api, "spatial_shapes " + shape_string(shapes[1]) + " and level_start_index " +
                            shape_string(shapes[2]) + " must be (L, 2) and (L,) with L = " +
                            std::to_string(sz->L) + " levels");
  }
  // the same checks as the PyTorch operator's (ms_deform_attn_shapes.h)
  std::string error = panoptic_segformer::msda::index_overflow(sz->N, sz->S, sz->M, sz->D, sz->Q,
                                                               sz->L, sz->P);
  if (error.empty()) {
    error = panoptic_segformer::msda::level_error(spatial_shapes, level_start_index, sz->L, sz->S);
  }
  if (!error.empty()) return invalid(api, error + " (value " + shape_string(value) + ")");
  return nullptr;
}

// The loop for the baseline of the architecture and for AVX2 (cpu_features.h).
void forward_baseline(const ForwardArgs<float, float>& args, int64_t begin, int64_t end) {
  panoptic_segformer::msda::forward_triples<float, float, float>(args, begin, end);
}

#ifdef PSF_HAVE_AVX2_VARIANT
__attribute__((target("avx2"))) void forward_avx2(const ForwardArgs<float, float>& args,
                                                  int64_t begin, int64_t end) {
  panoptic_segformer::msda::forward_triples<float, float, float>(args, begin, end);
}
#endif

struct Task {
  const ForwardArgs<float, float>* args;
  void (*work)(const ForwardArgs<float, float>&, int64_t, int64_t);
  int64_t triples;
};

void run_task(void* data, size_t index) {
  const Task& task = *static_cast<const Task*>(data);
  const int64_t begin = static_cast<int64_t>(index) * kTriplesPerTask;
  const int64_t end = begin + kTriplesPerTask < task.triples ? begin + kTriplesPerTask
                                                             : task.triples;
  task.work(*task.args, begin, end);
}

OrtStatus* ORT_API_CALL compute(void* kernel, OrtKernelContext* context) {
  const OrtApi* api = static_cast<Kernel*>(kernel)->api;
  const void* data[kInputs];
  std::vector<int64_t> shapes[kInputs];
  for (size_t i = 0; i < kInputs; ++i) {
    PSF_RETURN_IF_ERROR(input(api, context, i, &data[i], &shapes[i]));
  }
  const auto* spatial_shapes = static_cast<const int64_t*>(data[1]);
  const auto* level_start_index = static_cast<const int64_t*>(data[2]);
  Sizes sz;
  PSF_RETURN_IF_ERROR(check_shapes(api, shapes, spatial_shapes, level_start_index, &sz));
  std::vector<int64_t> heights(sz.L), widths(sz.L);
  for (int64_t l = 0; l < sz.L; ++l) {
    heights[l] = spatial_shapes[2 * l];
    widths[l] = spatial_shapes[2 * l + 1];
  }
  const int64_t output_shape[3] = {sz.N, sz.Q, sz.M * sz.D};
  OrtValue* output = nullptr;
  PSF_RETURN_IF_ERROR(api->KernelContext_GetOutput(context, 0, output_shape, 3, &output));
  float* output_data = nullptr;
  PSF_RETURN_IF_ERROR(api->GetTensorMutableData(output, reinterpret_cast<void**>(&output_data)));
  const ForwardArgs<float, float> args{static_cast<const float*>(data[0]),
                                       static_cast<const float*>(data[3]),
                                       static_cast<const float*>(data[4]),
                                       output_data,
                                       LevelShapes{heights.data(), widths.data(), level_start_index},
                                       sz};
  Task task{&args, &forward_baseline, sz.N * sz.M * sz.Q};
#ifdef PSF_HAVE_AVX2_VARIANT
  if (__builtin_cpu_supports("avx2")) task.work = &forward_avx2;
#endif
  if (task.triples == 0) return nullptr;
  const size_t tasks = static_cast<size_t>((task.triples + kTriplesPerTask - 1) / kTriplesPerTask);
  return api->KernelContext_ParallelFor(context, &run_task, tasks, 0, &task);
}

// The schema and callbacks ONNX Runtime reads (fields of OrtCustomOp up to kApiVersion; the
// V2 kernel callbacks, which return errors, in place of the first ones).
OrtStatus* ORT_API_CALL create_kernel_v2(const OrtCustomOp*, const OrtApi* api,
                                         const OrtKernelInfo*, void** kernel) {
  *kernel = new Kernel{api};
  return nullptr;
}

void ORT_API_CALL destroy_kernel(void* kernel) { delete static_cast<Kernel*>(kernel); }
const char* ORT_API_CALL name(const OrtCustomOp*) { return kName; }
const char* ORT_API_CALL provider(const OrtCustomOp*) { return "CPUExecutionProvider"; }
size_t ORT_API_CALL input_count(const OrtCustomOp*) { return kInputs; }
size_t ORT_API_CALL output_count(const OrtCustomOp*) { return 1; }
ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp*, size_t index) {
  return kInputTypes[index];
}
ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp*, size_t) {
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType ORT_API_CALL input_memory(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL one(const OrtCustomOp*) { return 1; }
int ORT_API_CALL first_version(const OrtCustomOp*) { return 1; }
int ORT_API_CALL last_version(const OrtCustomOp*) { return 1; }

OrtCustomOp make_op() {
  OrtCustomOp op{};
  op.version = kApiVersion;
  op.GetName = &name;
  op.GetExecutionProviderType = &provider;
  op.GetInputType = &input_type;
  op.GetInputTypeCount = &input_count;
  op.GetOutputType = &output_type;
  op.GetOutputTypeCount = &output_count;
  op.KernelDestroy = &destroy_kernel;
  op.GetInputCharacteristic = &required;
  op.GetOutputCharacteristic = &required;
  op.GetInputMemoryType = &input_memory;
  op.GetVariadicInputMinArity = &one;
  op.GetVariadicInputHomogeneity = &one;
  op.GetVariadicOutputMinArity = &one;
  op.GetVariadicOutputHomogeneity = &one;
  op.CreateKernelV2 = &create_kernel_v2;
  op.KernelComputeV2 = &compute;
  op.GetStartVersion = &first_version;
  op.GetEndVersion = &last_version;
  return op;
}

}  // namespace

// Called by ONNX Runtime when the library is registered with a session's options. One domain,
// created on the first call, serves every session (ONNX Runtime only reads it) and lives as
// long as the process.
extern "C" ORT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(kApiVersion);
  if (api == nullptr) {
    const std::string message = std::string(kDomain) + "::" + kName +
                                " needs ONNX Runtime >= 1.17, this is " +
                                api_base->GetVersionString();
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, message.c_str());
  }
  static const OrtCustomOp op = make_op();
  static std::mutex mutex;
  static OrtCustomOpDomain* domain = nullptr;
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (domain == nullptr) {
      OrtCustomOpDomain* created = nullptr;
      PSF_RETURN_IF_ERROR(api->CreateCustomOpDomain(kDomain, &created));
      OrtStatus* status = api->CustomOpDomain_Add(created, &op);
      if (status) {
        api->ReleaseCustomOpDomain(created);
        return status;
      }
      domain = created;
    }
  }
  return api->AddCustomOpDomain(options, domain);
}
