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
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      n_ = chunks;
      next_.store(0, std::memory_order_relaxed);
      done_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    work(fn, chunks);
    // chunks claimed by a worker that is still running them
    while (done_.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
    std::unique_lock<std::mutex> lk(mu_);
    fn_ = nullptr;
    left_.wait(lk, [&] { return inside_ == 0; });
  }

 private:
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
      for (int i = 0; i < kSpin && gen_.load(std::memory_order_acquire) == seen; ++i) cpu_relax();
      std::unique_lock<std::mutex> lk(mu_);
      wake_.wait(lk, [&] { return stop_ || gen_.load(std::memory_order_acquire) != seen; });
      if (stop_) return;
      seen = gen_.load(std::memory_order_acquire);
      if (!fn_) continue;  // that job already finished without us
      const std::function<void(int64_t)>* fn = fn_;
      const int64_t n = n_;
      ++inside_;
      lk.unlock();
      work(*fn, n);
      lk.lock();
      if (--inside_ == 0) left_.notify_all();
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
  std::condition_variable wake_, left_;
  std::vector<std::thread> threads_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  int inside_ = 0;
  bool stop_ = false;
  std::atomic<int64_t> next_{0}, done_{0};
  std::atomic<uint64_t> gen_{0};
};

// Never destroyed: joining workers during interpreter shutdown is not worth the ordering risk.
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

}  // namespace

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
