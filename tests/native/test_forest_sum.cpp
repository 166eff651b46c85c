// The CUDA Forest kernel's ordered tile sum (infer::forest_tile_sum), run on
// the CPU: its single-output fast path makes exactly the additions of the
// general path, in the same order (bit-identical sums), and the general path
// adds each tree's scalar leaf for its own output and each vector leaf's k-th
// value, in tree order. Built by -DFASTML_NATIVE_TESTS=ON (run under
// sanitizers by .ci/run).
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "check.hpp"
#include "infer/forest_node.hpp"

using fastml::infer::forest_tile_sum;

template <typename AccT>
void run(std::mt19937_64& rng) {
  std::uniform_real_distribution<double> u(-1e3, 1e3);
  for (int trial = 0; trial < 2000; ++trial) {
    const int32_t n = static_cast<int32_t>(rng() % 300);
    const int64_t stride = int64_t{1} << (rng() % 6);  // rows per block: 1..32
    const int32_t outputs = 1 + static_cast<int32_t>(rng() % 4);
    std::vector<AccT> lv(static_cast<size_t>(n * stride + 1));
    std::vector<int32_t> group(static_cast<size_t>(n));
    std::vector<AccT> vec(static_cast<size_t>(n * 8 * outputs));
    for (auto& v : vec) v = static_cast<AccT>(u(rng) * (rng() % 3 == 0 ? 1e-6 : 1.0));
    for (int32_t lt = 0; lt < n; ++lt) {
      group[lt] = outputs == 1 ? 0 : static_cast<int32_t>(rng() % (outputs + 1)) - 1;
      AccT* slot = &lv[static_cast<size_t>(lt * stride)];
      if (group[lt] >= 0) {
        *slot = static_cast<AccT>(u(rng) * (rng() % 3 == 0 ? 1e-7 : 1.0));
      } else {
        const int32_t node = static_cast<int32_t>(rng() % 8);
        std::memcpy(slot, &node, sizeof(node));
      }
    }
    auto vector_value = [&](int32_t lt, int32_t node) {
      return vec[static_cast<size_t>((lt * 8 + node) * outputs)];
    };
    for (int32_t k = 0; k < outputs; ++k) {
      const AccT base = static_cast<AccT>(u(rng));
      // Reference: the additions in tree order, written out.
      AccT want = base;
      for (int32_t lt = 0; lt < n; ++lt) {
        if (group[lt] == k) {
          want += lv[static_cast<size_t>(lt * stride)];
        } else if (group[lt] < 0) {
          int32_t node;
          std::memcpy(&node, &lv[static_cast<size_t>(lt * stride)], sizeof(node));
          want += vector_value(lt, node);
        }
      }
      const AccT general =
          forest_tile_sum(base, lv.data(), stride, group.data(), n, k, false, vector_value);
      NATIVE_CHECK(std::memcmp(&general, &want, sizeof(AccT)) == 0);
      if (outputs == 1) {
        const AccT fast =
            forest_tile_sum(base, lv.data(), stride, group.data(), n, k, true, vector_value);
        NATIVE_CHECK(std::memcmp(&fast, &general, sizeof(AccT)) == 0);
      }
    }
  }
}

int main() {
  std::mt19937_64 rng(12345);
  run<float>(rng);
  run<double>(rng);
  std::printf("forest tile sum: ok\n");
  return 0;
}
