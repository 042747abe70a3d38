#include "etcd/space_mirror.h"

#include <algorithm>

namespace gate::etcd {

namespace {

// Puts `e` in its queue at its create revision's place, or over its older self.
void put_entry(Space& space, Entry e) {
  Queue& q = space[e.lock_key];
  auto same = std::find_if(q.begin(), q.end(), [&](const Entry& x) { return x.key == e.key; });
  if (same != q.end()) {
    *same = std::move(e);
    return;
  }
  auto at = std::upper_bound(q.begin(), q.end(), e.create_revision,
                             [](std::int64_t rev, const Entry& x) { return rev < x.create_revision; });
  q.insert(at, std::move(e));
}

void delete_entry(Space& space, const std::string& key) {
  const std::optional<std::string> lock_key = lock_key_of(key);
  if (!lock_key) return;
  auto it = space.find(*lock_key);
  if (it == space.end()) return;
  Queue& q = it->second;
  q.erase(std::remove_if(q.begin(), q.end(), [&](const Entry& x) { return x.key == key; }), q.end());
  if (q.empty()) space.erase(it);
}

}  // namespace

SpaceMirror::SpaceMirror(std::vector<Endpoint> endpoints, std::function<void()> on_change)
    : endpoints_(std::move(endpoints)), on_change_(std::move(on_change)), client_(endpoints_) {}

SpaceMirror::~SpaceMirror() { stop(); }

Result<std::int64_t> SpaceMirror::load() {
  Result<RangeResult> r = client_.range(range_request(all_queues_prefix(), prefix_end(all_queues_prefix())));
  if (!r.ok()) return Status::failure("cannot read the lock space: " + r.message());
  Space fresh;
  std::uint64_t skipped = 0;
  std::string problem;
  for (const KeyValue& kv : r->kvs) {
    Result<Entry> e = decode_entry(kv);
    if (!e.ok()) {
      ++skipped;
      problem = e.message();
      continue;
    }
    put_entry(fresh, std::move(*e));
  }
  {
    std::lock_guard lock(mu_);
    space_ = std::move(fresh);
    revision_ = r->revision;
    skipped_ += skipped;
    if (!problem.empty()) last_problem_ = problem;
  }
  cv_.notify_all();
  return r->revision;
}

Status SpaceMirror::start() {
  Result<std::int64_t> rev = load();
  if (!rev.ok()) return rev.status();
  start_watch(*rev + 1);
  resync_thread_ = std::thread([this] { resync_loop(); });
  return {};
}

void SpaceMirror::start_watch(std::int64_t from) {
  watch_ = std::make_unique<EtcdWatch>(
      endpoints_, all_queues_prefix(), prefix_end(all_queues_prefix()), from,
      [this](const WatchUpdate& u) { apply(u); },
      [this](const std::string& problem) {
        std::lock_guard lock(mu_);
        last_problem_ = problem;
      });
}

void SpaceMirror::stop() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (resync_thread_.joinable()) resync_thread_.join();
  if (watch_) watch_->stop();
}

void SpaceMirror::apply(const WatchUpdate& u) {
  {
    std::lock_guard lock(mu_);
    if (u.compacted) {
      // The watch ended: what it missed is read again (resync_loop).
      resync_ = true;
      last_problem_ = "the watch's start was compacted (revision " + std::to_string(u.compact_revision) +
                      "): reading the space again";
    }
    for (const WatchEvent& ev : u.events) {
      if (ev.deleted) {
        delete_entry(space_, ev.kv.key);
        continue;
      }
      Result<Entry> e = decode_entry(ev.kv);
      if (!e.ok()) {
        ++skipped_;
        last_problem_ = e.message();
        delete_entry(space_, ev.kv.key);  // (what it was before is gone either way)
        continue;
      }
      put_entry(space_, std::move(*e));
    }
    if (!u.events.empty()) revision_ = std::max(revision_, u.events.back().kv.mod_revision);
    else if (!u.compacted) revision_ = std::max(revision_, u.revision);
  }
  cv_.notify_all();
  if (on_change_ && !u.events.empty()) on_change_();
}

void SpaceMirror::resync_loop() {
  std::unique_lock lock(mu_);
  while (true) {
    cv_.wait(lock, [&] { return stopping_ || resync_; });
    if (stopping_) return;
    resync_ = false;
    lock.unlock();
    if (watch_) watch_->stop();
    Result<std::int64_t> rev = load();
    lock.lock();
    if (!rev.ok()) {
      // etcd out of reach: tried again in a moment, or at stop().
      last_problem_ = rev.message();
      resync_ = true;
      cv_.wait_for(lock, std::chrono::milliseconds(500), [&] { return stopping_; });
      continue;
    }
    ++resyncs_;
    lock.unlock();
    start_watch(*rev + 1);
    if (on_change_) on_change_();
    lock.lock();
  }
}

Space SpaceMirror::snapshot() const {
  std::lock_guard lock(mu_);
  return space_;
}

Queue SpaceMirror::queue(const std::string& lock_key) const {
  std::lock_guard lock(mu_);
  auto it = space_.find(lock_key);
  return it == space_.end() ? Queue{} : it->second;
}

std::int64_t SpaceMirror::revision() const {
  std::lock_guard lock(mu_);
  return revision_;
}

bool SpaceMirror::wait_for(std::int64_t revision, std::chrono::milliseconds limit) const {
  std::unique_lock lock(mu_);
  return cv_.wait_for(lock, limit, [&] { return revision_ >= revision; });
}

std::uint64_t SpaceMirror::resyncs() const {
  std::lock_guard lock(mu_);
  return resyncs_;
}

std::uint64_t SpaceMirror::skipped() const {
  std::lock_guard lock(mu_);
  return skipped_;
}

std::string SpaceMirror::last_problem() const {
  std::lock_guard lock(mu_);
  return last_problem_;
}

}  // namespace gate::etcd
