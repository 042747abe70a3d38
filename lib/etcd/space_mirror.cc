#include "etcd/space_mirror.h"

#include <algorithm>

namespace gate::etcd {

SpaceMirror::SpaceMirror(std::vector<Endpoint> endpoints, std::function<void()> on_change)
    : endpoints_(std::move(endpoints)), on_change_(std::move(on_change)), client_(endpoints_) {}

SpaceMirror::~SpaceMirror() { stop(); }

Result<std::int64_t> SpaceMirror::load() {
  const std::string root(kRoot);
  Result<RangeResult> r = client_.range(range_request(root, prefix_end(root)));
  if (!r.ok()) return Status::failure("cannot read the lock space: " + r.message());
  {
    std::lock_guard lock(mu_);
    space_.clear();
    versions_.clear();
    lock_ids_.clear();
    ends_.clear();
    waiting_.clear();
    recalls_.clear();
    for (const KeyValue& kv : r->kvs) put_kv(kv);
    revision_ = r->revision;
  }
  cv_.notify_all();
  return r->revision;
}

void SpaceMirror::put_kv(const KeyValue& kv) {
  static const std::string kVersions = std::string(kRoot) + "v/";
  if (kv.key.compare(0, kVersions.size(), kVersions) == 0) {
    const std::optional<std::string> lock_key = unhex(std::string_view(kv.key).substr(kVersions.size()));
    std::uint64_t v = 0;
    try {
      v = std::stoull(kv.value);
    } catch (const std::exception&) {
      ++skipped_;
      last_problem_ = "version " + kv.key + ": its value is not a number";
      return;
    }
    if (lock_key) versions_[*lock_key] = v;
    return;
  }
  if (std::optional<std::string> recalled = lock_key_of_recall(kv.key)) {
    recalls_[kv.key] = *recalled;
    return;
  }
  static const std::string kQueues = all_queues_prefix();
  if (kv.key.compare(0, kQueues.size(), kQueues) != 0) return;  // a broker's or a lock id's key
  Result<Entry> e = decode_entry(kv);
  if (!e.ok()) {
    ++skipped_;
    last_problem_ = e.message();
    delete_key(kv.key);  // (what it was before is gone either way)
    return;
  }
  put_entry(std::move(*e));
}

void SpaceMirror::note_had(const Entry& e) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point now = Clock::now();
  had_[e.lock_key][e.broker] = now;
  if (++had_since_prune_ < 4096) return;
  // What is older than any window asked about goes (a minute: windows are seconds).
  had_since_prune_ = 0;
  for (auto k = had_.begin(); k != had_.end();) {
    std::erase_if(k->second, [&](const auto& b) { return now - b.second > std::chrono::minutes(1); });
    k = k->second.empty() ? had_.erase(k) : std::next(k);
  }
}

bool SpaceMirror::other_broker_within(const std::string& lock_key, const std::string& me,
                                      std::chrono::microseconds window) const {
  std::lock_guard lock(mu_);
  auto k = had_.find(lock_key);
  if (k == had_.end()) return false;
  const auto since = std::chrono::steady_clock::now() - window;
  for (const auto& [broker, at] : k->second)
    if (broker != me && at >= since) return true;
  return false;
}

void SpaceMirror::put_entry(Entry e) {
  note_had(e);
  Queue& q = space_[e.lock_key];
  auto same = std::find_if(q.begin(), q.end(), [&](const Entry& x) { return x.key == e.key; });
  if (same != q.end()) {
    unindex(*same);
    index(e);
    *same = std::move(e);
    return;
  }
  index(e);
  q.insert(std::upper_bound(q.begin(), q.end(), e, queue_order), std::move(e));
}

void SpaceMirror::delete_key(const std::string& key) {
  if (recalls_.erase(key)) return;
  const std::optional<std::string> lock_key = lock_key_of(key);
  if (!lock_key) return;
  auto it = space_.find(*lock_key);
  if (it == space_.end()) return;
  Queue& q = it->second;
  auto e = std::find_if(q.begin(), q.end(), [&](const Entry& x) { return x.key == key; });
  if (e == q.end()) return;
  note_had(*e);
  unindex(*e);
  q.erase(e);
  if (q.empty()) space_.erase(it);
}

void SpaceMirror::index(const Entry& e) {
  if (!e.lock_id.empty()) lock_ids_[e.lock_id] = e.key;
  if (e.lend) return;  // ends with its broker, never by time
  if (e.held) ends_.emplace(e.ends_at(), e.key);
  else waiting_[e.key] = {e.lock_key, e.broker};
}

void SpaceMirror::unindex(const Entry& e) {
  if (auto id = lock_ids_.find(e.lock_id); id != lock_ids_.end() && id->second == e.key) lock_ids_.erase(id);
  if (e.lend) return;
  if (!e.held) {
    waiting_.erase(e.key);
    return;
  }
  for (auto [at, end] = ends_.equal_range(e.ends_at()); at != end; ++at)
    if (at->second == e.key) {
      ends_.erase(at);
      return;
    }
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
      endpoints_, std::string(kRoot), prefix_end(kRoot), from,
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
      if (ev.deleted) delete_key(ev.kv.key);
      else put_kv(ev.kv);
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

Space SpaceMirror::snapshot(std::int64_t* revision) const {
  std::lock_guard lock(mu_);
  if (revision) *revision = revision_;
  return space_;
}

Space SpaceMirror::contested(const std::string& also) const {
  std::lock_guard lock(mu_);
  Space out;
  auto take = [&](const std::string& lock_key) {
    if (!out.count(lock_key))
      if (auto q = space_.find(lock_key); q != space_.end()) out.emplace(lock_key, q->second);
  };
  for (const auto& [key, w] : waiting_) take(w.lock_key);
  take(also);
  return out;
}

std::pair<std::size_t, std::size_t> SpaceMirror::counts() const {
  std::lock_guard lock(mu_);
  return {ends_.size(), waiting_.size()};
}

SpaceMirror::Due SpaceMirror::due(Micros now, const std::string& broker) const {
  std::lock_guard lock(mu_);
  Due d;
  auto end = ends_.upper_bound(now);
  for (auto it = ends_.begin(); it != end; ++it)
    if (const Entry* e = at(it->second)) d.ended.push_back(*e);
  if (end != ends_.end()) d.next_end = end->first;
  for (const auto& [key, w] : waiting_)
    if (w.broker == broker)
      if (const Entry* e = at(key)) d.waiting.push_back(*e);
  return d;
}

std::optional<Entry> SpaceMirror::entry(const std::string& key) const {
  std::lock_guard lock(mu_);
  const Entry* e = at(key);
  return e ? std::optional<Entry>(*e) : std::nullopt;
}

const Entry* SpaceMirror::at(const std::string& key) const {
  const std::optional<std::string> lock_key = lock_key_of(key);
  auto q = lock_key ? space_.find(*lock_key) : space_.end();
  return q == space_.end() ? nullptr : find_entry(q->second, key);
}

Queue SpaceMirror::queue(const std::string& lock_key) const {
  std::lock_guard lock(mu_);
  auto it = space_.find(lock_key);
  return it == space_.end() ? Queue{} : it->second;
}

SpaceMirror::KeyView SpaceMirror::view(const std::string& lock_key) const {
  std::lock_guard lock(mu_);
  KeyView v;
  if (auto it = space_.find(lock_key); it != space_.end()) v.queue = it->second;
  if (auto it = versions_.find(lock_key); it != versions_.end()) v.version = it->second;
  v.revision = revision_;
  return v;
}

bool SpaceMirror::recalled(const std::string& lock_key) const {
  std::lock_guard lock(mu_);
  for (const auto& [key, of] : recalls_)
    if (of == lock_key) return true;
  return false;
}

std::optional<Entry> SpaceMirror::find_lock(const std::string& lock_id) const {
  std::lock_guard lock(mu_);
  auto id = lock_ids_.find(lock_id);
  const Entry* e = id == lock_ids_.end() ? nullptr : at(id->second);
  return e ? std::optional<Entry>(*e) : std::nullopt;
}

std::uint64_t SpaceMirror::version_of(const std::string& lock_key) const {
  std::lock_guard lock(mu_);
  auto it = versions_.find(lock_key);
  return it == versions_.end() ? 0 : it->second;
}

std::map<std::string, std::uint64_t> SpaceMirror::versions() const {
  std::lock_guard lock(mu_);
  return versions_;
}

std::int64_t SpaceMirror::revision() const {
  std::lock_guard lock(mu_);
  return revision_;
}

bool SpaceMirror::wait_for(std::int64_t revision, std::chrono::milliseconds limit) const {
  std::unique_lock lock(mu_);
  return cv_.wait_for(lock, limit, [&] { return revision_ >= revision; });
}

void SpaceMirror::resync() {
  {
    std::lock_guard lock(mu_);
    resync_ = true;
  }
  cv_.notify_all();
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
