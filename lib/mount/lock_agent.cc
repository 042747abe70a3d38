#include "mount/lock_agent.h"

#include "mount/delegation.h"

#include <dirent.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <fstream>

#include "core/iso_time.h"
#include "core/log.h"

namespace gate::mount {

namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// A process's close reaches the mount as a RELEASE right after close(); a few seconds
// is plenty to wait for it.
constexpr auto kReleaseWait = std::chrono::seconds(5);
// How often the "deadlock" of a release on its way is asked about again (unrelated
// releases also move the epoch).
constexpr int kInFlightRetries = 50;
// How long stop() waits for the broker's answers to its releases.
constexpr auto kStopWait = std::chrono::seconds(5);

HeldLock held_from(const LockNeed& need, const LockInfo& granted, pid_t pid) {
  HeldLock l{need.key, need.mode, granted.lock_id, need.owner, granted.fence, granted.version};
  l.pid = pid;
  return l;
}

}  // namespace

void LockJob::interrupt() {
  BrokerLoop::CallId call;
  {
    std::lock_guard lock(m_);
    interrupted_ = true;
    call = call_;
  }
  if (LockAgent* agent = agent_.load()) agent->interrupt(this, call);  // else run() sees the flag
}

void LockAgent::interrupt(LockJob* job, BrokerLoop::CallId call) {
  // A wait in flight ends with its connection; a job parked between calls is woken.
  if (call) return loop_.abort(call);
  loop_.post([this, job] {
    std::shared_ptr<LockJob> self;
    {
      std::lock_guard guard(jobs_m_);
      auto it = jobs_.find(job);  // (not dereferenced unless still in progress)
      if (it == jobs_.end()) return;
      self = it->second;
    }
    std::unique_lock lock(self->m_);
    if (self->call_) return;
    lock.unlock();
    if (self->awaiting_release_ || self->waiting_) finish(self, EINTR, false);
  });
}

LockAgent::LockAgent(LockAgentOptions options)
    : options_(std::move(options)), loop_(options_.broker), acts_(kActThreads, "gate-act") {}

LockAgent::~LockAgent() { stop(); }

void LockAgent::start() {
  loop_.start();
  acts_.start();
  loop_.post([this] { heartbeat_round(); });
  if (options_.delegation) {
    // Worth asking only with nothing held or asked for at the broker.
    delegation_ = std::make_shared<Delegation>(loop_, options_.mount_id, options_.view, options_.lease_ms, [this] {
      {
        std::lock_guard guard(jobs_m_);
        if (!jobs_.empty()) return false;
      }
      std::lock_guard guard(track_m_);
      return tracked_.empty() && releases_out_.empty();
    });
    delegation_->start();
  }
}

bool LockAgent::delegated() const { return delegation_ && delegation_->delegated(); }

std::string LockAgent::new_owner() const { return options_.mount_id + ":" + random_token(); }

// A need's request_id, the same for every ask of it: made at its first ask that goes
// to the broker (a typed try has none: docs/delegation.md).
const std::string& LockAgent::request_id_of(LockJob& job, std::size_t index) {
  std::string& id = job.request_ids_[index];
  if (id.empty()) id = random_token();
  return id;
}

AcquireRequest LockAgent::make_request(LockJob& job, std::size_t index, std::optional<std::int64_t> timeout_ms,
                                       bool with_id) const {
  const LockNeed& need = job.needs[index];
  AcquireRequest req;
  req.key = need.key;
  req.mode = need.mode;
  req.owner = need.owner;
  req.timeout_ms = timeout_ms;
  req.lease_ms = options_.lease_ms;
  req.max_hold_ms = options_.max_hold_ms;
  req.session = options_.mount_id + ":" + std::to_string(job.pid);
  if (with_id) req.request_id = request_id_of(job, index);
  req.agent = job.agent;
  req.pid = job.process > 0 ? job.process : job.pid;
  req.command = job.command;
  return req;
}

int LockAgent::classify(const CallResult& r, const LockJob& job, std::size_t index,
                        bool try_once) const {
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
      log(LogLevel::Error, "mount", "broker at ", loop_.endpoint().describe(),
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
  job->agent_ = this;
  job->started_ = Clock::now();
  job->request_ids_.assign(job->needs.size(), {});
  {
    std::lock_guard guard(jobs_m_);
    jobs_.emplace(job.get(), job);
  }
  if (stopping_) return finish(job, EIO, true);
  // Locks free now are taken here, on the caller's thread, each in at most
  // kTryPatience: the common open costs no hand-over between threads. What takes
  // longer goes on on the broker thread, and so does every wait.
  while (true) {
    if (job->interrupted()) return finish(job, EINTR, true);
    job->epoch_ = release_epoch();
    AcquireRequest request = make_request(*job, job->held.size(), 0, /*with_id=*/false);
    // With the lock space here (a delegation), the engine answers in-process, typed.
    if (auto here = loop_.try_acquire_locally(request)) {
      if (!tried(job, *here, true)) return;
      continue;
    }
    request.request_id = request_id_of(*job, job->held.size());
    auto reply = loop_.call_briefly(
        wire::acquire(request, loop_.io_timeout()), kTryPatience,
        [this, job](const HttpReply& late) { on_try(job, wire::to_result(late)); });
    if (!reply) return;  // the broker thread has it now
    if (!tried(job, wire::to_result(*reply), true)) return;
  }
}

void LockAgent::send(const std::shared_ptr<LockJob>& job, std::optional<std::int64_t> timeout_ms) {
  job->epoch_ = release_epoch();
  {
    std::lock_guard lock(job->m_);
    if (job->interrupted_) return finish(job, EINTR, false);
  }
  const bool waiting = job->waiting_;
  const BrokerLoop::CallId id = loop_.call(
      wire::acquire(make_request(*job, job->held.size(), timeout_ms), loop_.io_timeout()),
      [this, job, waiting](const HttpReply& reply) {
        {
          std::lock_guard lock(job->m_);
          job->call_ = 0;
        }
        const CallResult r = wire::to_result(reply);
        if (waiting) on_wait(job, r);
        else on_try(job, r);
      });
  // Published after the call (whose answer cannot come before this returns, on the
  // broker thread), then the flag looked at again: an interrupt in between is not lost.
  bool interrupted;
  {
    std::lock_guard lock(job->m_);
    job->call_ = id;
    interrupted = job->interrupted_;
  }
  if (interrupted && waiting) loop_.abort(id);
}

// A try's answer that came late, on the broker thread.
void LockAgent::on_try(const std::shared_ptr<LockJob>& job, const CallResult& r) {
  if (tried(job, r, false)) send(job, 0);
}

bool LockAgent::tried(const std::shared_ptr<LockJob>& job, const CallResult& r, bool here) {
  const std::size_t i = job->held.size();
  if (r.status == CallStatus::Ok) {
    job->held.push_back(held_from(job->needs[i], r.lock, job->pid));
    if (job->held.size() < job->needs.size()) return true;
    finish(job, 0, here);
    return false;
  }
  if (stopping_) {
    finish(job, EIO, here);
    return false;
  }
  if (r.status == CallStatus::Deadlock && !job->nonblocking && release_in_flight(*job, i, job->epoch_)) {
    to_wait(job, here);  // waits for that release, then asks again
    return false;
  }
  const int err = classify(r, *job, i, /*try_once=*/true);
  if (err == -1 && !job->nonblocking) {
    to_wait(job, here);
    return false;
  }
  if (err == -1 && any_release_out(job->needs[i].key)) {
    // O_NONBLOCK right after a call that gave the key back: its release is still on
    // its way, and the file is not really held. Try again once it is back.
    on_loop(here, [this, job] { await_release(job, /*any_process=*/true); });
    return false;
  }
  if (err == -1 && release_in_flight(*job, i, job->epoch_)) {
    // O_NONBLOCK, and the holder is a handle this process has closed: the kernel's
    // RELEASE of it is on its way (a chmod may have re-entered that handle's lock
    // just before). Try again once that handle's lock is back.
    on_loop(here, [this, job] { await_release(job, /*any_process=*/false); });
    return false;
  }
  finish(job, err == -1 ? EAGAIN : err, here);
  return false;
}

void LockAgent::on_loop(bool here, std::function<void()> fn) {
  if (here) loop_.post(std::move(fn));
  else fn();
}

// Whether the job may wait, checked where it is (reading /proc, on the caller's
// thread when it can, not on the broker thread that all waits share); then the wait
// itself goes to the broker thread.
void LockAgent::to_wait(const std::shared_ptr<LockJob>& job, bool here) {
  const std::size_t i = job->held.size();
  job->deadline_ = deadline_of(*job);
  if (job->deadline_ && *job->deadline_ <= Clock::now()) {
    if (job->under_kernel_locks) return give_up_busy(job);
    return finish(job, EAGAIN, here);
  }
  if (waits_for_itself(*job, i)) {
    log(LogLevel::Info, "mount", "refused ", to_string(job->needs[i].mode), " lock on ",
        job->needs[i].key, " for pid ", job->pid,
        ": it holds the file open itself, so it would wait forever; returning EDEADLK");
    return finish(job, EDEADLK, here);
  }
  on_loop(here, [this, job] {
    job->waiting_ = true;
    job->reconnect_.emplace(options_.reconnect_window, job->deadline_);
    ++waiting_count_;
    send_wait(job);
  });
}

void LockAgent::send_wait(const std::shared_ptr<LockJob>& job) {
  if (job->interrupted() || stopping_) return finish(job, job->interrupted() ? EINTR : EIO, false);
  std::optional<std::int64_t> timeout;
  if (job->deadline_) {
    auto left = std::chrono::duration_cast<milliseconds>(*job->deadline_ - Clock::now()).count();
    timeout = std::max<std::int64_t>(0, left);
  }
  send(job, timeout);
}

// The answer to a waiting acquire.
void LockAgent::on_wait(const std::shared_ptr<LockJob>& job, const CallResult& r) {
  const std::size_t i = job->held.size();
  if (r.status == CallStatus::Ok) job->held.push_back(held_from(job->needs[i], r.lock, job->pid));
  // A grant that raced with Ctrl-C is given back by finish().
  if (job->interrupted() || stopping_) return finish(job, job->interrupted() ? EINTR : EIO, false);
  if (r.status == CallStatus::Unavailable) {
    // The broker went away while we queued: ask again for a while (reconnect.h).
    const auto now = Clock::now();
    const auto again = job->reconnect_->lost(now);
    if (!again) {
      log(LogLevel::Error, "mount", "broker at ", loop_.endpoint().describe(), " is unreachable (",
          r.error, "); the wait for ", job->needs[i].key, " fails with EIO");
      return finish(job, EIO, false);
    }
    if (job->reconnect_->outage_began(now))
      log(LogLevel::Warn, "mount", "broker at ", loop_.endpoint().describe(), " dropped the wait for ",
          job->needs[i].key, " (", r.error, "); reconnecting");
    return loop_.post_at(*again, [this, job] {
      if (!job->finished_) send_wait(job);
    });
  }
  job->reconnect_->reached();
  if (r.status == CallStatus::Ok) {
    if (job->held.size() == job->needs.size()) return finish(job, 0, false);
    return send_wait(job);
  }
  if (r.status == CallStatus::Timeout && job->under_kernel_locks) return give_up_busy(job);
  // The "deadlock" was a lock on its way back: ask again once it is back.
  if (r.status == CallStatus::Deadlock && ++job->in_flight_retries_ <= kInFlightRetries &&
      release_in_flight(*job, i, job->epoch_))
    return await_release(job, /*any_process=*/false);
  finish(job, classify(r, *job, i, /*try_once=*/false), false);
}

void LockAgent::await_release(const std::shared_ptr<LockJob>& job, bool any_process) {
  const std::string key = job->needs[job->held.size()].key;
  job->park_any_ = any_process;
  if (!parked_for(*job, key)) return resume(job);  // came back already: ask again now
  job->awaiting_release_ = true;
  ++parked_;
  awaiting_release_.emplace(key, job);
  auto limit = Clock::now() + kReleaseWait;
  if (job->deadline_ && *job->deadline_ < limit) limit = *job->deadline_;
  loop_.post_at(limit, [this, job, park = ++job->parks_] {
    if (job->finished_ || !job->awaiting_release_ || job->parks_ != park) return;
    // Not back in time: a deadlock after all (or, for O_NONBLOCK, a holder).
    finish(job, job->park_any_ || job->nonblocking ? EAGAIN : EDEADLK, false);
  });
}

bool LockAgent::parked_for(const LockJob& job, const std::string& key) const {
  std::lock_guard guard(track_m_);
  return job.park_any_ ? releases_out_.count(key) > 0 : release_pending(key, job.pid);
}

void LockAgent::resume(const std::shared_ptr<LockJob>& job) {
  if (job->finished_) return;
  if (job->waiting_) send_wait(job);
  else send(job, 0);  // a try (O_NONBLOCK) asks once more
}

// On the broker thread, after a release of `key` came back: the jobs parked for it ask
// again once nothing of `key` they wait for is on its way back.
void LockAgent::releases_came_back(const std::string& key) {
  std::vector<std::shared_ptr<LockJob>> ready;
  for (auto [it, end] = awaiting_release_.equal_range(key); it != end;) {
    if (parked_for(*it->second, key)) {
      ++it;
      continue;
    }
    ready.push_back(it->second);
    it = awaiting_release_.erase(it);
  }
  for (auto& job : ready) {
    job->awaiting_release_ = false;
    --parked_;
    resume(job);
  }
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

bool LockAgent::release_in_flight(const LockJob& job, std::size_t index,
                                  std::uint64_t epoch_before) const {
  const std::string& key = job.needs[index].key;
  {
    std::lock_guard guard(track_m_);
    if (!release_pending(key, job.pid) && release_epoch_ == epoch_before) return false;
  }
  return !process_has_open(job.pid, key);
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

void LockAgent::give_up_busy(const std::shared_ptr<LockJob>& job) {
  const LockNeed need = job->needs[job->held.size()];
  // Asked before the reply, while the holder is most likely still holding.
  loop_.call(wire::status(need.key), [this, job, need](const HttpReply& reply) {
    if (job->finished_) return;  // interrupted or stopped meanwhile
    const std::string who = describe_holders(wire::holders_from(reply, need.key));
    auto waited = std::chrono::duration_cast<milliseconds>(Clock::now() - job->started_).count();
    const std::string op = job->op, agent = job->agent;
    const pid_t pid = job->pid;
    finish(job, EBUSY, false);
    log(LogLevel::Warn, "mount", op, " by pid ", pid, " (agent ", agent, ") gave up on the ",
        to_string(need.mode), " lock on ", need.key, " after ", waited, " ms and returned EBUSY; held by ",
        who, ". The kernel holds the file's or directory's locks during this call, which the "
        "holder may need itself, so it never waits longer than --meta-wait-ms");
  });
}

void LockAgent::finish(const std::shared_ptr<LockJob>& job, int err, bool here) {
  if (job->finished_) return;
  job->finished_ = true;
  {
    std::lock_guard guard(jobs_m_);
    jobs_.erase(job.get());
  }
  if (job->waiting_) --waiting_count_;
  if (job->awaiting_release_) {  // (only ever on the broker thread), under its key
    for (auto [it, end] = awaiting_release_.equal_range(job->needs[job->held.size()].key); it != end; ++it)
      if (it->second == job) {
        awaiting_release_.erase(it);
        break;
      }
    job->awaiting_release_ = false;
    --parked_;
  }
  if (err == EINTR)
    log(LogLevel::Debug, "mount", "wait for ", job->needs[std::min(job->held.size(), job->needs.size() - 1)].key,
        " interrupted (pid ", job->pid, ")");
  if (err != 0 && !job->held.empty()) {
    release(job->held);
    job->held.clear();
  }
  if (here) {
    if (job->done) job->done(*job, err);
    return;
  }
  acts_.post([job, err] {
    if (job->done) job->done(*job, err);
  });
}

std::size_t LockAgent::waiting_jobs() const { return waiting_count_.load(); }

void LockAgent::stop() {
  if (stopping_.exchange(true)) return;
  // Every job ends (EIO): waits in flight are aborted, parked ones finished.
  loop_.post([this] {
    std::vector<std::shared_ptr<LockJob>> jobs;
    {
      std::lock_guard guard(jobs_m_);
      for (auto& [ptr, job] : jobs_) jobs.push_back(job);
    }
    for (auto& job : jobs) {
      BrokerLoop::CallId call;
      {
        std::lock_guard lock(job->m_);
        call = job->call_;
      }
      if (call) loop_.abort(call);
      else if (job->waiting_ || job->awaiting_release_) finish(job, EIO, false);
    }
  });
  // The lock space goes back to the broker (with what is still held, released below
  // there): its recall poll would keep the loop busy.
  if (delegation_) delegation_->stop(kStopWait);
  loop_.drain(kStopWait);
  // What the jobs do with their outcome (and the locks an open adopts) happens now,
  // while the broker thread still takes releases.
  acts_.stop();
  std::vector<HeldLock> held;
  {
    std::lock_guard guard(track_m_);
    for (auto& [ptr, tracked] : tracked_) held.push_back(tracked->lock);
    tracked_.clear();
    by_key_.clear();
  }
  if (!held.empty()) {
    log(LogLevel::Info, "mount", "releasing ", held.size(), " lock(s) still held at unmount");
    loop_.post([this, held] { release(held); });  // all at once, from the broker thread
  }
  if (!loop_.drain(kStopWait))
    log(LogLevel::Warn, "mount", "the broker did not answer every release in ",
        std::chrono::duration_cast<std::chrono::seconds>(kStopWait).count(),
        " s; their leases free them");
  loop_.stop();
}

}  // namespace gate::mount
