#include "mount/lock_agent.h"

#include <dirent.h>
#include <pthread.h>
#include <unistd.h>
#include <signal.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <fstream>

#include "core/iso_time.h"
#include "core/log.h"
#include "mount/reconnect.h"

namespace gate::mount {

namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr std::size_t kMaxIdleClients = 32;
constexpr auto kWaiterLinger = std::chrono::seconds(30);

}  // namespace

std::thread start_quiet_thread(std::function<void()> body) {
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, &old);
  std::thread t(std::move(body));
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  return t;
}

void LockJob::interrupt() {
  std::lock_guard lock(m_);
  interrupted_ = true;
  if (current_) current_->abort();
  cv_.notify_all();
}

LockAgent::LockAgent(LockAgentOptions options) : options_(std::move(options)) {}

LockAgent::~LockAgent() { stop(); }

void LockAgent::start() {
  if (heartbeat_.joinable()) return;
  heartbeat_ = start_quiet_thread([this] { heartbeat_main(); });
}

std::string LockAgent::new_owner() const { return options_.mount_id + ":" + random_token(); }

std::unique_ptr<BrokerClient> LockAgent::take_client() {
  {
    std::lock_guard lock(pool_m_);
    if (!idle_clients_.empty()) {
      auto client = std::move(idle_clients_.back());
      idle_clients_.pop_back();
      return client;
    }
  }
  // Connects lazily: a failure shows as Unavailable on the first call.
  return std::make_unique<BrokerClient>(options_.broker);
}

void LockAgent::give_back(std::unique_ptr<BrokerClient> client) {
  if (!client) return;
  std::lock_guard lock(pool_m_);
  if (idle_clients_.size() < kMaxIdleClients) idle_clients_.push_back(std::move(client));
}

namespace {

HeldLock held_from(const LockNeed& need, const LockInfo& granted) {
  return {need.key, need.mode, granted.lock_id, need.owner, granted.fence, granted.version};
}

}  // namespace

AcquireRequest LockAgent::make_request(const LockJob& job, std::size_t index,
                                       std::optional<std::int64_t> timeout_ms) const {
  const LockNeed& need = job.needs[index];
  AcquireRequest req;
  req.key = need.key;
  req.mode = need.mode;
  req.owner = need.owner;
  req.timeout_ms = timeout_ms;
  req.lease_ms = options_.lease_ms;
  req.max_hold_ms = options_.max_hold_ms;
  req.session = options_.mount_id + ":" + std::to_string(job.pid);
  req.request_id = job.request_ids_[index];
  req.agent = job.agent;
  req.pid = job.process > 0 ? job.process : job.pid;
  req.command = job.command;
  return req;
}

int LockAgent::classify(const CallResult& r, const LockJob& job, std::size_t index,
                        const BrokerClient& client, bool try_once) const {
  const LockNeed& need = job.needs[index];
  switch (r.status) {
    case CallStatus::Ok:
      return 0;
    case CallStatus::Timeout:
      return try_once ? -1 : EAGAIN;
    case CallStatus::Deadlock:
      log(LogLevel::Info, "mount", "refused ", to_string(need.mode), " lock on ", need.key,
          " for pid ", job.pid, ": it would deadlock (", r.error, "); returning EDEADLK");
      return EDEADLK;
    case CallStatus::Unavailable:
      log(LogLevel::Error, "mount", "broker at ", client.endpoint().describe(),
          " is unreachable (", r.error, "); ", to_string(need.mode), " lock on ", need.key,
          " fails with EIO");
      return EIO;
    case CallStatus::BadRequest:
      log(LogLevel::Warn, "mount", "broker refused the lock request for ", need.key, ": ",
          r.error);
      return need.key.size() > defaults::kMaxKeyBytes ? ENAMETOOLONG : EIO;
    case CallStatus::Forbidden:
    case CallStatus::NotFound:
      log(LogLevel::Warn, "mount", "unexpected broker answer ", to_string(r.status),
          " to an acquire of ", need.key, ": ", r.error);
      return EIO;
  }
  return EIO;
}

void LockAgent::run(const std::shared_ptr<LockJob>& job) {
  job->started_ = Clock::now();
  job->request_ids_.clear();
  for (std::size_t i = 0; i < job->needs.size(); ++i)
    job->request_ids_.push_back(random_token());
  if (stopping_) return finish(job, EIO);

  // Fast path: every lock that is free now is taken here, with one round trip each.
  auto client = take_client();
  std::size_t i = job->held.size();
  for (; i < job->needs.size(); ++i) {
    const std::uint64_t epoch = release_epoch();
    // (BrokerClient itself retries once when a kept-alive connection turns out closed.)
    CallResult r = client->acquire(make_request(*job, i, 0));
    if (r.status == CallStatus::Deadlock && !job->nonblocking &&
        release_in_flight(*job, i, epoch))
      break;  // a waiter waits for that release, then asks again
    int err = classify(r, *job, i, *client, /*try_once=*/true);
    if (err == 0) {
      job->held.push_back(held_from(job->needs[i], r.lock));
      continue;
    }
    if (err == -1 && !job->nonblocking) break;
    give_back(std::move(client));
    return finish(job, err == -1 ? EAGAIN : err);
  }
  if (i == job->needs.size()) {
    give_back(std::move(client));
    return finish(job, 0);
  }
  if (auto deadline = deadline_of(*job); deadline && *deadline <= Clock::now()) {
    if (job->under_kernel_locks) give_up_busy(job, i, *client);
    else finish(job, EAGAIN);
    give_back(std::move(client));
    return;
  }
  give_back(std::move(client));
  if (waits_for_itself(*job, i)) {
    log(LogLevel::Info, "mount", "refused ", to_string(job->needs[i].mode), " lock on ",
        job->needs[i].key, " for pid ", job->pid,
        ": it holds the file open itself, so it would wait forever; returning EDEADLK");
    return finish(job, EDEADLK);
  }
  enqueue(job);
}

bool LockAgent::process_has_open(pid_t pid, const std::string& key) const {
  if (options_.mountpoint.empty() || pid <= 0) return false;
  const std::string target = key == "." ? options_.mountpoint : options_.mountpoint + "/" + key;
  const std::string proc = "/proc/" + std::to_string(pid);
  DIR* dir = ::opendir((proc + "/fd").c_str());
  if (!dir) return false;
  bool found = false;
  char link[PATH_MAX];
  while (dirent* e = ::readdir(dir)) {
    ssize_t n = ::readlinkat(::dirfd(dir), e->d_name, link, sizeof(link));
    if (n > 0 && static_cast<std::size_t>(n) == target.size() &&
        target.compare(0, target.size(), link, static_cast<std::size_t>(n)) == 0) {
      found = true;
      break;
    }
  }
  ::closedir(dir);
  if (found) return true;
  // A mapping keeps the handle (and its lock) after the descriptor is closed.
  std::ifstream maps(proc + "/maps");
  std::string line;
  while (std::getline(maps, line))
    if (line.size() > target.size() &&
        line.compare(line.size() - target.size(), target.size(), target) == 0 &&
        line[line.size() - target.size() - 1] == ' ')
      return true;
  return false;
}

bool LockAgent::has_handle_locked(const std::string& key, pid_t pid) const {
  auto [begin, end] = by_key_.equal_range(key);
  return std::any_of(begin, end, [pid](const auto& e) { return e.second->pid == pid; });
}

std::uint64_t LockAgent::release_epoch() const {
  std::lock_guard guard(track_m_);
  return release_epoch_;
}

bool LockAgent::release_in_flight(const LockJob& job, std::size_t index,
                                  std::uint64_t epoch_before) const {
  const std::string& key = job.needs[index].key;
  {
    std::lock_guard guard(track_m_);
    if (!has_handle_locked(key, job.pid) && release_epoch_ == epoch_before) return false;
  }
  return !process_has_open(job.pid, key);
}

bool LockAgent::await_release(const LockJob& job, std::size_t index,
                              std::optional<Clock::time_point> deadline) {
  // The kernel sends the RELEASE right after close(); a few seconds is plenty.
  auto limit = Clock::now() + std::chrono::seconds(5);
  if (deadline && *deadline < limit) limit = *deadline;
  const std::string& key = job.needs[index].key;
  std::unique_lock guard(track_m_);
  while (has_handle_locked(key, job.pid)) {
    if (job.interrupted() || stopping_ || Clock::now() >= limit) return false;
    untracked_cv_.wait_for(guard, milliseconds(20));
  }
  return true;
}

bool LockAgent::waits_for_itself(const LockJob& job, std::size_t index) const {
  const LockNeed& need = job.needs[index];
  bool conflicting = false;
  {
    std::lock_guard guard(track_m_);
    auto [begin, end] = by_key_.equal_range(need.key);
    for (auto it = begin; it != end && !conflicting; ++it)
      conflicting = need.mode == LockMode::Write || it->second->lock.mode == LockMode::Write;
  }
  return conflicting && process_has_open(job.pid, need.key);
}

std::optional<Clock::time_point> LockAgent::deadline_of(const LockJob& job) const {
  std::optional<Clock::time_point> deadline;
  if (options_.acquire_timeout_ms)
    deadline = job.started_ + milliseconds(std::max<std::int64_t>(0, *options_.acquire_timeout_ms));
  if (job.under_kernel_locks) {
    auto bound = job.started_ + std::max(options_.meta_wait, milliseconds(0));
    if (!deadline || bound < *deadline) deadline = bound;
  }
  return deadline;
}

namespace {

// "owner O (write, held 1.2 s, fence 7)" for each holder; for log lines.
std::string describe_holders(const std::optional<std::vector<LockInfo>>& holders) {
  if (!holders) return "unknown: the broker did not say";
  if (holders->empty()) return "nobody any more";
  const Micros now = wall_clock_micros();
  std::string text;
  for (const LockInfo& l : *holders) {
    if (!text.empty()) text += ", ";
    text += "owner " + l.owner;
    if (!l.agent.empty()) text += " of agent " + l.agent;
    if (l.pid > 0) text += " (pid " + std::to_string(l.pid) + " " + l.command + ")";
    text += std::string(" (") + to_string(l.mode);
    if (auto since = parse_iso8601(l.acquired_at)) {
      char held[32];
      std::snprintf(held, sizeof held, ", held %.1f s", static_cast<double>(now - *since) / 1e6);
      text += held;
    }
    text += ", fence " + std::to_string(l.fence) + ")";
  }
  return text;
}

}  // namespace

void LockAgent::give_up_busy(const std::shared_ptr<LockJob>& job, std::size_t index,
                             BrokerClient& client) {
  const LockNeed& need = job->needs[index];
  // Asked before the reply, while the holder is most likely still holding.
  std::string who = describe_holders(client.holders(need.key));
  const std::string key = need.key, op = job->op;
  const LockMode mode = need.mode;
  const pid_t pid = job->pid;
  const std::string agent = job->agent;
  auto waited = std::chrono::duration_cast<milliseconds>(Clock::now() - job->started_).count();
  finish(job, EBUSY);
  log(LogLevel::Warn, "mount", op, " by pid ", pid, " (agent ", agent, ") gave up on the ", to_string(mode),
      " lock on ", key, " after ", waited, " ms and returned EBUSY; held by ", who,
      ". The kernel holds the file's or directory's locks during this call, which the "
      "holder may need itself, so it never waits longer than --meta-wait-ms");
}

void LockAgent::finish(const std::shared_ptr<LockJob>& job, int err) {
  if (err != 0 && !job->held.empty()) {
    release(job->held);
    job->held.clear();
  }
  if (job->done) job->done(*job, err);
}

void LockAgent::enqueue(std::shared_ptr<LockJob> job) {
  std::unique_lock lock(wait_m_);
  if (stopping_) {
    lock.unlock();
    return finish(job, EIO);
  }
  queue_.push_back(std::move(job));
  // Waiters that ended (idle too long) are joined here, outside the lock.
  std::list<Waiter> ended;
  for (auto it = waiters_.begin(); it != waiters_.end();) {
    auto next = std::next(it);
    if (it->ended) ended.splice(ended.end(), waiters_, it);
    it = next;
  }
  if (idle_threads_ < queue_.size()) {
    auto self = waiters_.emplace(waiters_.end());
    self->thread = start_quiet_thread([this, w = &*self] { waiter_main(*w); });
  }
  wait_cv_.notify_one();
  lock.unlock();
  for (Waiter& w : ended) w.thread.join();
}

std::size_t LockAgent::waiting_jobs() const {
  std::lock_guard lock(wait_m_);
  return queue_.size() + waiting_.size();
}

void LockAgent::waiter_main(Waiter& self) {
  auto client = take_client();
  std::unique_lock lock(wait_m_);
  for (;;) {
    ++idle_threads_;
    bool woke = wait_cv_.wait_for(lock, kWaiterLinger,
                                  [this] { return stopping_ || !queue_.empty(); });
    --idle_threads_;
    if (queue_.empty()) {
      if (stopping_ || !woke) break;
      continue;
    }
    std::shared_ptr<LockJob> job = std::move(queue_.front());
    queue_.pop_front();
    waiting_.push_back(job);
    lock.unlock();
    wait_for(job, *client);
    // An interrupt aborts the client until reset (so no abort can be missed).
    if (job->interrupted()) client->reset();
    lock.lock();
    std::erase_if(waiting_, [&](const std::weak_ptr<LockJob>& w) {
      auto p = w.lock();
      return !p || p == job;
    });
  }
  client.reset();
  // The thread's last step: from here on enqueue() or stop() may join it.
  self.ended = true;
}

void LockAgent::wait_for(const std::shared_ptr<LockJob>& job, BrokerClient& client) {
  const std::optional<Clock::time_point> deadline = deadline_of(*job);
  Reconnect reconnect(options_.reconnect_window, deadline);
  constexpr int kInFlightRetries = 50;
  int in_flight_retries = 0;
  int err = 0;
  std::size_t i = job->held.size();
  while (i < job->needs.size()) {
    {
      std::lock_guard lock(job->m_);
      if (job->interrupted_ || stopping_) {
        err = job->interrupted_ ? EINTR : EIO;
        break;
      }
      job->current_ = &client;
    }
    std::optional<std::int64_t> timeout;
    if (deadline) {
      auto left = std::chrono::duration_cast<milliseconds>(*deadline - Clock::now()).count();
      timeout = std::max<std::int64_t>(0, left);
    }
    const std::uint64_t epoch = release_epoch();
    CallResult r = client.acquire(make_request(*job, i, timeout));
    {
      std::lock_guard lock(job->m_);
      job->current_ = nullptr;
    }
    if (r.status == CallStatus::Ok)
      job->held.push_back(held_from(job->needs[i], r.lock));
    if (job->interrupted_ || stopping_) {
      // A grant that raced with Ctrl-C is given back by finish().
      err = job->interrupted_ ? EINTR : EIO;
      break;
    }
    if (r.status == CallStatus::Unavailable) {
      // The broker went away while we queued: ask again for a while (reconnect.h).
      const auto now = Clock::now();
      const auto again = reconnect.lost(now);
      if (!again) {
        log(LogLevel::Error, "mount", "broker at ", client.endpoint().describe(),
            " is unreachable (", r.error, "); the wait for ", job->needs[i].key,
            " fails with EIO");
        err = EIO;
        break;
      }
      if (reconnect.outage_began(now))
        log(LogLevel::Warn, "mount", "broker at ", client.endpoint().describe(),
            " dropped the wait for ", job->needs[i].key, " (", r.error, "); reconnecting");
      std::unique_lock lock(job->m_);
      job->cv_.wait_until(lock, *again,
                          [&] { return job->interrupted_.load() || stopping_.load(); });
      continue;
    }
    reconnect.reached();
    if (r.status == CallStatus::Ok) {
      ++i;
      continue;
    }
    if (r.status == CallStatus::Timeout && job->under_kernel_locks)
      return give_up_busy(job, i, client);
    // The "deadlock" was a handle on its way out: ask again (a bounded number of
    // times, since unrelated releases also move the epoch).
    if (r.status == CallStatus::Deadlock && ++in_flight_retries <= kInFlightRetries &&
        release_in_flight(*job, i, epoch) && await_release(*job, i, deadline))
      continue;
    err = classify(r, *job, i, client, /*try_once=*/false);
    break;
  }
  if (err == EINTR)
    log(LogLevel::Debug, "mount", "wait for ", job->needs[std::min(i, job->needs.size() - 1)].key,
        " interrupted (pid ", job->pid, ")");
  finish(job, err);
}

void LockAgent::release(const HeldLock& lock) { release(std::vector<HeldLock>{lock}); }

void LockAgent::release(const std::vector<HeldLock>& locks) {
  if (locks.empty()) return;
  auto client = take_client();
  // Reverse order of taking; the order does not matter to the broker but reads well.
  for (auto it = locks.rbegin(); it != locks.rend(); ++it) {
    CallResult r = client->release(it->lock_id, it->owner, it->changed, it->stale);
    if (r.status == CallStatus::Ok) continue;
    if (r.status == CallStatus::Unavailable) {
      log(LogLevel::Warn, "mount", "could not release the lock on ", it->key, " (", it->lock_id,
          "): broker at ", client->endpoint().describe(),
          " is unreachable; it frees the lock when the lease runs out");
    } else {
      log(LogLevel::Debug, "mount", "release of ", it->key, " (", it->lock_id,
          "): ", to_string(r.status), " ", r.error);
    }
  }
  give_back(std::move(client));
}

std::shared_ptr<TrackedLock> LockAgent::track(HeldLock lock, pid_t pid) {
  auto tracked = std::make_shared<TrackedLock>();
  tracked->lock = std::move(lock);
  tracked->pid = pid;
  std::lock_guard guard(track_m_);
  tracked_.emplace(tracked.get(), tracked);
  by_key_.emplace(tracked->lock.key, tracked.get());
  return tracked;
}

bool LockAgent::release_tracked(const std::shared_ptr<TrackedLock>& tracked, bool changed,
                                const std::string& stale) {
  {
    std::lock_guard guard(track_m_);
    // Out of tracked_: no more heartbeats, and stop() will not release it again.
    if (tracked_.erase(tracked.get()) == 0) return false;
    tracked->releasing = true;
  }
  HeldLock lock = tracked->lock;
  lock.changed = changed;
  lock.stale = stale;
  release(lock);
  {
    std::lock_guard guard(track_m_);
    auto [begin, end] = by_key_.equal_range(tracked->lock.key);
    for (auto it = begin; it != end; ++it) {
      if (it->second == tracked.get()) {
        by_key_.erase(it);
        break;
      }
    }
    ++release_epoch_;
  }
  untracked_cv_.notify_all();
  return true;
}

std::optional<std::string> LockAgent::owner_holding(const std::string& key, pid_t pid) const {
  std::optional<std::string> other;
  {
    std::lock_guard guard(track_m_);
    auto [begin, end] = by_key_.equal_range(key);
    for (auto it = begin; it != end; ++it) {
      const TrackedLock* t = it->second;
      if (t->lost || t->releasing) continue;
      if (t->pid == pid) return t->lock.owner;
      if (!other) other = t->lock.owner;
    }
  }
  // Another process's handle counts only when the caller holds that file open too
  // (an inherited descriptor); otherwise the caller waits like anyone else.
  if (other && process_has_open(pid, key)) return other;
  return std::nullopt;
}

void LockAgent::heartbeat_main() {
  auto client = take_client();
  const auto interval = milliseconds(std::max<std::int64_t>(options_.lease_ms / 3, 50));
  std::unique_lock lock(hb_m_);
  while (!hb_cv_.wait_for(lock, interval, [this] { return stopping_.load(); })) {
    lock.unlock();
    heartbeat_all(*client);
    lock.lock();
  }
}

void LockAgent::heartbeat_all(BrokerClient& client) {
  std::vector<std::shared_ptr<TrackedLock>> locks;
  {
    std::lock_guard guard(track_m_);
    locks.reserve(tracked_.size());
    for (auto& [ptr, tracked] : tracked_)
      if (!tracked->lost) locks.push_back(tracked);
  }
  for (auto& t : locks) {
    if (stopping_) return;
    CallResult r = client.heartbeat(t->lock.lock_id, t->lock.owner, options_.lease_ms);
    if (r.status == CallStatus::Ok) continue;
    if (r.status == CallStatus::NotFound || r.status == CallStatus::Forbidden) {
      t->lost_reason = r.status == CallStatus::NotFound
                           ? "the broker no longer has it (its lease ran out or it reached "
                             "the maximum hold time)"
                           : "the broker says another owner holds it";
      t->lost = true;
      log(LogLevel::Warn, "mount", "lost the lock on ", t->lock.key, " (", t->lock.lock_id,
          "): ", t->lost_reason, "; writes through this open file now fail with EIO");
      continue;
    }
    log(LogLevel::Warn, "mount", "could not renew ", locks.size(), " lock(s): broker at ",
        client.endpoint().describe(), " answered ", to_string(r.status), " (", r.error,
        "); retrying");
    return;
  }
}

void LockAgent::stop() {
  if (stopping_.exchange(true)) return;
  std::list<Waiter> waiters;
  {
    std::unique_lock lock(wait_m_);
    for (auto& w : waiting_)
      if (auto job = w.lock()) {
        std::lock_guard jl(job->m_);
        if (job->current_) job->current_->abort();
        job->cv_.notify_all();
      }
    wait_cv_.notify_all();
    waiters.splice(waiters.end(), waiters_);
  }
  // Every wait was aborted above, so each waiter ends its job (EIO) and returns.
  for (Waiter& w : waiters) w.thread.join();
  {
    std::lock_guard lock(hb_m_);
    hb_cv_.notify_all();
  }
  if (heartbeat_.joinable()) heartbeat_.join();

  std::vector<HeldLock> held;
  {
    std::lock_guard guard(track_m_);
    for (auto& [ptr, tracked] : tracked_) held.push_back(tracked->lock);
    tracked_.clear();
    by_key_.clear();
  }
  if (!held.empty()) {
    log(LogLevel::Info, "mount", "releasing ", held.size(), " lock(s) still held at unmount");
    release(held);
  }
}

}  // namespace gate::mount
