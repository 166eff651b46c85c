// Per-element histogram logic shared by the CPU code and the CUDA ingest
// kernel (FASTML_HD): the slot of a finite value over ascending edges, with
// numpy.histogram's convention ([e_i, e_{i+1}), last bin closed).
#pragma once

#include <cstdint>

#include "common/float16.hpp"  // FASTML_HD

namespace fastml::drift {

// 0 = underflow, 1..nbins = bins, nbins + 1 = overflow; x must be finite.
// Branch-light binary search: the loop runs ceil(log2(nbins)) times for every x.
FASTML_HD inline int64_t histogram_slot(double x, const double* edges, int64_t nbins) {
  if (!(x >= edges[0])) return 0;
  if (x > edges[nbins]) return nbins + 1;
  int64_t lo = 0, len = nbins;  // answer in [lo, lo + len)
  while (len > 1) {
    const int64_t half = len / 2;
    const bool right = x >= edges[lo + half];
    lo = right ? lo + half : lo;
    len = right ? len - half : half;
  }
  return lo + 1;
}

}  // namespace fastml::drift
