// Run-time choice of the CPU kernels' instruction-set variant (cpu_features.h).

#include "cpu_features.h"

#include <atomic>

namespace panoptic_segformer {
namespace {
std::atomic<bool> msda_avx2_enabled{true};
}  // namespace

bool avx2_supported() {
#ifdef PSF_HAVE_AVX2_VARIANT
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

bool use_avx2() { return msda_avx2_enabled.load() && avx2_supported(); }

bool set_msda_avx2(bool enabled) { return msda_avx2_enabled.exchange(enabled); }

}  // namespace panoptic_segformer
