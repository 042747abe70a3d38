#include "core/worker_pool.h"

#include <pthread.h>
#include <signal.h>

#include <algorithm>

namespace gate {

std::thread start_quiet_thread(std::function<void()> body) {
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, &old);
  std::thread t(std::move(body));
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  return t;
}

WorkerPool::WorkerPool(std::size_t threads, std::string name)
    : size_(std::max<std::size_t>(threads, 1)), name_(std::move(name)) {}

WorkerPool::~WorkerPool() { stop(); }

void WorkerPool::start() {
  std::lock_guard lock(m_);
  if (!threads_.empty() || stopping_) return;
  for (std::size_t i = 0; i < size_; ++i) {
    threads_.push_back(start_quiet_thread([this] { main(); }));
    // Linux thread names are at most 15 bytes.
    pthread_setname_np(threads_.back().native_handle(), name_.substr(0, 15).c_str());
  }
}

void WorkerPool::post(std::function<void()> fn) {
  {
    std::lock_guard lock(m_);
    if (!stopping_ && !threads_.empty()) {
      queue_.push_back(std::move(fn));
      cv_.notify_one();
      return;
    }
  }
  fn();
}

namespace {
thread_local const WorkerPool* t_pool = nullptr;  // the pool whose thread this is
}  // namespace

bool WorkerPool::on_pool_thread() const { return t_pool == this; }

void WorkerPool::stop() {
  std::vector<std::thread> threads;
  {
    std::lock_guard lock(m_);
    stopping_ = true;
    cv_.notify_all();
    threads.swap(threads_);
  }
  for (auto& t : threads) t.join();
  // Posted before stop() but not yet run (nothing is dropped).
  std::deque<std::function<void()>> rest;
  {
    std::lock_guard lock(m_);
    rest.swap(queue_);
  }
  for (auto& fn : rest) fn();
}

void WorkerPool::main() {
  t_pool = this;
  std::unique_lock lock(m_);
  while (true) {
    cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping, nothing left
    auto fn = std::move(queue_.front());
    queue_.pop_front();
    lock.unlock();
    fn();
    lock.lock();
  }
}

}  // namespace gate
