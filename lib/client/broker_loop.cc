#include "client/broker_loop.h"

#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
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

BrokerLoop::CallId BrokerLoop::call(wire::Request request, Answer answer) {
  auto c = std::make_unique<Call>();
  c->text = wire::http_text(request, endpoint_);
  c->wait_forever = request.wait_forever;
  c->on_answer = std::move(answer);
  CallId id;
  bool ended;
  {
    std::lock_guard lock(m_);
    id = c->id = next_id_++;
    ended = ended_;
    if (!ended) {
      new_calls_.push_back(std::move(c));
      busy_ = true;
    }
  }
  if (ended) c->on_answer({0, "", "stopped"});  // the loop has ended: nothing will send it
  else wake();
  return id;
}

void BrokerLoop::abort(CallId id) {
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
    if (c.conn.fd >= 0) {
      ::close(c.conn.fd);
      c.conn.fd = -1;
      std::lock_guard lock(m_);
      --connections_;
    }
    answer(id, {0, "", "aborted"});
  }
  for (auto& fn : posted) fn();
}

void BrokerLoop::begin(std::unique_ptr<Call> call) {
  Call& c = *call;
  const CallId id = c.id;
  calls_.emplace(id, std::move(call));
  bool stopping;
  {
    std::lock_guard lock(m_);
    stopping = stopping_;
  }
  if (stopping) return answer(id, {0, "", "stopped"});
  while (!idle_.empty()) {
    Connection conn = std::move(idle_.back());
    idle_.pop_back();
    if (!conn.leftover.empty()) {  // out of step with its answers: not reusable
      ::close(conn.fd);
      std::lock_guard lock(m_);
      --connections_;
      continue;
    }
    c.conn = std::move(conn);
    c.reused = true;
    c.phase = Call::Phase::Sending;
    c.deadline = Clock::now() + io_timeout_;
    return progress(c, POLLOUT);
  }
  std::string error;
  if (!connect(c, &error))
    return answer(id, {0, "", "cannot reach the broker at " + endpoint_.describe() + ": " + error});
  if (c.phase == Call::Phase::Sending) progress(c, POLLOUT);
}

bool BrokerLoop::connect(Call& c, std::string* error) {
  Dialing d = dial(endpoint_);
  if (d.fd < 0) {
    *error = d.error;
    return false;
  }
  {
    std::lock_guard lock(m_);
    ++connections_;
  }
  c.conn = {d.fd, ""};
  c.phase = d.in_progress ? Call::Phase::Connecting : Call::Phase::Sending;
  c.deadline = Clock::now() + io_timeout_;
  return true;
}

void BrokerLoop::progress(Call& c, short revents) {
  const CallId id = c.id;
  if (c.phase == Call::Phase::Connecting) {
    if (!(revents & (POLLOUT | POLLERR | POLLHUP))) return;
    if (std::string e = dial_result(c.conn.fd); !e.empty()) {
      // A first connection that fails is not retried: the broker is not there.
      c.retried = true;
      return fail(c, e);
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
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
      return fail(c, std::strerror(errno));
    }
    c.phase = Call::Phase::Receiving;
    c.deadline = c.wait_forever ? Clock::time_point::max() : Clock::now() + io_timeout_;
    revents = POLLIN;  // the answer may be there already
  }
  if (!(revents & (POLLIN | POLLERR | POLLHUP))) return;
  char buf[16384];
  while (true) {
    ssize_t n = ::recv(c.conn.fd, buf, sizeof buf, 0);
    wire::AnswerReader::State state;
    if (n > 0) {
      state = c.reader.feed(buf, static_cast<std::size_t>(n));
      if (!c.wait_forever) c.deadline = Clock::now() + io_timeout_;
    } else if (n == 0) {
      state = c.reader.end_of_stream();
      if (state == wire::AnswerReader::State::Done) {
        // The answer ended with the connection: nothing to keep.
        ::close(c.conn.fd);
        c.conn.fd = -1;
        {
          std::lock_guard lock(m_);
          --connections_;
        }
        return answer(id, c.reader.reply());
      }
    } else if (errno == EINTR) {
      continue;
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      return;
    } else {
      return fail(c, std::strerror(errno));
    }
    if (state == wire::AnswerReader::State::Failed) return fail(c, c.reader.error());
    if (state == wire::AnswerReader::State::Done) {
      Connection conn = std::move(c.conn);
      c.conn.fd = -1;
      conn.leftover = c.reader.take_leftover();
      if (c.reader.keep_alive()) park(std::move(conn));
      else {
        ::close(conn.fd);
        std::lock_guard lock(m_);
        --connections_;
      }
      return answer(id, c.reader.reply());
    }
  }
}

void BrokerLoop::fail(Call& c, const std::string& error) {
  if (c.conn.fd >= 0) {
    ::close(c.conn.fd);
    c.conn.fd = -1;
    std::lock_guard lock(m_);
    --connections_;
  }
  // A kept-alive connection the broker had already closed: once more on a new one.
  if (c.reused && !c.retried && !c.reader.got_bytes() && error.find("timed out") == std::string::npos) {
    c.retried = true;
    c.reused = false;
    c.sent = 0;
    c.reader = wire::AnswerReader();
    std::string e;
    if (connect(c, &e)) {
      if (c.phase == Call::Phase::Sending) progress(c, POLLOUT);
      return;
    }
    return answer(c.id, {0, "", "cannot reach the broker at " + endpoint_.describe() + ": " + e});
  }
  const std::string what = c.phase == Call::Phase::Connecting ? "cannot reach the broker at "
                                                                : "broker at ";
  const std::string tail = c.phase == Call::Phase::Connecting ? ": " : " did not answer: ";
  answer(c.id, {0, "", what + endpoint_.describe() + tail + error});
}

void BrokerLoop::answer(CallId id, HttpReply reply) {
  auto it = calls_.find(id);
  if (it == calls_.end()) return;
  std::unique_ptr<Call> c = std::move(it->second);
  calls_.erase(it);
  if (c->conn.fd >= 0) {  // answered without its connection's end: not reusable
    ::close(c->conn.fd);
    std::lock_guard lock(m_);
    --connections_;
  }
  try {
    c->on_answer(reply);
  } catch (const std::exception& e) {
    log(LogLevel::Error, "client", "a broker answer's handler failed: ", e.what());
  }
}

void BrokerLoop::park(Connection conn) {
  bool stopping;
  {
    std::lock_guard lock(m_);
    stopping = stopping_;
  }
  if (idle_.size() < kMaxIdleConnections && !stopping) {
    idle_.push_back(std::move(conn));
    return;
  }
  ::close(conn.fd);
  std::lock_guard lock(m_);
  --connections_;
}

void BrokerLoop::close_all() {
  std::vector<CallId> ids;
  for (auto& [id, c] : calls_) ids.push_back(id);
  for (CallId id : ids) answer(id, {0, "", "stopped"});
  for (Connection& conn : idle_) ::close(conn.fd);
  std::lock_guard lock(m_);
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
            timers_in_.clear();
            busy_ = false;
            idle_cv_.notify_all();
          }
        }
        if (!more) break;
        take_inbox();
      }
      timers_.clear();
      std::lock_guard lock(m_);
      ended_ = true;
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
      if (auto it = calls_.find(id); it != calls_.end())
        fail(*it->second, "timed out after " + std::to_string(io_timeout_.count()) + " ms");
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
