// Runtime CPU feature detection, for hot loops that dispatch at run time
// (the distributed build targets the baseline ISA; see FASTML_NATIVE).
#pragma once

#include <string>

namespace fastml {

struct CpuFeatures {
  bool sse42 = false, avx = false, avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, neon = false;
};

const CpuFeatures& cpu_features();

// e.g. "baseline=x86-64 runtime=sse4.2,avx,avx2,fma,f16c"
std::string simd_summary();

}  // namespace fastml
