#include "core/token.h"

#include <pthread.h>
#include <sys/random.h>

#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <stdexcept>

namespace gate {

namespace {

// Counts the forks this process came out of (as a child): a pool filled before the
// last one is refilled. Cheaper than a getpid() system call per token.
std::atomic<unsigned> g_forks{0};
const bool g_fork_hook = [] {
  return ::pthread_atfork(nullptr, nullptr, [] { g_forks.fetch_add(1, std::memory_order_relaxed); }) == 0;
}();

// Kernel randomness fetched 4 KiB at a time: one system call per 256 tokens.
// Per thread, and refilled after fork() so that parent and child never share bytes.
struct RandomPool {
  std::uint8_t bytes[4096];
  std::size_t used = sizeof bytes;
  unsigned forks = 0;

  void take(std::uint8_t* out, std::size_t n) {
    if (used + n > sizeof bytes || forks != g_forks.load(std::memory_order_relaxed) || !g_fork_hook) refill();
    std::memcpy(out, bytes + used, n);
    std::memset(bytes + used, 0, n);
    used += n;
  }
  void refill() {
    std::size_t got = 0;
    while (got < sizeof bytes) {
      ssize_t n = ::getrandom(bytes + got, sizeof bytes - got, 0);
      if (n < 0) throw std::runtime_error("getrandom failed");
      got += static_cast<std::size_t>(n);
    }
    used = 0;
    forks = g_forks.load(std::memory_order_relaxed);
  }
};

}  // namespace

std::string random_token() {
  thread_local RandomPool pool;
  std::uint8_t bytes[16];
  pool.take(bytes, sizeof bytes);
  return hex_of(bytes, sizeof bytes);
}

std::string hex_of(const unsigned char* bytes, std::size_t n) {
  static const char* hex = "0123456789abcdef";
  std::string out;
  out.reserve(2 * n);
  for (std::size_t i = 0; i < n; ++i) {
    out.push_back(hex[bytes[i] >> 4]);
    out.push_back(hex[bytes[i] & 15]);
  }
  return out;
}

}  // namespace gate
