// Dynamic work split for the CPU kernels on torch's intra-op threads.
//
// at::parallel_for (OpenMP build) gives each thread one fixed share of the range up front, so on a shared
// machine a thread that loses its core holds the whole call back: more threads can be slower than one.
// parallel_chunks hands out fixed-size chunks from an atomic counter instead: a thread that runs late
// finds less left to do, and the others take its share. Chunks are fixed by (n, grain) alone, never by the
// thread count, so a kernel whose reductions follow chunk boundaries gives the same bits on any count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace mage {

// Calls fn(begin, end) for the chunks [k * grain, min(n, (k + 1) * grain)) of [0, n), each exactly once, on
// up to one thread per `min_chunks_per_thread` chunks (small calls stay on the calling thread: waking a
// thread that then finds no work only adds its wake-up, and on a busy core its wait for a time slice).
template <typename F>
void parallel_chunks(int64_t n, int64_t grain, const F& fn, int64_t min_chunks_per_thread = 2) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t chunks = (n + grain - 1) / grain;
  const int64_t threads =
      std::min<int64_t>(at::get_num_threads(), chunks / std::max<int64_t>(min_chunks_per_thread, 1));
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t k = 0; k < chunks; ++k) fn(k * grain, std::min(n, (k + 1) * grain));
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t k = next++; k < chunks; k = next++) fn(k * grain, std::min(n, (k + 1) * grain));
  });
}

}  // namespace mage
