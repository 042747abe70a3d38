#pragma once
// WorkerPool: a fixed number of named threads that run posted functions in the order
// they were posted (several at once when there are several threads). Started and
// joined by its owner; stop() runs what is still queued, then joins. Threads start
// with every signal blocked, so SIGINT/SIGTERM reach the thread that runs the FUSE loop.
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace gate {

class WorkerPool {
 public:
  WorkerPool(std::size_t threads, std::string name);
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  void start();
  // Thread-safe. After stop(), runs `fn` on the calling thread (nothing is dropped).
  void post(std::function<void()> fn);
  // Runs what is queued, then joins the threads. Idempotent; not from a pool thread.
  void stop();
  bool on_pool_thread() const;

 private:
  void main();

  const std::size_t size_;
  const std::string name_;
  mutable std::mutex m_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

// Starts a thread with every signal blocked (see above).
std::thread start_quiet_thread(std::function<void()> body);

}  // namespace gate
