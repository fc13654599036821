// See parallel.h. Workers spin briefly for the next job (back-to-back ops are the common case),
// then sleep on a condition variable.
#include "parallel.h"

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "dispatch.h"

namespace sparsify {
namespace {

constexpr int kSpin = 4000;  // polls before a worker sleeps (~tens of microseconds)
thread_local bool t_in_task = false;

inline void cpu_relax() { __builtin_ia32_pause(); }

class Pool {
 public:
  void run(int64_t chunks, const std::function<void(int64_t)>& fn, int threads) {
    std::lock_guard<std::mutex> one_job(submit_);
    resize(threads - 1);
    n_.store(chunks, std::memory_order_relaxed);
    next_.store(0, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    fn_.store(&fn, std::memory_order_seq_cst);
    {
      // under the lock, so a worker about to sleep either sees the new generation or is woken
      std::lock_guard<std::mutex> lk(mu_);
      gen_.fetch_add(1, std::memory_order_seq_cst);
    }
    if (sleepers_.load(std::memory_order_seq_cst) > 0) wake_.notify_all();
    work(fn, chunks);
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

  void work(const std::function<void(int64_t)>& fn, int64_t n) {
    t_in_task = true;
    for (;;) {
      const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) break;
      fn(i);
      done_.fetch_add(1, std::memory_order_release);
    }
    t_in_task = false;
  }

  void loop() {
    uint64_t seen = gen_.load(std::memory_order_acquire);
    for (;;) {
      uint64_t g = seen;
      for (int i = 0; i < kSpin && (g = gen_.load(std::memory_order_acquire)) == seen; ++i)
        cpu_relax();
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
      if (fn) work(*fn, n_.load(std::memory_order_relaxed));
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
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { loop(); });
  }

  std::mutex submit_, mu_;
  std::condition_variable wake_;
  std::vector<std::thread> threads_;
  bool stop_ = false;  // under mu_
  std::atomic<const std::function<void(int64_t)>*> fn_{nullptr};
  std::atomic<int64_t> n_{0}, next_{0}, done_{0};
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
