#pragma once
// ReadLog: which versions of each file each agent has read, for the stale
// replacement check (locking.md, "Stale replacement").
//
// The reads of agent A on key P are the versions of P that A opened for reading
// since A last changed P. A replacement of P by A is stale when P's current version
// is newer than the oldest of those reads: someone else changed P after A looked at
// it. No reads: never stale (a blind write of a file A never read through the mount
// is not a lost update this mount can see).
//
// Memory is bounded: at most `max_versions` distinct versions per (agent, key), the
// oldest always kept (it decides staleness); past `max_entries` pairs, the ones
// touched longest ago are forgotten (an agent forgotten that way is simply never
// found stale for that key). Thread-safe.
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace gate::mount {

class ReadLog {
 public:
  explicit ReadLog(std::size_t max_entries = 100'000, std::size_t max_versions = 16)
      : max_entries_(max_entries), max_versions_(max_versions) {}

  // `agent` opened `key` for reading at `version`.
  void read(const std::string& agent, const std::string& key, std::uint64_t version);
  // `agent` changed `key`: its reads of `key` start afresh.
  void forget(const std::string& agent, const std::string& key);
  // `agent` was refused a stale replacement of `key`: it stays stale (a fallback
  // save without a read, such as an O_TRUNC write after a refused rename, is
  // refused too) until its next read of `key`, which is then its only one.
  void refused(const std::string& agent, const std::string& key);
  // Whether a replacement of `key` by `agent` now, with `key` at `current`, is stale.
  bool stale(const std::string& agent, const std::string& key, std::uint64_t current) const;
  // The versions `agent` read of `key` since its last change, oldest first.
  std::vector<std::uint64_t> reads(const std::string& agent, const std::string& key) const;
  std::size_t size() const;

 private:
  using Key = std::pair<std::string, std::string>;  // agent, key
  struct Reads {
    std::vector<std::uint64_t> versions;  // ascending, distinct
    std::uint64_t touched = 0;
    bool rebase = false;  // refused: the next read replaces these
  };
  void trim_locked();

  const std::size_t max_entries_, max_versions_;
  mutable std::mutex m_;
  std::map<Key, Reads> reads_;
  std::uint64_t tick_ = 0;
};

}  // namespace gate::mount
