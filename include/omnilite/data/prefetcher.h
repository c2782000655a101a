// Background preparation of micro-batches: worker threads build the items first, first+1, ... ahead of the
// training loop (at most `depth` ahead) while it computes. Items depend only on their index, so the result is the
// same with any number of threads, including 0 (built on demand in the caller's thread). An exception thrown while
// building an item is rethrown by get() for that item.
#pragma once

#include <condition_variable>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "omnilite/runtime.h"

namespace omnilite {

template <class T>
class Prefetcher {
 public:
  Prefetcher(std::function<T(int64_t)> make, int64_t threads, int64_t depth, int64_t first)
      : make_(std::move(make)), depth_(std::max<int64_t>(depth, 1)), next_(first), wanted_(first) {
    for (int64_t i = 0; i < threads; ++i) workers_.emplace_back([this] { work(); });
  }
  ~Prefetcher() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
  }
  Prefetcher(const Prefetcher&) = delete;
  Prefetcher& operator=(const Prefetcher&) = delete;

  // Item m; calls must ask for first, first+1, ... in order.
  T get(int64_t m) {
    if (workers_.empty()) return make_(m);
    std::unique_lock<std::mutex> lock(mu_);
    wanted_ = m;
    cv_.notify_all();
    cv_.wait(lock, [&] { return ready_.count(m) > 0; });
    auto slot = std::move(ready_.at(m));
    ready_.erase(m);
    wanted_ = m + 1;
    cv_.notify_all();
    lock.unlock();
    if (slot.error) std::rethrow_exception(slot.error);
    return std::move(slot.item);
  }

 private:
  struct Slot {
    T item{};
    std::exception_ptr error;
  };
  void work() {
    use_one_thread_here();
    while (true) {
      int64_t m;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || next_ < wanted_ + depth_; });
        if (stop_) return;
        m = next_++;
      }
      Slot s;
      try {
        s.item = make_(m);
      } catch (...) {
        s.error = std::current_exception();
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        ready_[m] = std::move(s);
      }
      cv_.notify_all();
    }
  }

  std::function<T(int64_t)> make_;
  int64_t depth_, next_, wanted_;
  bool stop_ = false;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<int64_t, Slot> ready_;
  std::vector<std::thread> workers_;
};

}  // namespace omnilite
