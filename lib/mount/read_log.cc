#include "mount/read_log.h"

#include <algorithm>

namespace gate::mount {

void ReadLog::read(const std::string& agent, const std::string& key, std::uint64_t version) {
  std::lock_guard guard(m_);
  Reads& r = reads_[{agent, key}];
  r.touched = ++tick_;
  if (r.rebase) {
    r.versions.clear();
    r.rebase = false;
  }
  auto at = std::lower_bound(r.versions.begin(), r.versions.end(), version);
  if (at == r.versions.end() || *at != version) r.versions.insert(at, version);
  // Too many: drop the second oldest (the oldest decides staleness; the newest
  // are the likeliest bases of a merge).
  if (r.versions.size() > max_versions_) r.versions.erase(r.versions.begin() + 1);
  if (reads_.size() > max_entries_) trim_locked();
}

void ReadLog::forget(const std::string& agent, const std::string& key) {
  std::lock_guard guard(m_);
  reads_.erase({agent, key});
}

void ReadLog::refused(const std::string& agent, const std::string& key) {
  std::lock_guard guard(m_);
  if (auto it = reads_.find({agent, key}); it != reads_.end()) it->second.rebase = true;
}

bool ReadLog::stale(const std::string& agent, const std::string& key, std::uint64_t current) const {
  std::lock_guard guard(m_);
  auto it = reads_.find({agent, key});
  return it != reads_.end() && !it->second.versions.empty() && it->second.versions.front() < current;
}

std::vector<std::uint64_t> ReadLog::reads(const std::string& agent, const std::string& key) const {
  std::lock_guard guard(m_);
  auto it = reads_.find({agent, key});
  return it == reads_.end() ? std::vector<std::uint64_t>{} : it->second.versions;
}

std::size_t ReadLog::size() const {
  std::lock_guard guard(m_);
  return reads_.size();
}

void ReadLog::trim_locked() {
  // Forget the tenth touched longest ago: one pass per max_entries/10 new pairs.
  std::vector<std::uint64_t> ticks;
  ticks.reserve(reads_.size());
  for (const auto& [k, r] : reads_) ticks.push_back(r.touched);
  auto cut = ticks.begin() + static_cast<std::ptrdiff_t>(ticks.size() / 10);
  std::nth_element(ticks.begin(), cut, ticks.end());
  const std::uint64_t below = *cut;
  std::erase_if(reads_, [below](const auto& e) { return e.second.touched < below; });
}

}  // namespace gate::mount
