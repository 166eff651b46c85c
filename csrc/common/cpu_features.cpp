#include "common/cpu_features.hpp"

namespace fastml {

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = [] {
    CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    f.sse42 = __builtin_cpu_supports("sse4.2");
    f.avx = __builtin_cpu_supports("avx");
    f.avx2 = __builtin_cpu_supports("avx2");
    f.fma = __builtin_cpu_supports("fma");
    f.f16c = __builtin_cpu_supports("f16c");
    f.avx512f = __builtin_cpu_supports("avx512f");
    f.avx512bw = __builtin_cpu_supports("avx512bw");
    f.avx512vl = __builtin_cpu_supports("avx512vl");
#elif defined(__aarch64__)
    f.neon = true;
#endif
    return f;
  }();
  return features;
}

std::string simd_summary() {
  const CpuFeatures& f = cpu_features();
  std::string baseline =
#if defined(FASTML_NATIVE)
      "native";
#elif defined(__x86_64__)
      "x86-64";
#elif defined(__aarch64__)
      "armv8-a";
#else
      "generic";
#endif
  std::string rt;
  auto add = [&](bool on, const char* name) {
    if (on) rt += (rt.empty() ? "" : ",") + std::string(name);
  };
  add(f.sse42, "sse4.2");
  add(f.avx, "avx");
  add(f.avx2, "avx2");
  add(f.fma, "fma");
  add(f.f16c, "f16c");
  add(f.avx512f, "avx512f");
  add(f.avx512bw, "avx512bw");
  add(f.avx512vl, "avx512vl");
  add(f.neon, "neon");
  return "baseline=" + baseline + " runtime=" + (rt.empty() ? "none" : rt);
}

}  // namespace fastml
