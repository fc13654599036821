// See parallel.h. Workers spin briefly for the next job (back-to-back ops are the common case),
// then sleep on a condition variable.
#include "parallel.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "dispatch.h"

namespace sparsify {
namespace {

// How long an idle worker polls for the next job before it sleeps: long enough to span the
// Python step between two ops of a run, short enough to give the core back soon when there are
// more threads than cores (200 us made ResNet-50 90% at 4 threads on 2 busy cores 1.3x slower
// than this; 38 us, as 4000 pauses took on a Xeon, ran the same). By the clock, not a count of
// pauses: a pause takes ~10 ns on some CPUs and ~40 on others.
constexpr std::chrono::microseconds kSpinTime{50};
constexpr int kSpin = 4000;  // polls before the submitter's join yields its core
thread_local bool t_in_task = false;

inline void cpu_relax() { __builtin_ia32_pause(); }

class Pool {
 public:
  void run(int64_t chunks, const std::function<void(int64_t)>& fn, int threads) {
    std::lock_guard<std::mutex> one_job(submit_);
    resize(threads - 1);
    if (chunks > claim_cap_) {
      claim_cap_ = std::max<int64_t>(chunks, 2 * claim_cap_);
      claim_.reset(new std::atomic<uint8_t>[claim_cap_]);
    }
    for (int64_t i = 0; i < chunks; ++i) claim_[i].store(0, std::memory_order_relaxed);
    n_.store(chunks, std::memory_order_relaxed);
    team_.store(threads, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    fn_.store(&fn, std::memory_order_seq_cst);
    {
      // under the lock, so a worker about to sleep either sees the new generation or is woken
      std::lock_guard<std::mutex> lk(mu_);
      gen_.fetch_add(1, std::memory_order_seq_cst);
    }
    if (sleepers_.load(std::memory_order_seq_cst) > 0) wake_.notify_all();
    work(fn, chunks, threads, 0);
    // chunks claimed by a worker that is still running them
    wait_until([&] { return done_.load(std::memory_order_acquire) >= chunks; });
    // no worker may still hold `fn` (the caller's) once this returns; a worker that saw the job
    // after it ended finds no chunk left and leaves at once
    fn_.store(nullptr, std::memory_order_seq_cst);
    wait_until([&] { return inside_.load(std::memory_order_seq_cst) == 0; });
  }

 private:
  // Spins briefly (the common case: the other thread is a few hundred nanoseconds from done),
  // then yields the core to whoever the OS would rather run. No futex sleep on the join: a
  // condition-variable wake-up cost ~6 us per parallel region at 2 threads.
  template <class Pred>
  static void wait_until(Pred done) {
    for (int i = 0; !done(); ++i) {
      if (i < kSpin) cpu_relax();
      else std::this_thread::yield();
    }
  }

  // Thread `me` of `team` first runs its own contiguous share of the chunks, then takes what is
  // left of the others' shares, each from its end. The same thread thus gets the same chunks on
  // every call of a layer, so the output and scratch it writes stay in its own L2; claiming
  // from one shared counter instead handed chunks out in a different order each call, and the
  // lines then moved between cores (a 1024 x 256 x 192 sparse GEMM ran 1.6x slower at 2 threads
  // than at 1). A thread the OS has not scheduled only loses its share to the others.
  void work(const std::function<void(int64_t)>& fn, int64_t n, int team, int me) {
    t_in_task = true;
    auto take = [&](int64_t i) {
      if (claim_[i].load(std::memory_order_relaxed) || claim_[i].exchange(1, std::memory_order_acq_rel))
        return;
      fn(i);
      done_.fetch_add(1, std::memory_order_release);
    };
    for (int64_t i = split_point(n, team, me); i < split_point(n, team, me + 1); ++i) take(i);
    for (int d = 1; d < team; ++d) {
      const int other = (me + d) % team;
      for (int64_t i = split_point(n, team, other + 1); i-- > split_point(n, team, other);) take(i);
    }
    t_in_task = false;
  }

  void loop(int me) {
    uint64_t seen = gen_.load(std::memory_order_acquire);
    for (;;) {
      uint64_t g = seen;
      const auto spin_end = std::chrono::steady_clock::now() + kSpinTime;
      for (int i = 0; (g = gen_.load(std::memory_order_acquire)) == seen; ++i) {
        cpu_relax();
        if ((i & 63) == 63 && std::chrono::steady_clock::now() > spin_end) break;
      }
      if (g == seen) {
        std::unique_lock<std::mutex> lk(mu_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        wake_.wait(lk, [&] { return stop_ || gen_.load(std::memory_order_acquire) != seen; });
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
        if (stop_) return;
        g = gen_.load(std::memory_order_acquire);
      }
      seen = g;
      // registered before looking at the job, so the caller cannot return under us
      inside_.fetch_add(1, std::memory_order_seq_cst);
      const std::function<void(int64_t)>* fn = fn_.load(std::memory_order_seq_cst);
      // resize() keeps the pool at team - 1 workers, numbered 1 .. team - 1
      if (fn) work(*fn, n_.load(std::memory_order_relaxed), team_.load(std::memory_order_relaxed), me);
      inside_.fetch_sub(1, std::memory_order_seq_cst);
    }
  }

  void resize(int workers) {
    if ((int)threads_.size() == workers) return;
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
    threads_.clear();
    stop_ = false;
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this, i] { loop(i + 1); });
  }

  std::mutex submit_, mu_;
  std::condition_variable wake_;
  std::vector<std::thread> threads_;
  bool stop_ = false;  // under mu_
  std::atomic<const std::function<void(int64_t)>*> fn_{nullptr};
  std::atomic<int64_t> n_{0}, done_{0};
  std::atomic<int> team_{1};
  std::unique_ptr<std::atomic<uint8_t>[]> claim_;  // chunk i taken
  int64_t claim_cap_ = 0;
  std::atomic<int> inside_{0}, sleepers_{0};
  std::atomic<uint64_t> gen_{0};
};

// Never destroyed: joining workers during interpreter shutdown is not worth the ordering risk.
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

}  // namespace

bool in_parallel_task() { return t_in_task; }

void parallel_for(int64_t chunks, const std::function<void(int64_t)>& fn) {
  if (chunks <= 0) return;
  const int threads = num_threads();
  if (chunks == 1 || threads <= 1 || t_in_task) {
    for (int64_t i = 0; i < chunks; ++i) fn(i);
    return;
  }
  pool().run(chunks, fn, threads);
}

}  // namespace sparsify
