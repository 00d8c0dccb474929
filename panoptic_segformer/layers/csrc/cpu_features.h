// Which instruction-set variant the CPU kernels run. Each hot loop is compiled twice from the same
// source: for the baseline of the architecture and, on x86 with GCC or Clang, for AVX2, picked at
// run time when the CPU has it. The two perform the same operations in the same order (no FMA),
// so they give the same bits; the AVX2 one is only faster.
#pragma once

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define PSF_HAVE_AVX2_VARIANT 1
#endif

namespace panoptic_segformer {

// Whether this CPU and build have the AVX2 variants.
bool avx2_supported();

// Whether the deformable-attention CPU kernel uses them: avx2_supported(), unless turned off with
// set_msda_avx2(false) (the tests compare the two variants). Returns the previous setting.
bool use_avx2();
bool set_msda_avx2(bool enabled);

}  // namespace panoptic_segformer
