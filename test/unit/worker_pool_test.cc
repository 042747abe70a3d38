// WorkerPool: fixed threads, order kept with one thread, nothing dropped at stop.
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "core/worker_pool.h"

using namespace gate;
using namespace std::chrono_literals;

TEST_CASE("a one-thread pool runs what is posted in order and on its own thread", "[unit][pool]") {
  WorkerPool pool(1, "test-pool");
  pool.start();
  std::mutex m;
  std::vector<int> order;
  bool on_pool = true;
  for (int i = 0; i < 100; ++i)
    pool.post([&, i] {
      std::lock_guard lock(m);
      order.push_back(i);
      on_pool = on_pool && pool.on_pool_thread();
    });
  pool.stop();  // runs what is queued first
  REQUIRE(order.size() == 100);
  for (int i = 0; i < 100; ++i) CHECK(order[static_cast<std::size_t>(i)] == i);
  CHECK(on_pool);
  CHECK_FALSE(pool.on_pool_thread());
}

TEST_CASE("a pool runs as many functions at once as it has threads and no more", "[unit][pool]") {
  WorkerPool pool(3, "test-pool");
  pool.start();
  std::mutex m;
  std::condition_variable cv;
  int running = 0, most = 0;
  bool go = false;
  std::set<std::thread::id> threads;
  for (int i = 0; i < 9; ++i)
    pool.post([&] {
      std::unique_lock lock(m);
      most = std::max(most, ++running);
      threads.insert(std::this_thread::get_id());
      cv.notify_all();
      cv.wait(lock, [&] { return go; });
      --running;
    });
  {
    std::unique_lock lock(m);
    REQUIRE(cv.wait_for(lock, 10s, [&] { return running == 3; }));
    go = true;
    cv.notify_all();
  }
  pool.stop();
  CHECK(most == 3);
  CHECK(threads.size() == 3);
  CHECK(running == 0);
}

TEST_CASE("after stop a post runs on the calling thread so that nothing is lost", "[unit][pool]") {
  WorkerPool pool(2, "test-pool");
  pool.start();
  pool.stop();
  pool.stop();  // idempotent
  std::thread::id ran_on;
  pool.post([&] { ran_on = std::this_thread::get_id(); });
  CHECK(ran_on == std::this_thread::get_id());
}
