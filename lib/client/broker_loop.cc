#include "client/broker_loop.h"

#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <time.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "client/dial.h"
#include "core/log.h"
#include "core/worker_pool.h"

namespace gate {

namespace {

constexpr std::size_t kMaxIdleConnections = 32;

}  // namespace

struct BrokerLoop::Call {
  CallId id = 0;
  std::string text;  // the request's bytes
  bool wait_forever = false;
  Answer on_answer;
  Connection conn;
  bool reused = false;   // conn was kept alive from an earlier call
  bool retried = false;  // already sent once more on a fresh connection
  enum class Phase { Connecting, Sending, Receiving } phase = Phase::Connecting;
  std::size_t sent = 0;
  wire::AnswerReader reader;
  Clock::time_point deadline = Clock::time_point::max();  // of the current phase
  HttpReply result;  // Answered: the answer; Failed: status 0 and why
};

BrokerLoop::BrokerLoop(BrokerEndpoint endpoint, std::chrono::milliseconds io_timeout)
    : endpoint_(std::move(endpoint)), io_timeout_(io_timeout) {
  wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
}

BrokerLoop::~BrokerLoop() {
  stop();
  if (wake_fd_ >= 0) ::close(wake_fd_);
}

void BrokerLoop::start() {
  if (thread_.joinable()) return;
  // Signals stay with the thread that runs the FUSE loop (Ctrl-C ends the mount).
  thread_ = start_quiet_thread([this] { main(); });
  pthread_setname_np(thread_.native_handle(), "gate-broker-io");
  thread_id_ = thread_.get_id();
}

void BrokerLoop::wake() {
  const std::uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(wake_fd_, &one, sizeof one);
}

std::unique_ptr<BrokerLoop::Call> BrokerLoop::make_call(const wire::Request& request, Answer answer,
                                                        CallId id) {
  auto c = std::make_unique<Call>();
  c->text = wire::http_text(request, endpoint_);
  c->wait_forever = request.wait_forever;
  c->on_answer = std::move(answer);
  c->id = id ? id : new_id();
  return c;
}

BrokerLoop::CallId BrokerLoop::new_id() {
  std::lock_guard lock(m_);
  return next_id_++;
}

void BrokerLoop::set_route(std::shared_ptr<LocalRoute> route) {
  std::lock_guard lock(m_);
  route_ = std::move(route);
}

std::shared_ptr<LocalRoute> BrokerLoop::typed_route() const {
  std::lock_guard lock(m_);
  if (stopping_ || ended_) return nullptr;
  return route_;
}

std::optional<CallResult> BrokerLoop::try_acquire_locally(const AcquireRequest& request) {
  auto route = typed_route();
  return route ? route->try_acquire(request) : std::nullopt;
}

std::optional<CallResult> BrokerLoop::release_locally(const std::string& lock_id, const std::string& owner,
                                                      bool changed, const std::string& stale) {
  auto route = typed_route();
  return route ? route->release_now(lock_id, owner, changed, stale) : std::nullopt;
}

bool BrokerLoop::route_call(CallId id, const wire::Request& request, LocalRoute::Deliver deliver) {
  std::shared_ptr<LocalRoute> route;
  {
    std::lock_guard lock(m_);
    if (!route_ || request.to_broker || stopping_ || ended_) return false;
    route = route_;
    local_.emplace(id, LocalCall{request, std::move(deliver)});
  }
  if (route->handle(id, request, [this, id](HttpReply r) { finish_local(id, std::move(r)); }))
    return true;
  std::lock_guard lock(m_);
  local_.erase(id);
  return false;
}

void BrokerLoop::finish_local(CallId id, HttpReply reply) {
  LocalRoute::Deliver deliver;
  {
    std::lock_guard lock(m_);
    auto it = local_.find(id);
    if (it == local_.end()) return;  // aborted, or answered already
    deliver = std::move(it->second.deliver);
    local_.erase(it);
  }
  deliver(std::move(reply));
}

void BrokerLoop::resend_to_broker(const std::vector<CallId>& ids) {
  for (CallId id : ids) {
    LocalCall lc;
    {
      std::lock_guard lock(m_);
      auto it = local_.find(id);
      if (it == local_.end()) continue;
      lc = std::move(it->second);
      local_.erase(it);
    }
    auto c = make_call(lc.request, [deliver = std::move(lc.deliver)](const HttpReply& r) { deliver(r); }, id);
    if (!hand_over(c)) c->on_answer({0, "", "stopped"});
  }
}

bool BrokerLoop::hand_over(std::unique_ptr<Call>& c) {
  {
    std::lock_guard lock(m_);
    if (ended_) return false;
    new_calls_.push_back(std::move(c));
    busy_ = true;
  }
  wake();
  return true;
}

BrokerLoop::CallId BrokerLoop::call(wire::Request request, Answer answer) {
  if (!request.to_broker) {
    const CallId id = new_id();
    // A route's answer reaches `answer` on the loop thread, as the broker's would.
    if (route_call(id, request, [this, answer](HttpReply r) {
          post([answer, r = std::move(r)] { answer(r); });
        }))
      return id;
    return call_to_broker(std::move(request), std::move(answer), id);
  }
  return call_to_broker(std::move(request), std::move(answer), 0);
}

BrokerLoop::CallId BrokerLoop::call_to_broker(wire::Request request, Answer answer, CallId given) {
  auto c = make_call(request, std::move(answer), given);
  const CallId id = c->id;
  if (!hand_over(c)) c->on_answer({0, "", "stopped"});  // the loop has ended: nothing will send it
  return id;
}

std::optional<HttpReply> BrokerLoop::call_briefly(wire::Request request,
                                                  std::chrono::microseconds patience, Answer late,
                                                  CallId* id) {
  if (!request.to_broker) {
    // The route answers at once, or later: then on the loop thread, to `late`.
    struct Brief {
      std::mutex m;
      std::condition_variable cv;
      std::optional<HttpReply> reply;
      bool handed = false;
    };
    auto b = std::make_shared<Brief>();
    const CallId local_id = new_id();
    if (id) *id = local_id;
    const bool taken = route_call(local_id, request, [this, b, late](HttpReply r) {
      std::unique_lock lock(b->m);
      if (!b->handed) {
        b->reply = std::move(r);
        b->cv.notify_all();
        return;
      }
      lock.unlock();
      post([late, r = std::move(r)] { late(r); });
    });
    if (taken) {
      std::unique_lock lock(b->m);
      b->cv.wait_for(lock, patience, [&] { return b->reply.has_value(); });
      if (b->reply) return std::move(b->reply);
      b->handed = true;
      return std::nullopt;
    }
    return brief_to_broker(std::move(request), patience, std::move(late), local_id);
  }
  return brief_to_broker(std::move(request), patience, std::move(late), 0, id);
}

std::optional<HttpReply> BrokerLoop::brief_to_broker(wire::Request request,
                                                     std::chrono::microseconds patience, Answer late,
                                                     CallId given, CallId* id) {
  auto c = make_call(request, std::move(late), given);
  if (id) *id = c->id;
  {
    std::lock_guard lock(m_);
    if (stopping_ || ended_) return HttpReply{0, "", "stopped"};
  }
  const auto until = Clock::now() + patience;
  if (!open_connection(*c)) return c->result;
  short revents = c->phase == Call::Phase::Sending ? POLLOUT : 0;
  while (true) {
    switch (run(*c, revents)) {
      case Outcome::Answered:
      case Outcome::Failed: return c->result;
      case Outcome::Pending: break;
    }
    const auto left = until - Clock::now();
    if (left <= Clock::duration::zero()) break;
    pollfd p{c->conn.fd, c->phase == Call::Phase::Receiving ? short(POLLIN) : short(POLLOUT), 0};
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(left).count();
    timespec ts{static_cast<time_t>(ns / 1'000'000'000), static_cast<long>(ns % 1'000'000'000)};
    const int r = ::ppoll(&p, 1, &ts, nullptr);
    if (r < 0 && errno != EINTR) break;
    if (r <= 0) continue;  // (the time left is looked at again above)
    revents = p.revents;
  }
  // Not answered in time: the loop goes on with it, and `late` gets the answer there.
  if (hand_over(c)) return std::nullopt;
  close_connection(c->conn);
  return HttpReply{0, "", "stopped"};
}

void BrokerLoop::abort(CallId id) {
  std::shared_ptr<LocalRoute> route;
  bool local = false;
  {
    std::lock_guard lock(m_);
    local = local_.count(id) != 0;
    route = route_;
  }
  if (local) {
    // The route's call: the route drops it, and the answer is "aborted", as for the
    // broker's.
    if (route) route->cancel(id);
    std::lock_guard lock(m_);
    local = local_.count(id) != 0;  // (still the route's: not sent on meanwhile)
  }
  if (local) return finish_local(id, {0, "", "aborted"});
  {
    std::lock_guard lock(m_);
    aborts_.push_back(id);
    busy_ = true;
  }
  wake();
}

void BrokerLoop::post(std::function<void()> fn) {
  bool ended;
  {
    std::lock_guard lock(m_);
    ended = ended_;
    if (!ended) {
      posted_.push_back(std::move(fn));
      busy_ = true;
    }
  }
  if (ended) fn();  // the loop has ended: run here, so that nothing is lost
  else wake();
}

void BrokerLoop::post_at(Clock::time_point when, std::function<void()> fn) {
  {
    std::lock_guard lock(m_);
    timers_in_.emplace(when, std::move(fn));
  }
  wake();
}

std::size_t BrokerLoop::connections() const {
  std::lock_guard lock(m_);
  return connections_;
}

bool BrokerLoop::drain(std::chrono::milliseconds limit) {
  std::unique_lock lock(m_);
  return idle_cv_.wait_for(lock, limit, [this] { return !busy_ || !thread_.joinable(); });
}

void BrokerLoop::stop() {
  {
    std::lock_guard lock(m_);
    if (stopping_ && !thread_.joinable()) return;
    stopping_ = true;
  }
  wake();
  if (thread_.joinable() && !on_loop_thread()) thread_.join();
}

void BrokerLoop::take_inbox() {
  std::vector<std::unique_ptr<Call>> calls;
  std::vector<CallId> aborts;
  std::vector<std::function<void()>> posted;
  {
    std::lock_guard lock(m_);
    calls.swap(new_calls_);
    aborts.swap(aborts_);
    posted.swap(posted_);
    timers_.merge(timers_in_);
  }
  for (auto& c : calls) begin(std::move(c));
  for (CallId id : aborts) {
    auto it = calls_.find(id);
    if (it == calls_.end()) continue;
    Call& c = *it->second;
    // Closed, not parked: the broker sees the connection end and drops the request.
    close_connection(c.conn);
    answer(id, {0, "", "aborted"});
  }
  for (auto& fn : posted) fn();
}

void BrokerLoop::begin(std::unique_ptr<Call> call) {
  Call& c = *call;
  const CallId id = c.id;
  const bool started = c.conn.fd >= 0;  // handed over by call_briefly
  calls_.emplace(id, std::move(call));
  bool stopping;
  {
    std::lock_guard lock(m_);
    stopping = stopping_;
  }
  if (stopping) return answer(id, {0, "", "stopped"});
  if (started) return;  // poll() says when its socket is ready
  if (!open_connection(c)) return answer(id, c.result);
  if (c.phase == Call::Phase::Sending) progress(c, POLLOUT);
}

bool BrokerLoop::open_connection(Call& c, bool fresh) {
  while (!fresh) {
    Connection conn;
    {
      std::lock_guard lock(m_);
      if (idle_.empty()) break;
      conn = std::move(idle_.back());
      idle_.pop_back();
    }
    // Not reusable: out of step with its answers, or closed by the broker meanwhile
    // (it ends idle connections; the end is there to read).
    pollfd p{conn.fd, POLLIN | POLLRDHUP, 0};
    if (!conn.leftover.empty() || ::poll(&p, 1, 0) != 0) {
      close_connection(conn);
      continue;
    }
    c.conn = std::move(conn);
    c.reused = true;
    c.phase = Call::Phase::Sending;
    c.deadline = Clock::now() + io_timeout_;
    return true;
  }
  Dialing d = dial(endpoint_);
  if (d.fd < 0) {
    c.result = {0, "", "cannot reach the broker at " + endpoint_.describe() + ": " + d.error};
    return false;
  }
  {
    std::lock_guard lock(m_);
    ++connections_;
  }
  c.conn = {d.fd, ""};
  c.reused = false;
  c.phase = d.in_progress ? Call::Phase::Connecting : Call::Phase::Sending;
  c.deadline = Clock::now() + io_timeout_;
  return true;
}

void BrokerLoop::close_connection(Connection& conn) {
  if (conn.fd < 0) return;
  ::close(conn.fd);
  conn.fd = -1;
  std::lock_guard lock(m_);
  --connections_;
}

BrokerLoop::Outcome BrokerLoop::run(Call& c, short revents) {
  Outcome o = step(c, revents);
  // A kept-alive connection the broker had already closed: once more on a new one.
  while (o == Outcome::Failed && c.reused && !c.retried && !c.reader.got_bytes()) {
    c.retried = true;
    c.sent = 0;
    c.reader = wire::AnswerReader();
    if (!open_connection(c, /*fresh=*/true)) return Outcome::Failed;
    o = c.phase == Call::Phase::Sending ? step(c, POLLOUT) : Outcome::Pending;
  }
  return o;
}

void BrokerLoop::progress(Call& c, short revents) {
  switch (run(c, revents)) {
    case Outcome::Answered:
    case Outcome::Failed: return answer(c.id, std::move(c.result));
    case Outcome::Pending: return;
  }
}

BrokerLoop::Outcome BrokerLoop::failed(Call& c, const std::string& error) {
  close_connection(c.conn);
  c.result = {0, "",
              (c.phase == Call::Phase::Connecting ? "cannot reach the broker at " + endpoint_.describe() + ": "
                                                  : "broker at " + endpoint_.describe() + " did not answer: ") +
                  error};
  return Outcome::Failed;
}

BrokerLoop::Outcome BrokerLoop::step(Call& c, short revents) {
  if (c.phase == Call::Phase::Connecting) {
    if (!(revents & (POLLOUT | POLLERR | POLLHUP))) return Outcome::Pending;
    if (std::string e = dial_result(c.conn.fd); !e.empty()) {
      c.retried = true;  // a first connection that fails: the broker is not there
      return failed(c, e);
    }
    c.phase = Call::Phase::Sending;
    c.deadline = Clock::now() + io_timeout_;
  }
  if (c.phase == Call::Phase::Sending) {
    while (c.sent < c.text.size()) {
      ssize_t n = ::send(c.conn.fd, c.text.data() + c.sent, c.text.size() - c.sent, MSG_NOSIGNAL);
      if (n > 0) {
        c.sent += static_cast<std::size_t>(n);
        c.deadline = Clock::now() + io_timeout_;
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return Outcome::Pending;
      return failed(c, std::strerror(errno));
    }
    c.phase = Call::Phase::Receiving;
    c.deadline = c.wait_forever ? Clock::time_point::max() : Clock::now() + io_timeout_;
    revents = POLLIN;  // the answer may be there already
  }
  if (!(revents & (POLLIN | POLLERR | POLLHUP))) return Outcome::Pending;
  char buf[16384];
  while (true) {
    ssize_t n = ::recv(c.conn.fd, buf, sizeof buf, 0);
    wire::AnswerReader::State state;
    bool ended = false;
    if (n > 0) {
      state = c.reader.feed(buf, static_cast<std::size_t>(n));
      if (!c.wait_forever) c.deadline = Clock::now() + io_timeout_;
    } else if (n == 0) {
      state = c.reader.end_of_stream();
      ended = true;
    } else if (errno == EINTR) {
      continue;
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      return Outcome::Pending;
    } else {
      return failed(c, std::strerror(errno));
    }
    if (state == wire::AnswerReader::State::Failed) return failed(c, c.reader.error());
    if (state == wire::AnswerReader::State::Done) {
      c.result = c.reader.reply();
      c.conn.leftover = c.reader.take_leftover();
      // An answer that ended with its connection leaves nothing to keep.
      if (!ended && c.reader.keep_alive()) park(std::move(c.conn));
      else close_connection(c.conn);
      c.conn.fd = -1;
      return Outcome::Answered;
    }
  }
}

void BrokerLoop::answer(CallId id, HttpReply reply) {
  auto it = calls_.find(id);
  if (it == calls_.end()) return;
  std::unique_ptr<Call> c = std::move(it->second);
  calls_.erase(it);
  close_connection(c->conn);  // answered before its connection's end: not reusable
  try {
    c->on_answer(reply);
  } catch (const std::exception& e) {
    log(LogLevel::Error, "client", "a broker answer's handler failed: ", e.what());
  }
}

void BrokerLoop::park(Connection conn) {
  {
    std::lock_guard lock(m_);
    if (idle_.size() < kMaxIdleConnections && !stopping_) {
      idle_.push_back(std::move(conn));
      return;
    }
  }
  close_connection(conn);
}

void BrokerLoop::close_all() {
  std::vector<CallId> ids;
  for (auto& [id, c] : calls_) ids.push_back(id);
  for (CallId id : ids) answer(id, {0, "", "stopped"});
  std::vector<CallId> local;
  {
    std::lock_guard lock(m_);
    for (auto& [id, c] : local_) local.push_back(id);
  }
  for (CallId id : local) finish_local(id, {0, "", "stopped"});
  std::lock_guard lock(m_);
  for (Connection& conn : idle_) ::close(conn.fd);
  connections_ -= idle_.size();
  idle_.clear();
}

void BrokerLoop::main() {
  std::vector<pollfd> fds;
  std::vector<CallId> ids;
  while (true) {
    take_inbox();
    bool stopping;
    {
      std::lock_guard lock(m_);
      stopping = stopping_;
    }
    if (stopping) {
      // What answers and posted functions start now is answered "stopped" at once.
      for (;;) {
        close_all();
        bool more;
        {
          std::lock_guard lock(m_);
          more = !new_calls_.empty() || !aborts_.empty() || !posted_.empty();
          if (!more) {
            // In the same breath as the check: a call or post from now on runs at once.
            ended_ = true;
            timers_in_.clear();
            busy_ = false;
            idle_cv_.notify_all();
          }
        }
        if (!more) break;
        take_inbox();
      }
      timers_.clear();
      return;
    }
    // Due timers run now; they may have started calls or posted more.
    const auto now = Clock::now();
    if (!timers_.empty() && timers_.begin()->first <= now) {
      auto due = timers_.begin();
      auto fn = std::move(due->second);
      timers_.erase(due);
      fn();
      continue;
    }
    // Calls past their time limit fail.
    ids.clear();
    for (auto& [id, c] : calls_)
      if (c->deadline <= now) ids.push_back(id);
    for (CallId id : ids)
      if (auto it = calls_.find(id); it != calls_.end()) {
        failed(*it->second, "timed out after " + std::to_string(io_timeout_.count()) + " ms");
        answer(id, std::move(it->second->result));
      }
    if (!ids.empty()) continue;

    Clock::time_point next = timers_.empty() ? Clock::time_point::max() : timers_.begin()->first;
    fds.assign(1, pollfd{wake_fd_, POLLIN, 0});
    ids.clear();
    for (auto& [id, c] : calls_) {
      if (c->deadline < next) next = c->deadline;
      short events = c->phase == Call::Phase::Receiving ? POLLIN : POLLOUT;
      fds.push_back(pollfd{c->conn.fd, events, 0});
      ids.push_back(id);
    }
    {
      std::lock_guard lock(m_);
      busy_ = !calls_.empty() || !new_calls_.empty() || !aborts_.empty() || !posted_.empty();
      if (!busy_) idle_cv_.notify_all();
    }
    int timeout = -1;
    if (next != Clock::time_point::max()) {
      auto ms = std::chrono::ceil<std::chrono::milliseconds>(next - Clock::now()).count();
      timeout = static_cast<int>(std::clamp<long long>(ms, 0, 60'000));
    }
    int r = ::poll(fds.data(), fds.size(), timeout);
    if (r < 0 && errno != EINTR) {
      log(LogLevel::Error, "client", "poll failed: ", std::strerror(errno));
      continue;
    }
    if (fds[0].revents & POLLIN) {
      std::uint64_t count;
      [[maybe_unused]] ssize_t n = ::read(wake_fd_, &count, sizeof count);
    }
    for (std::size_t i = 1; i < fds.size(); ++i) {
      if (!fds[i].revents) continue;
      auto it = calls_.find(ids[i - 1]);
      if (it != calls_.end() && it->second->conn.fd == fds[i].fd) progress(*it->second, fds[i].revents);
    }
  }
}

}  // namespace gate
