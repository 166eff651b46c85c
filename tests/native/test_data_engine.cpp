// ThreadSanitizer stress of the data loader's engine, without Python (TSan
// and the CPython of this machine do not start together). Built by
// -DFASTML_NATIVE_TESTS=ON and run by .ci/run under TSan and ASan/UBSan (see
// docs/development.md). It runs epochs with consumers that keep some batches,
// stop early, restart and hit gather errors, and checks every row it receives.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#include "common/thread_pool.hpp"
#include "data/loader.hpp"
#include "data/shuffle.hpp"

using namespace fastml;

static void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what);
    std::exit(1);
  }
}

int main() {
  const int64_t n = 20000;
  std::vector<float> x(static_cast<size_t>(n) * 4);
  std::vector<int64_t> ids(n);
  for (int64_t i = 0; i < n; ++i) {
    ids[i] = i;
    for (int j = 0; j < 4; ++j) x[i * 4 + j] = static_cast<float>(i * 4 + j);
  }
  std::vector<data::GatherColumn> cols(3);
  cols[0].src = ArrayView::contiguous(ids.data(), DType::I64, {n});
  cols[0].out_dtype = DType::I64;
  cols[1].src = ArrayView::contiguous(x.data(), DType::F32, {n, 4});
  cols[1].out_dtype = DType::F32;
  data::TransformOp clip;
  clip.kind = data::OpKind::Clip;
  clip.a = 0;
  clip.b = 1e9;
  cols[1].plan.ops.push_back(clip);
  // The ids again, as three chunks used in place.
  cols[2].src = ArrayView::contiguous(nullptr, DType::I64, {n});
  cols[2].out_dtype = DType::I64;
  for (int64_t s : {int64_t{0}, int64_t{7000}, int64_t{7001}}) {
    cols[2].chunks.push_back(reinterpret_cast<const char*>(ids.data() + s));
    cols[2].chunk_starts.push_back(s);
  }
  cols[2].chunk_starts.push_back(n);

  auto alloc = std::make_shared<data::PoolAllocator>(3, 8);
  data::Engine engine(cols, 97, 4, 2, alloc);
  std::vector<data::Batch> kept;
  for (uint64_t epoch = 0; epoch < 6; ++epoch) {
    auto rows = std::make_shared<const std::vector<int64_t>>(
        data::epoch_rows(n, true, 3, epoch, static_cast<int64_t>(epoch % 2), 2, false));
    engine.start(rows, false, 0);
    data::Batch b;
    int64_t got = 0, seen = 0;
    while (engine.next(b)) {
      const auto* i = static_cast<const int64_t*>(b.ptrs[0]);
      const auto* v = static_cast<const float*>(b.ptrs[1]);
      for (int64_t k = 0; k < b.rows; ++k) {
        check(i[k] == (*rows)[seen + k], "row order");
        check(v[k * 4 + 3] == static_cast<float>(i[k] * 4 + 3), "row contents");
        check(static_cast<const int64_t*>(b.ptrs[2])[k] == i[k], "chunked column");
      }
      seen += b.rows;
      if (got % 7 == 0) kept.push_back(b);   // keep some batches alive
      if (epoch == 3 && ++got == 20) break;  // stop early: start() must cancel the rest
      ++got;
    }
  }
  // A gather error surfaces in next() on this thread and ends the epoch.
  auto bad = std::make_shared<const std::vector<int64_t>>(std::vector<int64_t>{0, 1, n + 5, 2});
  engine.start(bad, false, 0);
  data::Batch b;
  bool threw = false;
  try {
    while (engine.next(b)) {
    }
  } catch (const std::out_of_range&) {
    threw = true;
  }
  check(threw, "error surfaced");
  check(!engine.next(b), "epoch ended after the error");
  // Kept batches still hold their rows.
  for (const auto& k : kept) {
    const auto* i = static_cast<const int64_t*>(k.ptrs[0]);
    const auto* v = static_cast<const float*>(k.ptrs[1]);
    for (int64_t r = 0; r < k.rows; ++r) check(v[r * 4] == static_cast<float>(i[r] * 4), "kept");
  }
  // Two engines consumed from two threads at once, sharing the pool.
  std::thread t([&] {
    data::Engine e2(cols, 50, 3, 2, std::make_shared<data::PoolAllocator>(3, 6));
    e2.start(
        std::make_shared<const std::vector<int64_t>>(data::epoch_rows(n, true, 9, 0, 0, 1, true)),
        true, 0);
    data::Batch bb;
    while (e2.next(bb)) {
    }
  });
  engine.start(
      std::make_shared<const std::vector<int64_t>>(data::epoch_rows(n, true, 1, 0, 0, 1, false)),
      false, 5);
  while (engine.next(b)) {
  }
  t.join();
  // A deeper prefetch (the consumer waits for 4 ready batches at a time) over
  // epochs whose batch counts are not multiples of 4: same rows, same order.
  {
    data::Engine deep(cols, 61, 6, 2, std::make_shared<data::PoolAllocator>(3, 10));
    for (uint64_t epoch = 0; epoch < 3; ++epoch) {
      auto rows = std::make_shared<const std::vector<int64_t>>(
          data::epoch_rows(n - static_cast<int64_t>(epoch) * 13, true, 5, epoch, 0, 1, false));
      deep.start(rows, false, 0);
      data::Batch db;
      int64_t seen = 0;
      while (deep.next(db)) {
        const auto* i = static_cast<const int64_t*>(db.ptrs[0]);
        for (int64_t k = 0; k < db.rows; ++k) check(i[k] == (*rows)[seen + k], "deep order");
        seen += db.rows;
      }
      check(seen == static_cast<int64_t>(rows->size()), "deep epoch complete");
    }
  }
  // Batches split into pieces (8 threads for a window of 2: four pieces of
  // at least 1024 rows per batch, gathered by different pool tasks into one
  // batch): every column's rows in order, epochs resumed mid-way, and a
  // stop() racing with running pieces.
  {
    data::Engine split(cols, 4099, 2, 8, std::make_shared<data::PoolAllocator>(3, 6));
    for (uint64_t epoch = 0; epoch < 4; ++epoch) {
      auto rows = std::make_shared<const std::vector<int64_t>>(
          data::epoch_rows(n, true, 9, epoch, 0, 1, false));
      const int64_t first = static_cast<int64_t>(epoch % 3);
      split.start(rows, false, first);
      data::Batch sb;
      int64_t seen = first * 4099;
      while (split.next(sb)) {
        const auto* i = static_cast<const int64_t*>(sb.ptrs[0]);
        const auto* xv = static_cast<const float*>(sb.ptrs[1]);
        const auto* c = static_cast<const int64_t*>(sb.ptrs[2]);
        for (int64_t k = 0; k < sb.rows; ++k) {
          const int64_t want = (*rows)[seen + k];
          check(i[k] == want && c[k] == want, "split ids");
          check(xv[k * 4 + 3] == static_cast<float>(want * 4 + 3), "split values");
        }
        seen += sb.rows;
        if (epoch == 3 && seen > 9000) break;  // stop() below, pieces still running
      }
      if (epoch < 3) check(seen == n, "split epoch complete");
    }
    split.stop();
  }
  // One buffer per batch (device staging's layout, PoolAllocator::set_allocate
  // with one_buffer): pieces of one batch gathered by different tasks into
  // regions of one buffer, kept batches sharing nothing with later ones.
  {
    auto one = std::make_shared<data::PoolAllocator>(3, 6);
    one->set_allocate({}, 0, /*one_buffer=*/true);
    data::Engine e1(cols, 3001, 2, 8, one);
    std::vector<data::Batch> kept1;
    for (uint64_t epoch = 0; epoch < 3; ++epoch) {
      auto rows = std::make_shared<const std::vector<int64_t>>(
          data::epoch_rows(n, true, 13, epoch, 0, 1, false));
      e1.start(rows, false, 0);
      data::Batch ob;
      int64_t seen = 0;
      while (e1.next(ob)) {
        check(ob.buffers[0] == ob.buffers[1] && ob.buffers[1] == ob.buffers[2], "one buffer");
        const auto base = reinterpret_cast<uintptr_t>(ob.ptrs[0]);
        // int64 columns first (0, then 2), then the float32 one; 64-byte starts.
        check(ob.ptrs[0] < ob.ptrs[2] && ob.ptrs[2] < ob.ptrs[1], "layout order");
        for (void* p : ob.ptrs) check((reinterpret_cast<uintptr_t>(p) - base) % 64 == 0, "align");
        const auto* i = static_cast<const int64_t*>(ob.ptrs[0]);
        const auto* xv = static_cast<const float*>(ob.ptrs[1]);
        const auto* c = static_cast<const int64_t*>(ob.ptrs[2]);
        for (int64_t k = 0; k < ob.rows; ++k) {
          const int64_t want = (*rows)[seen + k];
          check(i[k] == want && c[k] == want, "one-buffer ids");
          check(xv[k * 4 + 3] == static_cast<float>(want * 4 + 3), "one-buffer values");
        }
        seen += ob.rows;
        if (seen % 2 == 1) kept1.push_back(ob);
      }
      check(seen == n, "one-buffer epoch complete");
    }
    for (const auto& k : kept1) {
      const auto* i = static_cast<const int64_t*>(k.ptrs[0]);
      const auto* v = static_cast<const float*>(k.ptrs[1]);
      for (int64_t r = 0; r < k.rows; ++r) check(v[r * 4] == static_cast<float>(i[r] * 4), "kept1");
    }
  }
  // Small batches with more threads than prefetch: one batch in flight per
  // thread (window 6 for prefetch 1), handed over in order.
  {
    data::Engine wide(cols, 97, 1, 6, std::make_shared<data::PoolAllocator>(3, 8));
    auto rows =
        std::make_shared<const std::vector<int64_t>>(data::epoch_rows(n, true, 4, 0, 0, 1, false));
    wide.start(rows, false, 0);
    data::Batch wb;
    int64_t seen = 0;
    while (wide.next(wb)) {
      const auto* i = static_cast<const int64_t*>(wb.ptrs[0]);
      for (int64_t k = 0; k < wb.rows; ++k) check(i[k] == (*rows)[seen + k], "wide order");
      seen += wb.rows;
    }
    check(seen == n, "wide epoch complete");
  }
  // stop() from another thread while the consumer may be waiting in next():
  // next() returns false (never hangs) and every batch it returned is right.
  for (int round = 0; round < 40; ++round) {
    auto rows = std::make_shared<const std::vector<int64_t>>(
        data::epoch_rows(n, true, 11, static_cast<uint64_t>(round), 0, 1, false));
    engine.start(rows, false, 0);
    std::thread stopper([&engine, round] {
      std::this_thread::sleep_for(std::chrono::microseconds(50 * (round % 8)));
      engine.stop();
    });
    data::Batch sb;
    int64_t seen = 0;
    while (engine.next(sb)) {
      const auto* i = static_cast<const int64_t*>(sb.ptrs[0]);
      for (int64_t k = 0; k < sb.rows; ++k) check(i[k] == (*rows)[seen + k], "order under stop");
      seen += sb.rows;
    }
    stopper.join();
  }
  // start() and stop() racing from two threads: a superseded start() hands
  // out nothing, a token never yields another epoch's rows, nothing crashes.
  {
    data::Engine race(cols, 64, 4, 2, std::make_shared<data::PoolAllocator>(3, 8));
    auto other_rows =
        std::make_shared<const std::vector<int64_t>>(data::epoch_rows(n, true, 21, 0, 0, 1, false));
    std::thread other([&] {
      for (int i = 0; i < 300; ++i) {
        if (i % 3 == 0) {
          race.stop();
        } else {
          race.start(other_rows, false, 0);
        }
      }
    });
    for (int round = 0; round < 300; ++round) {
      auto rows = std::make_shared<const std::vector<int64_t>>(
          data::epoch_rows(n, true, 22, static_cast<uint64_t>(round), 0, 1, false));
      const uint64_t token = race.start(rows, false, 0);
      data::Batch rb;
      int64_t seen = 0;
      while (seen < 1000 && race.next(rb, token)) {
        const auto* i = static_cast<const int64_t*>(rb.ptrs[0]);
        for (int64_t k = 0; k < rb.rows; ++k) check(i[k] == (*rows)[seen + k], "token's own rows");
        seen += rb.rows;
      }
    }
    other.join();
    race.stop();
  }
  engine.stop();
  std::printf("data engine stress: ok (%lld buffers allocated, %lld reused)\n",
              static_cast<long long>(alloc->allocated()), static_cast<long long>(alloc->reused()));
  return 0;
}
