// A small thread pool in which the calling thread takes part.
//
// Work is split into chunks; each thread starts on its own contiguous share (the same one on every
// call) and then takes what is left of the others'. The caller starts at once and never waits for
// a worker the OS has not scheduled: such a worker finds nothing left and goes back to sleep. OpenMP's fork/join waits for every thread at each region's end, which on a busy
// machine cost a whole scheduler slice (~24 ms) per call; this pool degrades to one thread there.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>

#include "dispatch.h"

namespace sparsify {

// Calls fn(i) for every i in [0, chunks), spread over up to num_threads() threads. Called from
// inside a chunk it runs serially (no nesting).
void parallel_for(int64_t chunks, const std::function<void(int64_t)>& fn);

// Splits [0, n) into `parts` contiguous ranges; range i is [split(n, parts, i), split(.., i+1)).
inline int64_t split_point(int64_t n, int64_t parts, int64_t i) { return n * i / parts; }

// body(i) for i in [0, n), in contiguous ranges over the pool; inline when `serial`.
template <class F>
void parallel_range(int64_t n, bool serial, F&& body) {
  if (serial || num_threads() <= 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  const int64_t parts = std::min<int64_t>(n, 4 * num_threads());
  parallel_for(parts, [&](int64_t p) {
    for (int64_t i = split_point(n, parts, p); i < split_point(n, parts, p + 1); ++i) body(i);
  });
}

}  // namespace sparsify
