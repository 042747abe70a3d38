#include "lock/lock_table.h"

#include <algorithm>
#include <utility>

namespace gate {

Micros Lock::ends_at() const {
  Micros end = lease_expires_at;
  if (max_hold_ms) end = std::min(end, acquired_at + *max_hold_ms * 1000);
  return end;
}

LockTable::LockTable(LockTableOptions options, IdSource new_lock_id)
    : options_(options), new_lock_id_(std::move(new_lock_id)) {}

std::string LockTable::owner_key(const std::string& owner, const std::string& key) {
  std::string k = owner;
  k.push_back('\0');
  k += key;
  return k;
}

std::string LockTable::session_of(const std::string& session, const std::string& owner) {
  return session.empty() ? "owner:" + owner : session;
}

std::int64_t LockTable::effective_max_hold(std::optional<std::int64_t> asked) const {
  const std::int64_t cap = options_.max_hold_ms;
  if (asked && *asked > 0) return cap > 0 ? std::min(*asked, cap) : *asked;
  return cap > 0 ? cap : 0;
}

Lock* LockTable::holder_of(const std::string& owner, const std::string& key) {
  auto it = by_owner_key_.find(owner_key(owner, key));
  return it == by_owner_key_.end() ? nullptr : it->second;
}

bool LockTable::write_held_by_other(const KeyState& ks, const std::string& owner) const {
  for (const Lock* l : ks.holders)
    if (l->mode == LockMode::Write && l->owner != owner) return true;
  return false;
}

bool LockTable::held_only_by(const KeyState& ks, const std::string& owner) const {
  for (const Lock* l : ks.holders)
    if (l->owner != owner) return false;
  return true;
}

void LockTable::index_lock(const Lock& l) {
  lock_deadlines_.emplace(l.ends_at(), const_cast<Lock*>(&l));
}
void LockTable::unindex_lock(const Lock& l) {
  lock_deadlines_.erase({l.ends_at(), const_cast<Lock*>(&l)});
}

void LockTable::put_lock_journal(const Lock& l) {
  record(JournalEntry::Kind::PutLock, [&](JournalEntry& e) { e.lock = l; });
}

void LockTable::reserve_fences() {
  if (next_fence_ < fence_reserved_) return;
  fence_reserved_ = next_fence_ + kFenceBlock;
  record(JournalEntry::Kind::Counters, [&](JournalEntry& e) { e.fence_floor = fence_reserved_; });
}

Lock& LockTable::insert_lock(Lock l) {
  auto [it, inserted] = locks_.emplace(l.lock_id, std::move(l));
  Lock& stored = it->second;
  by_owner_key_[owner_key(stored.owner, stored.key)] = &stored;
  keys_[stored.key].holders.push_back(&stored);
  index_lock(stored);
  return stored;
}

AcquireResult LockTable::acquire(const AcquireParams& p, Micros now) {
  expire(now);
  AcquireResult result;

  if (Lock* own = holder_of(p.owner, p.key)) {
    // A lock granted to an orphaned request is claimed by the repeat of that request.
    if (!p.request_id.empty() && own->unclaimed_request_id == p.request_id) {
      own->unclaimed_request_id.clear();
      unindex_lock(*own);
      own->lease_expires_at = now + own->lease_ms * 1000;
      index_lock(*own);
      put_lock_journal(*own);
      result.kind = AcquireResult::Kind::Granted;
      result.lock = *own;
      return result;
    }
    const bool upgrade = own->mode == LockMode::Read && p.mode == LockMode::Write;
    if (!upgrade || held_only_by(keys_.at(p.key), p.owner)) {
      reenter(*own, p.mode, now);
      result.kind = AcquireResult::Kind::Granted;
      result.lock = *own;
      return result;
    }
  }

  KeyState& ks = keys_[p.key];
  if (!p.request_id.empty()) {
    for (auto id : ks.queue) {
      QueuedRequest& q = requests_.at(id);
      if (q.request_id != p.request_id || q.owner != p.owner || q.mode != p.mode) continue;
      if (q.deadline) request_deadlines_.erase({*q.deadline, q.req_id});
      q.orphan = false;
      q.deadline.reset();
      if (p.timeout_ms && *p.timeout_ms > 0) {
        q.deadline = now + *p.timeout_ms * 1000;
        request_deadlines_.emplace(*q.deadline, q.req_id);
      }
      q.persisted = true;
      record(JournalEntry::Kind::PutRequest, [&](JournalEntry& e) { e.request = q; });
      result.kind = AcquireResult::Kind::Queued;
      result.req_id = q.req_id;
      result.replaced_req_id = q.req_id;
      return result;
    }
  }

  QueuedRequest r;
  r.req_id = next_req_id_++;
  r.key = p.key;
  r.mode = p.mode;
  r.owner = p.owner;
  r.session = session_of(p.session, p.owner);
  r.request_id = p.request_id;
  r.requested_at = now;
  r.who = p.who;
  r.lease_ms = p.lease_ms && *p.lease_ms > 0 ? *p.lease_ms : options_.default_lease_ms;
  if (auto cap = effective_max_hold(p.max_hold_ms); cap > 0) r.max_hold_ms = cap;
  if (ks.queue.empty() && grantable(ks, r)) {
    // Nobody queued and nothing in the way: what pump() would do with it at the head
    // of the queue, without queueing it first.
    result.kind = AcquireResult::Kind::Granted;
    result.lock = grant(std::move(r), now);
    return result;
  }
  const std::uint64_t id = r.req_id;
  ks.queue.push_back(id);
  waiting_by_session_[r.session].insert(id);
  requests_.emplace(id, std::move(r));
  pump(p.key, now);

  if (!requests_.count(id)) {
    // Granted by pump: hand the grant back directly instead of as an event.
    auto it = std::find_if(events_.begin(), events_.end(), [id](const Event& e) {
      return e.kind == Event::Kind::Granted && e.req_id == id;
    });
    result.kind = AcquireResult::Kind::Granted;
    result.lock = it->lock;
    events_.erase(it);
    return result;
  }
  if (p.timeout_ms && *p.timeout_ms <= 0) {
    remove_request(id);
    result.kind = AcquireResult::Kind::Timeout;
    return result;
  }
  if (auto cycle = find_deadlock(requests_.at(id))) {
    remove_request(id);
    result.kind = AcquireResult::Kind::Deadlock;
    result.error = *cycle;
    return result;
  }
  QueuedRequest& q = requests_.at(id);
  if (p.timeout_ms) {
    q.deadline = now + *p.timeout_ms * 1000;
    request_deadlines_.emplace(*q.deadline, id);
  }
  q.persisted = true;
  record(JournalEntry::Kind::PutRequest, [&](JournalEntry& e) { e.request = q; });
  result.kind = AcquireResult::Kind::Queued;
  result.req_id = id;
  return result;
}

void LockTable::reenter(Lock& lock, LockMode mode, Micros now) {
  unindex_lock(lock);
  lock.hold_count += 1;
  if (mode == LockMode::Write) lock.mode = LockMode::Write;
  lock.lease_expires_at = std::max(lock.lease_expires_at, now + lock.lease_ms * 1000);
  index_lock(lock);
  put_lock_journal(lock);
}

Lock& LockTable::grant(QueuedRequest&& r, Micros now) {
  if (Lock* own = holder_of(r.owner, r.key)) {
    reenter(*own, r.mode, now);
    return *own;
  }
  Lock l;
  l.lock_id = new_lock_id_();
  l.key = std::move(r.key);
  l.mode = r.mode;
  l.owner = std::move(r.owner);
  l.session = std::move(r.session);
  l.acquired_at = now;
  l.lease_ms = r.lease_ms;
  l.lease_expires_at = now + r.lease_ms * 1000;
  l.max_hold_ms = r.max_hold_ms;
  l.hold_count = 1;
  if (fence_source_) {
    l.fence = fence_source_(l.key);
  } else {
    l.fence = next_fence_++;
    reserve_fences();
  }
  l.who = std::move(r.who);
  if (r.orphan) {
    // Nobody may be there to use it: keep it only until the grace period ends
    // unless its client comes back and claims it.
    l.unclaimed_request_id = std::move(r.request_id);
    if (r.deadline) l.lease_expires_at = std::min(l.lease_expires_at, *r.deadline);
  }
  Lock& stored = insert_lock(std::move(l));
  put_lock_journal(stored);
  return stored;
}

void LockTable::pump(const std::string& key, Micros now) {
  auto kit = keys_.find(key);
  if (kit == keys_.end()) return;
  KeyState& ks = kit->second;
  while (!ks.queue.empty()) {
    const std::uint64_t id = ks.queue.front();
    if (!grantable(ks, requests_.at(id))) break;
    Lock& l = grant(take_request(id), now);
    events_.push_back({Event::Kind::Granted, id, l, ""});
  }
  forget_key_if_idle(key);
}

bool LockTable::grantable(const KeyState& ks, const QueuedRequest& r) const {
  return r.mode == LockMode::Write ? held_only_by(ks, r.owner) : !write_held_by_other(ks, r.owner);
}

void LockTable::forget_key_if_idle(const std::string& key) {
  auto it = keys_.find(key);
  if (it != keys_.end() && it->second.holders.empty() && it->second.queue.empty())
    keys_.erase(it);
}

void LockTable::remove_request(std::uint64_t req_id) {
  if (requests_.count(req_id)) take_request(req_id);
}

QueuedRequest LockTable::take_request(std::uint64_t req_id) {
  auto node = requests_.extract(req_id);
  QueuedRequest& r = node.mapped();
  auto& q = keys_[r.key].queue;
  q.erase(std::find(q.begin(), q.end(), req_id));
  auto sit = waiting_by_session_.find(r.session);
  if (sit != waiting_by_session_.end()) {
    sit->second.erase(req_id);
    if (sit->second.empty()) waiting_by_session_.erase(sit);
  }
  if (r.deadline) request_deadlines_.erase({*r.deadline, req_id});
  if (r.persisted) {
    record(JournalEntry::Kind::DeleteRequest, [&](JournalEntry& e) { e.req_id = req_id; });
  }
  return std::move(r);
}

void LockTable::drop_lock(Lock* lock, const std::string& reason) {
  unindex_lock(*lock);
  by_owner_key_.erase(owner_key(lock->owner, lock->key));
  auto& holders = keys_[lock->key].holders;
  holders.erase(std::find(holders.begin(), holders.end(), lock));
  record(JournalEntry::Kind::DeleteLock, [&](JournalEntry& e) { e.lock_id = lock->lock_id; });
  auto node = locks_.extract(lock->lock_id);
  if (!reason.empty()) events_.push_back({Event::Kind::Dropped, 0, std::move(node.mapped()), reason});
}

std::size_t LockTable::holders(const std::string& key) const {
  auto it = keys_.find(key);
  return it == keys_.end() ? 0 : it->second.holders.size();
}

std::vector<Lock> LockTable::take_key(const std::string& key) {
  std::vector<Lock> out = locks(key);
  for (const Lock& l : out) drop_lock(&locks_.at(l.lock_id), "");
  forget_key_if_idle(key);
  return out;
}

OpStatus LockTable::release(const std::string& lock_id, const std::string& owner, Micros now,
                            bool changed) {
  expire(now);
  auto it = locks_.find(lock_id);
  if (it == locks_.end()) return OpStatus::NotFound;
  Lock& l = it->second;
  if (l.owner != owner) return OpStatus::Forbidden;
  if (changed && l.mode == LockMode::Write) {
    std::uint64_t& v = versions_[l.key];
    if (l.fence > v) {
      v = l.fence;
      if (keep_version_changes_) version_changes_[l.key] = v;
      record(JournalEntry::Kind::PutVersion, [&](JournalEntry& e) { e.key = l.key; e.version = v; });
    }
  }
  if (--l.hold_count > 0) {
    put_lock_journal(l);
    return OpStatus::Ok;
  }
  std::string key = l.key;
  drop_lock(&l, "");
  pump(key, now);
  return OpStatus::Ok;
}

OpStatus LockTable::heartbeat(const std::string& lock_id, const std::string& owner,
                              std::optional<std::int64_t> lease_ms, Micros now, Lock* out) {
  expire(now);
  auto it = locks_.find(lock_id);
  if (it == locks_.end()) return OpStatus::NotFound;
  Lock& l = it->second;
  if (l.owner != owner) return OpStatus::Forbidden;
  unindex_lock(l);
  if (lease_ms && *lease_ms > 0) l.lease_ms = *lease_ms;
  l.lease_expires_at = now + l.lease_ms * 1000;
  index_lock(l);
  put_lock_journal(l);
  if (out) *out = l;
  return OpStatus::Ok;
}

bool LockTable::cancel(std::uint64_t req_id, Micros now) {
  auto it = requests_.find(req_id);
  if (it == requests_.end()) return false;
  std::string key = it->second.key;
  remove_request(req_id);
  pump(key, now);
  return true;
}

void LockTable::expire(Micros now) {
  std::set<std::string> touched;
  while (!lock_deadlines_.empty() && lock_deadlines_.begin()->first <= now) {
    Lock* l = lock_deadlines_.begin()->second;
    const bool capped = l->max_hold_ms && l->acquired_at + *l->max_hold_ms * 1000 <= now &&
                        l->acquired_at + *l->max_hold_ms * 1000 <= l->lease_expires_at;
    touched.insert(l->key);
    drop_lock(l, capped ? "hold cap reached" : "lease expired");
  }
  while (!request_deadlines_.empty() && request_deadlines_.begin()->first <= now) {
    const std::uint64_t id = request_deadlines_.begin()->second;
    touched.insert(requests_.at(id).key);
    remove_request(id);
    events_.push_back({Event::Kind::TimedOut, id, {}, ""});
  }
  for (const auto& key : touched) pump(key, now);
}

std::optional<Micros> LockTable::next_deadline() const {
  std::optional<Micros> next;
  if (!lock_deadlines_.empty()) next = lock_deadlines_.begin()->first;
  if (!request_deadlines_.empty()) {
    Micros r = request_deadlines_.begin()->first;
    next = next ? std::min(*next, r) : r;
  }
  return next;
}

// Who must move before r can be granted: the holders of its key that conflict with
// it (not its own owner's lock) and the requests queued ahead of it that conflict.
// A deadlock is a chain of such waits that reaches a lock held by r's own session.
std::optional<std::string> LockTable::find_deadlock(const QueuedRequest& root) const {
  const std::string& self = root.session;
  std::set<std::string> seen_sessions;
  std::set<std::uint64_t> seen_requests;
  std::vector<const QueuedRequest*> todo{&root};
  seen_requests.insert(root.req_id);

  auto visit_session = [&](const std::string& s) {
    if (!seen_sessions.insert(s).second) return;
    auto it = waiting_by_session_.find(s);
    if (it == waiting_by_session_.end()) return;
    for (auto id : it->second)
      if (seen_requests.insert(id).second) todo.push_back(&requests_.at(id));
  };

  while (!todo.empty()) {
    const QueuedRequest* r = todo.back();
    todo.pop_back();
    const KeyState& ks = keys_.at(r->key);
    for (const Lock* holder : ks.holders) {
      const Lock& l = *holder;
      if (l.owner == r->owner) continue;
      if (r->mode == LockMode::Read && l.mode == LockMode::Read) continue;
      if (l.session == self)
        return "session " + self + " would wait for '" + r->key +
               "', which it holds itself (" + to_string(l.mode) + ")";
      visit_session(l.session);
    }
    for (auto id : ks.queue) {
      if (id >= r->req_id) break;  // the queue is in req_id order
      const QueuedRequest& q = requests_.at(id);
      if (r->mode == LockMode::Read && q.mode == LockMode::Read) continue;
      if (seen_requests.insert(id).second) todo.push_back(&q);
      if (q.session != self) visit_session(q.session);
    }
  }
  return std::nullopt;
}

std::uint64_t LockTable::version_of(const std::string& key) const {
  auto it = versions_.find(key);
  return it == versions_.end() ? 0 : it->second;
}

namespace {

// What a saved number may be: durations as the API takes them (about 100 years),
// times and fences far below where arithmetic on them could overflow.
constexpr std::int64_t kMaxSavedMillis = 3'200'000'000'000;
constexpr Micros kMaxSavedMicros = Micros{1} << 62;
constexpr std::uint64_t kMaxSavedFence = std::uint64_t{1} << 62;
bool saved_ms(std::int64_t ms) { return ms > 0 && ms <= kMaxSavedMillis; }
bool saved_time(Micros t) { return t >= 0 && t <= kMaxSavedMicros; }
bool saved_cap(const std::optional<std::int64_t>& ms) { return !ms || (*ms >= 0 && *ms <= kMaxSavedMillis); }

}  // namespace

std::size_t LockTable::restore(std::vector<Lock> locks, std::vector<QueuedRequest> queue,
                               std::uint64_t next_fence, Micros now,
                               std::unordered_map<std::string, std::uint64_t> versions) {
  std::size_t left_out = 0;
  if (next_fence < kMaxSavedFence) next_fence_ = std::max(next_fence_, next_fence);
  else ++left_out;
  for (auto it = versions.begin(); it != versions.end();) {
    if (it->second >= kMaxSavedFence) {
      ++left_out;
      it = versions.erase(it);
      continue;
    }
    next_fence_ = std::max(next_fence_, it->second + 1);
    ++it;
  }
  versions_ = std::move(versions);
  for (auto& l : locks) {
    // Its fence was handed out, kept or not: never again.
    if (l.fence < kMaxSavedFence) next_fence_ = std::max(next_fence_, l.fence + 1);
    const auto ks = keys_.find(l.key);
    const bool fits = ks == keys_.end() ||
                      (l.mode == LockMode::Read && !write_held_by_other(ks->second, l.owner));
    if (l.lock_id.empty() || l.key.empty() || l.owner.empty() || l.hold_count < 1 ||
        !saved_ms(l.lease_ms) || !saved_cap(l.max_hold_ms) ||
        !saved_time(l.acquired_at) || !saved_time(l.lease_expires_at) || l.fence == 0 ||
        l.fence >= kMaxSavedFence || locks_.count(l.lock_id) || holder_of(l.owner, l.key) || !fits) {
      ++left_out;
      continue;
    }
    // Nobody could heartbeat while the broker was down: give each lock its lease anew.
    l.lease_expires_at = std::max(l.lease_expires_at, now + l.lease_ms * 1000);
    insert_lock(std::move(l));
  }
  fence_reserved_ = next_fence_;  // the next grant saves a new floor
  std::sort(queue.begin(), queue.end(),
            [](const auto& a, const auto& b) { return a.req_id < b.req_id; });
  const Micros grace_end = now + options_.restore_grace_ms * 1000;
  for (auto& r : queue) {
    if (r.req_id == 0 || r.req_id >= kMaxSavedFence || r.key.empty() || r.owner.empty() ||
        requests_.count(r.req_id) || !saved_ms(r.lease_ms) ||
        !saved_cap(r.max_hold_ms) || !saved_time(r.requested_at) ||
        (r.deadline && !saved_time(*r.deadline))) {
      ++left_out;
      continue;
    }
    next_req_id_ = std::max(next_req_id_, r.req_id + 1);
    r.orphan = true;
    r.persisted = true;
    r.deadline = r.deadline ? std::min(*r.deadline, grace_end) : grace_end;
    request_deadlines_.emplace(*r.deadline, r.req_id);
    keys_[r.key].queue.push_back(r.req_id);
    waiting_by_session_[r.session].insert(r.req_id);
    std::uint64_t id = r.req_id;
    requests_.emplace(id, std::move(r));
  }
  expire(now);
  std::vector<std::string> all;
  for (const auto& [key, ks] : keys_) all.push_back(key);
  for (const auto& key : all) pump(key, now);
  return left_out;
}

std::size_t LockTable::adopt(TableState state, Micros now) {
  // Its request numbers are the delegate's: new ones here, in the same order.
  for (QueuedRequest& r : state.queue) {
    r.req_id = next_req_id_++;
    r.persisted = false;
  }
  // Its versions where newer (journaled there); restore() takes the whole map. Those
  // out of range count as left out, as restore() counts them.
  std::size_t bad_versions = 0;
  for (const auto& [key, v] : state.versions) bad_versions += v >= kMaxSavedFence;
  merge_versions(state.versions);
  std::vector<std::string> lock_ids;
  for (const Lock& l : state.locks) lock_ids.push_back(l.lock_id);
  std::vector<std::uint64_t> req_ids;
  for (const QueuedRequest& r : state.queue) req_ids.push_back(r.req_id);
  const std::size_t left_out =
      bad_versions + restore(std::move(state.locks), std::move(state.queue), state.next_fence, now, versions_);
  // restore() journals nothing of what it took in: the store learns it here.
  for (const std::string& id : lock_ids)
    if (const Lock* l = find_lock(id)) put_lock_journal(*l);
  for (std::uint64_t id : req_ids) {
    auto it = requests_.find(id);
    if (it == requests_.end()) continue;
    record(JournalEntry::Kind::PutRequest, [&](JournalEntry& e) { e.request = it->second; });
  }
  reserve_fences();
  return left_out;
}

TableState LockTable::export_state(bool with_versions) const {
  TableState s;
  s.locks = locks();
  for (const auto& [id, r] : requests_) s.queue.push_back(r);
  if (with_versions) s.versions = versions_;
  s.next_fence = next_fence_;
  return s;
}

std::unordered_map<std::string, std::uint64_t> LockTable::take_version_changes() {
  return std::exchange(version_changes_, {});
}

void LockTable::merge_versions(const std::unordered_map<std::string, std::uint64_t>& versions) {
  for (const auto& [key, v] : versions) {
    if (v == 0 || v >= kMaxSavedFence) continue;
    std::uint64_t& mine = versions_[key];
    if (v <= mine) continue;
    mine = v;
    next_fence_ = std::max(next_fence_, v + 1);
    record(JournalEntry::Kind::PutVersion, [&](JournalEntry& e) { e.key = key; e.version = v; });
  }
}

std::uint64_t LockTable::reserve_fence_block(std::uint64_t n) {
  const std::uint64_t first = next_fence_;
  next_fence_ += n;
  // The floor goes past the block at once (a durable commit: see reserve_fences).
  fence_reserved_ = next_fence_;
  reserve_fences();
  return first;
}

std::vector<Event> LockTable::take_events() { return std::exchange(events_, {}); }
std::vector<JournalEntry> LockTable::take_journal() { return std::exchange(journal_, {}); }

std::vector<Lock> LockTable::locks(const std::string& key) const {
  std::vector<Lock> out;
  if (key.empty()) {
    for (const auto& [id, l] : locks_) out.push_back(l);
    std::sort(out.begin(), out.end(), [](const Lock& a, const Lock& b) {
      return a.key != b.key ? a.key < b.key : a.fence < b.fence;
    });
    return out;
  }
  auto it = keys_.find(key);
  if (it == keys_.end()) return out;
  for (const Lock* l : it->second.holders) out.push_back(*l);
  return out;
}

std::vector<QueuedRequest> LockTable::queue(const std::string& key) const {
  std::vector<QueuedRequest> out;
  for (const auto& [id, r] : requests_)
    if (key.empty() || r.key == key) out.push_back(r);
  return out;
}

const Lock* LockTable::find_lock(const std::string& lock_id) const {
  auto it = locks_.find(lock_id);
  return it == locks_.end() ? nullptr : &it->second;
}

}  // namespace gate
