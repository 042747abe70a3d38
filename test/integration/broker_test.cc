// Integration tests of `gate broker` as a real process, through its HTTP API, as
// ../shared/docs/locking.md states the contract. Each test case starts its own broker
// (an ephemeral port and a fresh state directory) and cleans up by RAII.
//
// Synchronisation is by events, never by sleeping: waiting acquires run on their own
// thread with their own BrokerClient and report through futures; "B is queued" is
// known by polling GET /v1/locks/status, with a bound. Sleeps appear only as pacing
// (heartbeat intervals, poll intervals), never to let something else happen.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <boost/json.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <functional>
#include <future>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "client/broker_client.h"
#include "core/process.h"
#include "core/token.h"
#include "support/test_support.h"

using namespace gate;
using namespace std::chrono_literals;
namespace json = boost::json;
using SteadyClock = std::chrono::steady_clock;
using test::BrokerProcess;

namespace {

// ---------------------------------------------------------------------------------
// Small helpers

std::string uid(const std::string& prefix) { return prefix + "-" + random_token().substr(0, 12); }

long long ms_since(SteadyClock::time_point t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(SteadyClock::now() - t).count();
}

// Polls pred every `every` until it holds or `limit` passed. Used to observe broker
// state (the status endpoint), never to wait for a side effect blindly.
bool wait_until(const std::function<bool()>& pred, std::chrono::milliseconds limit = 5s,
                std::chrono::milliseconds every = 5ms) {
  const auto end = SteadyClock::now() + limit;
  while (true) {
    if (pred()) return true;
    if (SteadyClock::now() >= end) return false;
    std::this_thread::sleep_for(every);
  }
}

json::object parse_object(const std::string& body) {
  json::error_code ec;
  json::value v = json::parse(body, ec);
  if (ec || !v.is_object()) FAIL("expected a JSON object, got: " << body.substr(0, 300));
  return std::move(v.as_object());
}

std::string str_field(const json::object& o, const char* k) {
  auto it = o.find(k);
  return it != o.end() && it->value().is_string() ? std::string(it->value().as_string()) : "";
}

std::int64_t int_field(const json::object& o, const char* k) {
  auto it = o.find(k);
  if (it == o.end()) return -1;
  if (it->value().is_int64()) return it->value().as_int64();
  if (it->value().is_uint64()) return static_cast<std::int64_t>(it->value().as_uint64());
  return -1;
}

struct HeldLock {
  std::string lock_id, path, mode, owner;
  std::int64_t hold_count = 0;
  std::uint64_t fence = 0;
};
struct QueuedEntry {
  std::uint64_t req_id = 0;
  std::string path, mode, owner;
};
struct BrokerState {
  std::vector<HeldLock> locks;
  std::vector<QueuedEntry> queue;

  const HeldLock* lock(const std::string& lock_id) const {
    for (const auto& l : locks)
      if (l.lock_id == lock_id) return &l;
    return nullptr;
  }
  bool queued(const std::string& owner) const {
    return std::any_of(queue.begin(), queue.end(), [&](const auto& q) { return q.owner == owner; });
  }
  std::vector<std::string> queue_owners() const {
    std::vector<std::string> out;
    for (const auto& q : queue) out.push_back(q.owner);
    return out;
  }
};

// GET /v1/locks/status through a fresh connection (so it works from any thread state).
std::optional<BrokerState> try_status(const BrokerEndpoint& ep, const std::string& path = "") {
  BrokerClient c(ep, 5s);
  HttpReply r = c.status(path);
  if (r.status != 200) return std::nullopt;
  json::error_code ec;
  json::value v = json::parse(r.body, ec);
  if (ec || !v.is_object()) return std::nullopt;
  BrokerState s;
  const auto& o = v.as_object();
  if (auto it = o.find("locks"); it != o.end() && it->value().is_array())
    for (const auto& l : it->value().as_array()) {
      const auto& lo = l.as_object();
      s.locks.push_back({str_field(lo, "lock_id"), str_field(lo, "path"), str_field(lo, "mode"),
                         str_field(lo, "owner"), int_field(lo, "hold_count"),
                         static_cast<std::uint64_t>(int_field(lo, "fence"))});
    }
  if (auto it = o.find("queue"); it != o.end() && it->value().is_array())
    for (const auto& q : it->value().as_array()) {
      const auto& qo = q.as_object();
      s.queue.push_back({static_cast<std::uint64_t>(int_field(qo, "req_id")), str_field(qo, "path"),
                         str_field(qo, "mode"), str_field(qo, "owner")});
    }
  return s;
}

BrokerState get_status(const BrokerEndpoint& ep, const std::string& path = "") {
  auto s = try_status(ep, path);
  if (!s) FAIL("GET /v1/locks/status failed at " << ep.describe());
  return *s;
}

// Waits (bounded) until the broker's queue for `path` shows `owner`.
void require_queued(const BrokerEndpoint& ep, const std::string& path, const std::string& owner,
                    std::chrono::milliseconds limit = 5s) {
  bool seen = wait_until([&] {
    auto s = try_status(ep, path);
    return s && s->queued(owner);
  }, limit);
  if (!seen) FAIL("request of " << owner << " never showed in the queue of '" << path << "'");
}

AcquireRequest acq(const std::string& path, const std::string& mode, const std::string& owner,
                   std::optional<std::int64_t> timeout_ms = std::nullopt) {
  AcquireRequest r;
  r.key = path;
  r.mode = parse_lock_mode(mode).value();
  r.owner = owner;
  r.timeout_ms = timeout_ms;
  return r;
}

// Acquires at once (timeout 0) or fails the test.
LockInfo must_acquire(BrokerClient& c, AcquireRequest req) {
  if (!req.timeout_ms) req.timeout_ms = 0;
  CallResult r = c.acquire(req);
  if (r.status != CallStatus::Ok)
    FAIL("acquire of " << to_string(req.mode) << " '" << req.key << "' for " << req.owner << ": "
                       << to_string(r.status) << " " << r.error);
  return r.lock;
}

// Records the order in which waiters were granted.
class GrantOrder {
 public:
  void add(const std::string& who) {
    std::lock_guard<std::mutex> g(m_);
    order_.push_back(who);
  }
  std::vector<std::string> get() const {
    std::lock_guard<std::mutex> g(m_);
    return order_;
  }

 private:
  mutable std::mutex m_;
  std::vector<std::string> order_;
};

// An acquire that runs on its own thread, with its own client. The destructor aborts the
// call (the broker then drops the queued request) and joins, so a failing test never
// leaves a thread behind or hangs.
class AsyncAcquire {
 public:
  AsyncAcquire(const BrokerEndpoint& ep, AcquireRequest req, GrantOrder* order = nullptr,
               std::string name = "")
      : client_(ep, 10s), req_(std::move(req)) {
    future_ = promise_.get_future();
    thread_ = std::thread([this, order, name = std::move(name)] {
      CallResult r = client_.acquire(req_);
      done_at_ = SteadyClock::now();
      if (order && r.status == CallStatus::Ok) order->add(name);
      promise_.set_value(std::move(r));
    });
  }
  ~AsyncAcquire() {
    client_.abort();
    if (thread_.joinable()) thread_.join();
  }
  AsyncAcquire(const AsyncAcquire&) = delete;
  AsyncAcquire& operator=(const AsyncAcquire&) = delete;

  bool done_within(std::chrono::milliseconds t) {
    return future_.wait_for(t) == std::future_status::ready;
  }
  bool done() { return done_within(0ms); }
  // The answer; fails the test if none came within t.
  CallResult result(std::chrono::milliseconds t = 5s) {
    if (!done_within(t)) FAIL("acquire of '" << req_.key << "' for " << req_.owner << " got no answer within " << t.count() << " ms");
    if (!result_) result_ = future_.get();
    return *result_;
  }
  SteadyClock::time_point done_at() const { return done_at_; }
  BrokerClient& client() { return client_; }  // only once the answer came
  void abort() { client_.abort(); }

 private:
  BrokerClient client_;
  AcquireRequest req_;
  std::promise<CallResult> promise_;
  std::future<CallResult> future_;
  std::optional<CallResult> result_;
  SteadyClock::time_point done_at_{};
  std::thread thread_;
};

// A client that keeps acquiring and releasing a key of its own on another thread, to
// show that the broker serves others while a test throws bad input at it.
class Background {
 public:
  explicit Background(const BrokerEndpoint& ep) : client_(ep, 5s) {
    thread_ = std::thread([this] {
      const std::string key = uid("background");
      while (!stop_) {
        const std::string owner = uid("bg");
        CallResult a = client_.acquire(acq(key, "write", owner, 2000));
        if (a.status != CallStatus::Ok) {
          fail(std::string("acquire: ") + to_string(a.status) + " " + a.error);
          continue;
        }
        CallResult r = client_.release(a.lock.lock_id, owner);
        if (r.status != CallStatus::Ok) {
          fail(std::string("release: ") + to_string(r.status) + " " + r.error);
          continue;
        }
        ++rounds_;
      }
    });
  }
  ~Background() { stop(); }
  void stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  long rounds() const { return rounds_; }
  int failures() const { return failures_; }
  std::string first_failure() const {
    std::lock_guard<std::mutex> g(m_);
    return first_failure_;
  }
  // True when at least one more acquire+release round completes within `limit`.
  bool progresses(std::chrono::milliseconds limit = 3s) const {
    const long before = rounds_;
    return wait_until([&] { return rounds_ > before; }, limit, 2ms);
  }

 private:
  void fail(const std::string& what) {
    ++failures_;
    std::lock_guard<std::mutex> g(m_);
    if (first_failure_.empty()) first_failure_ = what;
    std::this_thread::sleep_for(10ms);  // pacing only: do not spin on a broken broker
  }
  BrokerClient client_;
  std::atomic<bool> stop_{false};
  std::atomic<long> rounds_{0};
  std::atomic<int> failures_{0};
  mutable std::mutex m_;
  std::string first_failure_;
  std::thread thread_;
};

// ---------------------------------------------------------------------------------
// Raw HTTP over POSIX sockets, for what a well-behaved client never sends.

class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  ~Fd() { reset(); }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

Fd connect_tcp(std::uint16_t port) {
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return fd;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return Fd();
  return fd;
}

Fd connect_unix(const std::string& path) {
  Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return fd;
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return Fd();
  return fd;
}

struct RawResponse {
  int status = 0;  // 0: no complete response
  std::string version;
  std::string head;
  std::string body;
  bool closed = false;  // the broker closed the connection
};

// Parses one response out of `raw` when it is complete (Content-Length framed).
bool parse_response(const std::string& raw, RawResponse* out) {
  auto end = raw.find("\r\n\r\n");
  if (end == std::string::npos) return false;
  out->head = raw.substr(0, end);
  if (out->head.rfind("HTTP/", 0) != 0 || out->head.size() < 12) return false;
  out->version = out->head.substr(0, 8);
  out->status = std::atoi(out->head.c_str() + 9);
  std::string lower = out->head;
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  std::size_t length = 0;
  if (auto p = lower.find("\r\ncontent-length:"); p != std::string::npos)
    length = std::strtoul(lower.c_str() + p + 17, nullptr, 10);
  if (raw.size() < end + 4 + length) return false;
  out->body = raw.substr(end + 4, length);
  return true;
}

// Sends `data` (as much as the peer takes) while reading what comes back, then reads
// until a complete response arrived, the peer closed, or `limit` passed. Reading while
// writing matters for bodies the broker refuses before reading them.
RawResponse exchange(int fd, std::string_view data, std::chrono::milliseconds limit = 5s,
                     bool read_to_eof = false) {
  RawResponse res;
  std::string in;
  std::size_t sent = 0;
  bool can_write = true;
  const auto end = SteadyClock::now() + limit;
  while (SteadyClock::now() < end) {
    if (!read_to_eof && parse_response(in, &res)) return res;
    pollfd p{fd, static_cast<short>(POLLIN | (can_write && sent < data.size() ? POLLOUT : 0)), 0};
    const int left = static_cast<int>(std::max<long long>(
        1, std::chrono::duration_cast<std::chrono::milliseconds>(end - SteadyClock::now()).count()));
    if (::poll(&p, 1, left) <= 0) continue;
    if (p.revents & POLLOUT) {
      ssize_t n = ::send(fd, data.data() + sent, std::min<std::size_t>(data.size() - sent, 65536),
                         MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) sent += static_cast<std::size_t>(n);
      else if (n < 0 && errno != EAGAIN && errno != EINTR) can_write = false;
    }
    if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
      char buf[65536];
      ssize_t n = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
      if (n > 0) {
        in.append(buf, static_cast<std::size_t>(n));
      } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
        res.closed = true;
        break;
      }
    }
  }
  parse_response(in, &res);
  return res;
}

RawResponse raw_request(std::uint16_t port, const std::string& method, const std::string& target,
                        const std::string& body, const std::string& version = "HTTP/1.1") {
  Fd fd = connect_tcp(port);
  if (!fd.valid()) FAIL("cannot connect to 127.0.0.1:" << port);
  std::string req = method + " " + target + " " + version + "\r\nHost: 127.0.0.1\r\n";
  if (!body.empty() || method == "POST")
    req += "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) + "\r\n";
  req += "\r\n" + body;
  return exchange(fd.get(), req, 5s, version == "HTTP/1.0");
}

// True when the peer closes `fd` within `limit` (EOF or reset); what it sent is put in *got.
bool closed_within(int fd, std::chrono::milliseconds limit, std::string* got = nullptr) {
  const auto end = SteadyClock::now() + limit;
  while (SteadyClock::now() < end) {
    pollfd p{fd, POLLIN, 0};
    const int left = static_cast<int>(std::max<long long>(
        1, std::chrono::duration_cast<std::chrono::milliseconds>(end - SteadyClock::now()).count()));
    if (::poll(&p, 1, left) <= 0) continue;
    char buf[4096];
    ssize_t n = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
    if (n > 0) {
      if (got) got->append(buf, static_cast<std::size_t>(n));
      continue;
    }
    if (n == 0 || (errno != EAGAIN && errno != EINTR)) return true;
  }
  return false;
}

// Checks a refusal: the given status and a JSON object with a non-empty "error".
void check_refused(const RawResponse& r, int status, const std::string& what) {
  INFO(what << " -> HTTP " << r.status << " " << r.body);
  CHECK(r.status == status);
  json::error_code ec;
  json::value v = json::parse(r.body, ec);
  REQUIRE(!ec);
  REQUIRE(v.is_object());
  CHECK(!str_field(v.as_object(), "error").empty());
}

std::string acquire_body(const std::string& path, const std::string& mode, const std::string& owner,
                         std::optional<std::int64_t> timeout_ms = 0) {
  json::object o;
  o["path"] = path;
  o["mode"] = mode;
  o["owner"] = owner;
  if (timeout_ms) o["timeout_ms"] = *timeout_ms;
  else o["timeout_ms"] = nullptr;
  return json::serialize(o);
}

void raise_fd_limit(rlim_t want) {
  rlimit rl{};
  REQUIRE(::getrlimit(RLIMIT_NOFILE, &rl) == 0);
  if (rl.rlim_cur >= want) return;
  rl.rlim_cur = std::min(want, rl.rlim_max);
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &rl) == 0);
  REQUIRE(rl.rlim_cur >= want);
}

// A waiter that sends its acquire, sees the broker go away (the first answer), waits
// for a go from the test, and sends the same acquire (same request_id) again.
struct ResendingAcquire {
  ResendingAcquire(const BrokerEndpoint& ep, AcquireRequest req, GrantOrder* order, std::string name)
      : client(ep, 10s) {
    first_f = first.get_future();
    go_f = go.get_future();
    final_f = final.get_future();
    thread = std::thread([this, req, order, name] {
      first.set_value(client.acquire(req));
      go_f.wait();
      CallResult r = client.acquire(req);
      if (order && r.status == CallStatus::Ok) order->add(name);
      final.set_value(r);
    });
  }
  ~ResendingAcquire() {
    client.abort();
    release_go();
    thread.join();
  }
  void release_go() {
    if (!went.exchange(true)) go.set_value();
  }
  BrokerClient client;
  std::promise<CallResult> first, final;
  std::future<CallResult> first_f, final_f;
  std::promise<void> go;
  std::future<void> go_f;
  std::atomic<bool> went{false};
  std::thread thread;
};

// True once the broker's log shows the queued request `req_id` of `owner` at least
// `times` times: BrokerProcess runs it at debug level, which logs every queued
// acquire, and a re-attachment logs it again under the same request number.
bool logged_queued(const BrokerProcess& broker, const std::string& owner, std::uint64_t req_id,
                   std::size_t times) {
  const std::string line = "for " + owner + " as request " + std::to_string(req_id);
  return wait_until([&] {
    const std::string log = broker.log();
    std::size_t n = 0;
    for (auto p = log.find(line); p != std::string::npos; p = log.find(line, p + 1)) ++n;
    return n >= times;
  });
}

}  // namespace

// =================================================================================
// FIFO grants

TEST_CASE("a reader queued behind a queued writer is granted after that writer", "[broker][fifo]") {
  BrokerProcess broker;
  const auto ep = broker.endpoint();
  const std::string key = "src/main.c";
  BrokerClient a(ep);
  const std::string A = uid("A"), B = uid("B"), C = uid("C");
  LockInfo la = must_acquire(a, acq(key, "write", A));

  GrantOrder order;
  AsyncAcquire b(ep, acq(key, "write", B), &order, "B");
  require_queued(ep, key, B);
  AsyncAcquire c(ep, acq(key, "read", C), &order, "C");
  require_queued(ep, key, C);
  CHECK(get_status(ep, key).queue_owners() == std::vector<std::string>{B, C});
  CHECK_FALSE(b.done());
  CHECK_FALSE(c.done());

  REQUIRE(a.release(la.lock_id, A).status == CallStatus::Ok);
  CallResult rb = b.result();
  REQUIRE(rb.status == CallStatus::Ok);
  CHECK(rb.lock.mode == LockMode::Write);
  CHECK(rb.lock.fence > la.fence);
  // C must still wait: B holds the write lock now.
  CHECK_FALSE(c.done_within(100ms));
  CHECK(get_status(ep, key).queue_owners() == std::vector<std::string>{C});

  REQUIRE(b.client().release(rb.lock.lock_id, B).status == CallStatus::Ok);
  CallResult rc = c.result();
  REQUIRE(rc.status == CallStatus::Ok);
  CHECK(rc.lock.mode == LockMode::Read);
  CHECK(rc.lock.fence > rb.lock.fence);
  CHECK(order.get() == std::vector<std::string>{"B", "C"});
}

TEST_CASE("readers share a key and a reader does not jump a queued writer", "[broker][fifo]") {
  BrokerProcess broker;
  const auto ep = broker.endpoint();
  const std::string key = "shared.txt";
  BrokerClient c1(ep), c2(ep), c3(ep);
  const std::string R1 = uid("R1"), R2 = uid("R2"), W = uid("W"), R3 = uid("R3");
  LockInfo l1 = must_acquire(c1, acq(key, "read", R1));
  LockInfo l2 = must_acquire(c2, acq(key, "read", R2));  // try-lock: granted together
  CHECK(l1.lock_id != l2.lock_id);
  CHECK(get_status(ep, key).locks.size() == 2);

  GrantOrder order;
  AsyncAcquire w(ep, acq(key, "write", W), &order, "W");
  require_queued(ep, key, W);

  // A new reader may not pass the queued writer, neither as a try-lock...
  CallResult try_r3 = c3.acquire(acq(key, "read", R3, 0));
  CHECK(try_r3.status == CallStatus::Timeout);
  // ...nor by waiting.
  AsyncAcquire r3(ep, acq(key, "read", R3), &order, "R3");
  require_queued(ep, key, R3);
  CHECK(get_status(ep, key).queue_owners() == std::vector<std::string>{W, R3});

  REQUIRE(c1.release(l1.lock_id, R1).status == CallStatus::Ok);
  CHECK_FALSE(w.done_within(100ms));  // R2 still reads
  REQUIRE(c2.release(l2.lock_id, R2).status == CallStatus::Ok);
  CallResult rw = w.result();
  REQUIRE(rw.status == CallStatus::Ok);
  CHECK_FALSE(r3.done_within(100ms));
  REQUIRE(w.client().release(rw.lock.lock_id, W).status == CallStatus::Ok);
  REQUIRE(r3.result().status == CallStatus::Ok);
  CHECK(order.get() == std::vector<std::string>{"W", "R3"});
}

TEST_CASE("a try-lock (timeout_ms 0) on a held key answers 408 at once", "[broker][fifo]") {
  BrokerProcess broker;
  const auto ep = broker.endpoint();
  BrokerClient a(ep), b(ep);
  const std::string A = uid("A");
  LockInfo la = must_acquire(a, acq("k", "write", A));

  for (const char* mode : {"write", "read"}) {
    INFO("mode " << mode);
    const auto t0 = SteadyClock::now();
    RawResponse r = raw_request(ep.port, "POST", "/v1/locks/acquire", acquire_body("k", mode, uid("B"), 0));
    CHECK(ms_since(t0) < 500);
    CHECK(r.status == 408);
    CHECK(str_field(parse_object(r.body), "status") == "timeout");
  }
  CHECK(get_status(ep, "k").queue.empty());
  CHECK(b.acquire(acq("other", "write", uid("B"), 0)).status == CallStatus::Ok);
  CHECK(a.release(la.lock_id, A).status == CallStatus::Ok);
}

// =================================================================================
// Leases, the hold cap, heartbeats

TEST_CASE("lease expiry hands the lock to a waiter within the lease", "[broker][lease]") {
  BrokerProcess broker;
  const auto ep = broker.endpoint();
  BrokerClient a(ep);
  const std::string A = uid("A"), B = uid("B");
  auto req = acq("k", "write", A);
  req.lease_ms = 300;
  const auto t0 = SteadyClock::now();
  LockInfo la = must_acquire(a, req);

  AsyncAcquire b(ep, acq("k", "write", B));  // no time-out of its own
  REQUIRE(wait_until([&] { return b.done() || get_status(ep, "k").queued(B); }));
  CallResult rb = b.result(3s);
  REQUIRE(rb.status == CallStatus::Ok);
  const auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(b.done_at() - t0).count();
  CHECK(waited >= 250);
  CHECK(waited < 1500);
  CHECK(rb.lock.fence > la.fence);
  // A's lock is gone for good.
  CHECK(a.heartbeat(la.lock_id, A).status == CallStatus::NotFound);
  CHECK(a.release(la.lock_id, A).status == CallStatus::NotFound);
  CHECK(b.client().release(rb.lock.lock_id, B).status == CallStatus::Ok);
}

TEST_CASE("the hold cap drops a lock however often it is heartbeaten", "[broker][lease]") {
  BrokerProcess broker(BrokerProcess::Options{"", false, {"--max-hold-ms", "400"}});
  const auto ep = broker.endpoint();
  BrokerClient a(ep);
  const std::string A = uid("A"), B = uid("B");
  auto req = acq("k", "write", A);
  req.lease_ms = 10'000;
  const auto t0 = SteadyClock::now();
  LockInfo la = must_acquire(a, req);
  CHECK(la.max_hold_ms == std::optional<std::int64_t>(400));

  AsyncAcquire b(ep, acq("k", "write", B));
  int ok_beats = 0;
  CallResult beat;
  while (ms_since(t0) < 3000) {
    beat = a.heartbeat(la.lock_id, A);
    if (beat.status != CallStatus::Ok) break;
    ++ok_beats;
    std::this_thread::sleep_for(50ms);  // heartbeat pacing
  }
  const auto lost_after = ms_since(t0);
  CHECK(beat.status == CallStatus::NotFound);
  CHECK(ok_beats >= 3);
  CHECK(lost_after >= 350);
  CHECK(lost_after < 1500);
  CHECK(a.release(la.lock_id, A).status == CallStatus::NotFound);

  CallResult rb = b.result(3s);
  REQUIRE(rb.status == CallStatus::Ok);
  const auto granted_after = std::chrono::duration_cast<std::chrono::milliseconds>(b.done_at() - t0).count();
  CHECK(granted_after >= 350);
  CHECK(granted_after < 1500);
  CHECK(b.client().release(rb.lock.lock_id, B).status == CallStatus::Ok);
}

TEST_CASE("heartbeats keep a lock past several leases", "[broker][lease]") {
  BrokerProcess broker;
  const auto ep = broker.endpoint();
  BrokerClient a(ep);
  const std::string A = uid("A"), B = uid("B");
  auto req = acq("k", "write", A);
  req.lease_ms = 300;
  LockInfo la = must_acquire(a, req);

  // A waiter with a time-out of four leases: it must time out, not be granted.
  AsyncAcquire b(ep, acq("k", "write", B, 1200));
  const auto t0 = SteadyClock::now();
  int beats = 0;
  while (!b.done() && ms_since(t0) < 4000) {
    CallResult h = a.heartbeat(la.lock_id, A);
    REQUIRE(h.status == CallStatus::Ok);
    CHECK(h.lock.lock_id == la.lock_id);
    ++beats;
    std::this_thread::sleep_for(80ms);  // heartbeat pacing (a quarter of the lease)
  }
  CHECK(b.result(1s).status == CallStatus::Timeout);
  CHECK(beats >= 10);
  BrokerState s = get_status(ep, "k");
  REQUIRE(s.lock(la.lock_id) != nullptr);
  CHECK(s.lock(la.lock_id)->fence == la.fence);
  CHECK(a.release(la.lock_id, A).status == CallStatus::Ok);
}

// =================================================================================
// Restarts

TEST_CASE("a restarted broker serves the same lock ids and fences keep increasing", "[broker][restart]") {
  BrokerProcess broker;
  const auto ep = broker.endpoint();
  BrokerClient c(ep);
  const std::string W = uid("W"), R1 = uid("R1"), R2 = uid("R2"), X = uid("X");
  LockInfo w = must_acquire(c, acq("dir/w", "write", W));
  LockInfo r1 = must_acquire(c, acq("dir/r", "read", R1));
  LockInfo r2 = must_acquire(c, acq("dir/r", "read", R2));
  LockInfo w2 = must_acquire(c, acq("dir/w", "write", W));  // re-entrant: hold_count 2
  CHECK(w2.lock_id == w.lock_id);
  CHECK(w2.hold_count == 2);
  LockInfo gone = must_acquire(c, acq("dir/gone", "write", X));
  REQUIRE(c.release(gone.lock_id, X).status == CallStatus::Ok);
  const std::uint64_t max_fence = std::max({w.fence, r1.fence, r2.fence, gone.fence});

  SECTION("after SIGTERM") { CHECK(broker.stop() == 0); }
  SECTION("after kill -9") { broker.kill9(); }
  broker.start();
  REQUIRE(broker.endpoint().port == ep.port);

  BrokerState s = get_status(ep);
  REQUIRE(s.locks.size() == 3);
  REQUIRE(s.lock(w.lock_id));
  CHECK(s.lock(w.lock_id)->owner == W);
  CHECK(s.lock(w.lock_id)->mode == "write");
  CHECK(s.lock(w.lock_id)->hold_count == 2);
  CHECK(s.lock(w.lock_id)->fence == w.fence);
  REQUIRE(s.lock(r1.lock_id));
  CHECK(s.lock(r1.lock_id)->fence == r1.fence);
  REQUIRE(s.lock(r2.lock_id));
  CHECK(s.lock(gone.lock_id) == nullptr);

  // The restored locks still exclude others and work with their old ids.
  BrokerClient d(ep);
  CHECK(d.acquire(acq("dir/w", "read", uid("Y"), 0)).status == CallStatus::Timeout);
  CHECK(d.heartbeat(w.lock_id, W).status == CallStatus::Ok);
  CHECK(d.release(w.lock_id, uid("thief")).status == CallStatus::Forbidden);
  LockInfo fresh = must_acquire(d, acq("dir/new", "write", uid("Z")));
  CHECK(fresh.fence > max_fence);

  // And once more: fences survive a second restart too.
  broker.kill9();
  broker.start();
  LockInfo fresh2 = must_acquire(d, acq("dir/new2", "write", uid("Z")));
  CHECK(fresh2.fence > fresh.fence);
  CHECK(d.release(w.lock_id, W).status == CallStatus::Ok);   // hold 2 -> 1
  CHECK(d.release(w.lock_id, W).status == CallStatus::Ok);   // gone
  CHECK(d.release(w.lock_id, W).status == CallStatus::NotFound);
}

TEST_CASE("a queued request re-attached by request_id after a restart keeps its place", "[broker][restart]") {
  BrokerProcess broker(BrokerProcess::Options{"", false, {"--restore-grace-ms", "8000"}});
  const auto ep = broker.endpoint();
  const std::string key = "queue.txt";
  const std::string A = uid("A"), B = uid("B"), C = uid("C");
  BrokerClient a(ep);
  LockInfo la = must_acquire(a, acq(key, "write", A));

  GrantOrder order;
  auto rb = acq(key, "write", B);
  rb.request_id = uid("req-b");
  auto rc = acq(key, "write", C);
  rc.request_id = uid("req-c");
  ResendingAcquire b(ep, rb, &order, "B");
  require_queued(ep, key, B);
  ResendingAcquire c(ep, rc, &order, "C");
  require_queued(ep, key, C);
  const BrokerState before = get_status(ep, key);
  REQUIRE(before.queue_owners() == std::vector<std::string>{B, C});

  broker.kill9();
  REQUIRE(b.first_f.wait_for(5s) == std::future_status::ready);
  REQUIRE(c.first_f.wait_for(5s) == std::future_status::ready);
  CHECK(b.first_f.get().status == CallStatus::Unavailable);
  CHECK(c.first_f.get().status == CallStatus::Unavailable);
  broker.start();

  // Both places were kept over the restart.
  BrokerState restored = get_status(ep, key);
  REQUIRE(restored.lock(la.lock_id));
  REQUIRE(restored.queue.size() == 2);
  CHECK(restored.queue[0].req_id == before.queue[0].req_id);
  CHECK(restored.queue[1].req_id == before.queue[1].req_id);

  // C comes back first; B later. B must still go first.
  c.release_go();
  REQUIRE(logged_queued(broker, C, before.queue[1].req_id, 2));
  b.release_go();
  REQUIRE(logged_queued(broker, B, before.queue[0].req_id, 2));
  CHECK(get_status(ep, key).queue_owners() == std::vector<std::string>{B, C});

  REQUIRE(a.release(la.lock_id, A).status == CallStatus::Ok);
  REQUIRE(b.final_f.wait_for(5s) == std::future_status::ready);
  CallResult gb = b.final_f.get();
  REQUIRE(gb.status == CallStatus::Ok);
  CHECK(c.final_f.wait_for(100ms) == std::future_status::timeout);
  REQUIRE(b.client.release(gb.lock.lock_id, B).status == CallStatus::Ok);
  REQUIRE(c.final_f.wait_for(5s) == std::future_status::ready);
  CallResult gc = c.final_f.get();
  REQUIRE(gc.status == CallStatus::Ok);
  CHECK(order.get() == std::vector<std::string>{"B", "C"});
  CHECK(gc.lock.fence > gb.lock.fence);
  CHECK(c.client.release(gc.lock.lock_id, C).status == CallStatus::Ok);
}

TEST_CASE("an unclaimed restored request leaves the queue after the grace period", "[broker][restart]") {
  BrokerProcess broker(BrokerProcess::Options{"", false, {"--restore-grace-ms", "600"}});
  const auto ep = broker.endpoint();
  const std::string key = "grace.txt";
  const std::string A = uid("A"), B = uid("B"), C = uid("C");
  BrokerClient a(ep);
  LockInfo la = must_acquire(a, acq(key, "write", A));
  auto rb = acq(key, "write", B);
  rb.request_id = uid("req-b");
  auto rc = acq(key, "write", C);
  rc.request_id = uid("req-c");
  ResendingAcquire b(ep, rb, nullptr, "B");
  require_queued(ep, key, B);
  ResendingAcquire c(ep, rc, nullptr, "C");
  require_queued(ep, key, C);
  const BrokerState before = get_status(ep, key);
  REQUIRE(before.queue.size() == 2);

  broker.kill9();
  REQUIRE(b.first_f.wait_for(5s) == std::future_status::ready);
  REQUIRE(c.first_f.wait_for(5s) == std::future_status::ready);
  const auto t0 = SteadyClock::now();
  broker.start();
  c.release_go();  // only C comes back; B's client is gone for good
  REQUIRE(logged_queued(broker, C, before.queue[1].req_id, 2));
  REQUIRE(wait_until([&] { return get_status(ep, key).queue_owners() == std::vector<std::string>{C}; }, 5s));
  CHECK(ms_since(t0) >= 400);
  CHECK(c.final_f.wait_for(0ms) == std::future_status::timeout);

  // With B's stale entry gone, A's release goes straight to C.
  REQUIRE(a.release(la.lock_id, A).status == CallStatus::Ok);
  REQUIRE(c.final_f.wait_for(5s) == std::future_status::ready);
  CallResult gc = c.final_f.get();
  REQUIRE(gc.status == CallStatus::Ok);
  CHECK(c.client.release(gc.lock.lock_id, C).status == CallStatus::Ok);
  CHECK(get_status(ep, key).locks.empty());
}

TEST_CASE("a restored request granted before its client returns is handed over on re-attach", "[broker][restart]") {
  BrokerProcess broker(BrokerProcess::Options{"", false, {"--restore-grace-ms", "8000"}});
  const auto ep = broker.endpoint();
  const std::string key = "handover.txt";
  const std::string A = uid("A"), B = uid("B");
  BrokerClient a(ep);
  LockInfo la = must_acquire(a, acq(key, "write", A));
  auto rb = acq(key, "write", B);
  rb.request_id = uid("req-b");
  ResendingAcquire b(ep, rb, nullptr, "B");
  require_queued(ep, key, B);

  broker.kill9();
  REQUIRE(b.first_f.wait_for(5s) == std::future_status::ready);
  broker.start();
  // A lets go while B's client is still away: the lock goes to B's kept place.
  REQUIRE(a.release(la.lock_id, A).status == CallStatus::Ok);
  BrokerState s = get_status(ep, key);
  REQUIRE(s.locks.size() == 1);
  CHECK(s.locks[0].owner == B);
  CHECK(s.queue.empty());
  const std::string orphan_lock = s.locks[0].lock_id;
  // Nobody else gets it meanwhile.
  BrokerClient d(ep);
  CHECK(d.acquire(acq(key, "read", uid("D"), 0)).status == CallStatus::Timeout);

  b.release_go();
  REQUIRE(b.final_f.wait_for(5s) == std::future_status::ready);
  CallResult gb = b.final_f.get();
  REQUIRE(gb.status == CallStatus::Ok);
  CHECK(gb.lock.lock_id == orphan_lock);
  CHECK(gb.lock.hold_count == 1);
  CHECK(gb.lock.fence > la.fence);
  REQUIRE(b.client.release(gb.lock.lock_id, B).status == CallStatus::Ok);
  CHECK(get_status(ep, key).locks.empty());
}

TEST_CASE("SIGTERM answers a waiting acquire 503, exits 0 and keeps the held lock", "[broker][restart]") {
  BrokerProcess broker;
  const auto ep = broker.endpoint();
  BrokerClient a(ep);
  const std::string A = uid("A"), B = uid("B");
  LockInfo la = must_acquire(a, acq("k", "write", A));

  BrokerClient b(ep);
  std::promise<HttpReply> answered;
  auto answered_f = answered.get_future();
  std::thread waiter([&] {
    answered.set_value(b.request("POST", "/v1/locks/acquire", acquire_body("k", "write", B, std::nullopt), true));
  });
  struct Join {
    BrokerClient& c;
    std::thread& t;
    ~Join() {
      c.abort();
      t.join();
    }
  } join{b, waiter};
  require_queued(ep, "k", B);

  const auto t0 = SteadyClock::now();
  const int code = broker.stop();
  CHECK(code == 0);
  CHECK(ms_since(t0) < 5000);
  REQUIRE(answered_f.wait_for(5s) == std::future_status::ready);
  HttpReply r = answered_f.get();
  CHECK(r.status == 503);
  CHECK(!str_field(parse_object(r.body), "error").empty());

  broker.start();
  BrokerState s = get_status(ep, "k");
  REQUIRE(s.lock(la.lock_id));
  CHECK(s.lock(la.lock_id)->owner == A);
  CHECK(a.release(la.lock_id, A).status == CallStatus::Ok);
}

// =================================================================================
// Disconnects and deadlocks

TEST_CASE("a closed connection frees its queue place", "[broker][queue]") {
  BrokerProcess broker;
  const auto ep = broker.endpoint();
  const std::string key = "k";
  BrokerClient a(ep);
  const std::string A = uid("A"), B = uid("B"), C = uid("C"), D = uid("D");
  LockInfo la = must_acquire(a, acq(key, "write", A));

  SECTION("client.abort() while queued") {
    AsyncAcquire b(ep, acq(key, "write", B));
    require_queued(ep, key, B);
    AsyncAcquire c(ep, acq(key, "write", C));
    require_queued(ep, key, C);
    b.abort();
    CHECK(b.result().status == CallStatus::Unavailable);
    CHECK(wait_until([&] { return get_status(ep, key).queue_owners() == std::vector<std::string>{C}; }));
    REQUIRE(a.release(la.lock_id, A).status == CallStatus::Ok);
    CallResult rc = c.result();
    REQUIRE(rc.status == CallStatus::Ok);
    CHECK(c.client().release(rc.lock.lock_id, C).status == CallStatus::Ok);
  }
  SECTION("a raw socket closed while queued") {
    Fd raw = connect_tcp(ep.port);
    REQUIRE(raw.valid());
    const std::string body = acquire_body(key, "read", B, std::nullopt);
    const std::string req = "POST /v1/locks/acquire HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
    REQUIRE(::send(raw.get(), req.data(), req.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(req.size()));
    require_queued(ep, key, B);
    raw.reset();
    CHECK(wait_until([&] { return get_status(ep, key).queue.empty(); }));
    REQUIRE(a.release(la.lock_id, A).status == CallStatus::Ok);
    // Nothing is left in the way of a later writer.
    BrokerClient d(ep);
    LockInfo ld = must_acquire(d, acq(key, "write", D));
    CHECK(d.release(ld.lock_id, D).status == CallStatus::Ok);
  }
}

TEST_CASE("a waiter's time-out lets the readers behind it in at once", "[broker][queue]") {
  BrokerProcess broker;
  const auto ep = broker.endpoint();
  const std::string key = "k";
  BrokerClient a(ep);
  const std::string R1 = uid("R1"), W = uid("W"), R2 = uid("R2");
  LockInfo l1 = must_acquire(a, acq(key, "read", R1));
  AsyncAcquire w(ep, acq(key, "write", W, 400));
  require_queued(ep, key, W);
  AsyncAcquire r2(ep, acq(key, "read", R2));  // no time-out; behind W
  require_queued(ep, key, R2);
  CHECK_FALSE(r2.done());

  CallResult rw = w.result(3s);
  CHECK(rw.status == CallStatus::Timeout);
  // R2 shares with R1 as soon as W left the queue, not later.
  REQUIRE(r2.done_within(1s));
  CallResult g2 = r2.result();
  REQUIRE(g2.status == CallStatus::Ok);
  const auto lag = std::chrono::duration_cast<std::chrono::milliseconds>(r2.done_at() - w.done_at()).count();
  CHECK(lag < 300);
  CHECK(get_status(ep, key).locks.size() == 2);
  CHECK(a.release(l1.lock_id, R1).status == CallStatus::Ok);
}

TEST_CASE("a session asking to write what it holds for reading is refused 409 at once", "[broker][deadlock]") {
  BrokerProcess broker;
  const auto ep = broker.endpoint();
  BrokerClient c(ep);
  const std::string session = "mount-1:4242";
  const std::string O1 = uid("O1"), O2 = uid("O2");
  auto r = acq("f", "read", O1);
  r.session = session;
  LockInfo l = must_acquire(c, r);

  auto w = acq("f", "write", O2, 5000);  // would wait 5 s if not refused
  w.session = session;
  const auto t0 = SteadyClock::now();
  RawResponse raw = raw_request(ep.port, "POST", "/v1/locks/acquire", [&] {
    json::object o = parse_object(acquire_body("f", "write", O2, 5000));
    o["session"] = session;
    return json::serialize(o);
  }());
  CHECK(ms_since(t0) < 1000);
  CHECK(raw.status == 409);
  auto body = parse_object(raw.body);
  CHECK(str_field(body, "status") == "deadlock");
  CHECK(!str_field(body, "error").empty());

  CallResult viaclient = c.acquire(w);
  CHECK(viaclient.status == CallStatus::Deadlock);
  CHECK(get_status(ep, "f").queue.empty());
  // The read lock is untouched.
  CHECK(get_status(ep, "f").lock(l.lock_id) != nullptr);
  CHECK(c.release(l.lock_id, O1).status == CallStatus::Ok);
}

TEST_CASE("two readers that both ask to upgrade: the second is refused 409 at once", "[broker][deadlock]") {
  BrokerProcess broker;
  const auto ep = broker.endpoint();
  BrokerClient c1(ep), c2(ep);
  const std::string O1 = uid("O1"), O2 = uid("O2");
  LockInfo l1 = must_acquire(c1, acq("g", "read", O1));
  LockInfo l2 = must_acquire(c2, acq("g", "read", O2));

  AsyncAcquire up1(ep, acq("g", "write", O1));  // waits for O2 to leave
  require_queued(ep, "g", O1);
  const auto t0 = SteadyClock::now();
  CallResult up2 = c2.acquire(acq("g", "write", O2, 5000));
  CHECK(ms_since(t0) < 1000);
  CHECK(up2.status == CallStatus::Deadlock);
  CHECK(!up2.error.empty());
  CHECK_FALSE(up1.done());

  REQUIRE(c2.release(l2.lock_id, O2).status == CallStatus::Ok);
  CallResult g1 = up1.result();
  REQUIRE(g1.status == CallStatus::Ok);
  CHECK(g1.lock.lock_id == l1.lock_id);
  CHECK(g1.lock.mode == LockMode::Write);
  CHECK(g1.lock.hold_count == 2);
  CHECK(g1.lock.fence == l1.fence);
}

// =================================================================================
// Bad input

TEST_CASE("bad requests get their status and an error while others keep acquiring", "[broker][input]") {
  BrokerProcess broker(BrokerProcess::Options{"", false, {"--idle-timeout-ms", "400", "--request-timeout-ms", "400"}});
  const auto ep = broker.endpoint();
  BrokerClient holder(ep);
  const std::string H = uid("H");
  LockInfo held = must_acquire(holder, acq("held-through-it-all", "write", H));
  Background bg(ep);
  REQUIRE(bg.progresses());
  const auto port = ep.port;

  struct Case {
    const char* what;
    std::string method, target, body;
    int status;
  };
  const std::string ok_owner = uid("o");
  const std::vector<Case> cases = {
      {"not JSON", "POST", "/v1/locks/acquire", "{this is not json", 400},
      {"empty body", "POST", "/v1/locks/acquire", "", 400},
      {"a JSON array", "POST", "/v1/locks/acquire", "[1,2,3]", 400},
      {"a JSON string", "POST", "/v1/locks/acquire", "\"write\"", 400},
      {"path of the wrong type", "POST", "/v1/locks/acquire", R"({"path":1,"mode":"write","owner":"o"})", 400},
      {"owner of the wrong type", "POST", "/v1/locks/acquire", R"({"path":"p","mode":"write","owner":["o"]})", 400},
      {"timeout_ms of the wrong type", "POST", "/v1/locks/acquire",
       R"({"path":"p","mode":"write","owner":"o","timeout_ms":"soon"})", 400},
      {"negative lease", "POST", "/v1/locks/acquire", R"({"path":"p","mode":"write","owner":"o","lease_ms":-5})", 400},
      {"bad mode", "POST", "/v1/locks/acquire", R"({"path":"p","mode":"exclusive","owner":"o"})", 400},
      {"missing path", "POST", "/v1/locks/acquire", R"({"mode":"write","owner":"o"})", 400},
      {"missing mode", "POST", "/v1/locks/acquire", R"({"path":"p","owner":"o"})", 400},
      {"missing owner", "POST", "/v1/locks/acquire", R"({"path":"p","mode":"read"})", 400},
      {"empty key", "POST", "/v1/locks/acquire", R"({"path":"","mode":"write","owner":"o"})", 400},
      {"key too long", "POST", "/v1/locks/acquire",
       acquire_body(std::string(5000, 'k'), "write", "o"), 400},
      {"release without owner", "POST", "/v1/locks/release", R"({"lock_id":"x"})", 400},
      {"release with a numeric lock_id", "POST", "/v1/locks/release", R"({"lock_id":7,"owner":"o"})", 400},
      {"heartbeat not JSON", "POST", "/v1/locks/heartbeat", "lock please", 400},
      {"release of an unknown lock", "POST", "/v1/locks/release", R"({"lock_id":"nope","owner":"o"})", 404},
      {"release of another's lock", "POST", "/v1/locks/release",
       "{\"lock_id\":\"" + held.lock_id + "\",\"owner\":\"" + ok_owner + "\"}", 403},
      {"an unknown route", "GET", "/v1/locks/steal", "", 404},
      {"an unknown route with a body", "POST", "/v2/whatever", "{}", 404},
  };
  SECTION("malformed or refused requests") {
    for (const auto& c : cases) {
      RawResponse r = raw_request(port, c.method, c.target, c.body);
      check_refused(r, c.status, c.what);
      CHECK(bg.progresses());
    }
  }

  SECTION("a body of 2 MiB is refused 413") {
    const std::string big = "{\"path\":\"" + std::string(2 * 1024 * 1024, 'x') + "\",\"mode\":\"write\",\"owner\":\"o\"}";
    Fd fd = connect_tcp(port);
    REQUIRE(fd.valid());
    const std::string req = "POST /v1/locks/acquire HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            "Content-Length: " + std::to_string(big.size()) + "\r\n\r\n" + big;
    check_refused(exchange(fd.get(), req), 413, "2 MiB body");
    // Also when the length is not announced up front (chunked).
    Fd fd2 = connect_tcp(port);
    REQUIRE(fd2.valid());
    std::string chunked = "POST /v1/locks/acquire HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    for (int i = 0; i < 32; ++i) {
      chunked += "10000\r\n" + std::string(65536, 'y') + "\r\n";
    }
    chunked += "0\r\n\r\n";
    check_refused(exchange(fd2.get(), chunked), 413, "2 MiB chunked body");
    // A client that writes its whole body before it reads (Python's http.client)
    // gets the answer too, not a reset while it is still sending.
    Fd fd3 = connect_tcp(port);
    REQUIRE(fd3.valid());
    std::size_t sent = 0;
    int send_errno = 0;
    while (sent < req.size()) {
      ssize_t n = ::send(fd3.get(), req.data() + sent, req.size() - sent, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        send_errno = errno;
        break;
      }
      sent += static_cast<std::size_t>(n);
    }
    INFO("send stopped with errno " << send_errno << " after " << sent << " of " << req.size());
    CHECK(sent == req.size());
    check_refused(exchange(fd3.get(), ""), 413, "2 MiB body sent before reading");
    CHECK(bg.progresses());
  }
  SECTION("garbage instead of HTTP is refused 400") {
    Fd fd = connect_tcp(port);
    REQUIRE(fd.valid());
    check_refused(exchange(fd.get(), "HELLO BROKER\r\n\r\n"), 400, "not HTTP");
    CHECK(bg.progresses());
  }
  SECTION("a half-sent header is closed after the idle time-out") {
    Fd fd = connect_tcp(port);
    REQUIRE(fd.valid());
    const std::string part = "POST /v1/locks/acquire HTTP/1.1\r\nHost: x\r\nContent-Le";
    REQUIRE(::send(fd.get(), part.data(), part.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(part.size()));
    const auto t0 = SteadyClock::now();
    std::string got;
    CHECK(closed_within(fd.get(), 3s, &got));
    CHECK(ms_since(t0) >= 300);
    CHECK(bg.progresses());
  }
  SECTION("a half-sent body is closed after the request time-out") {
    Fd fd = connect_tcp(port);
    REQUIRE(fd.valid());
    const std::string part =
        "POST /v1/locks/acquire HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"path\":";
    REQUIRE(::send(fd.get(), part.data(), part.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(part.size()));
    const auto t0 = SteadyClock::now();
    std::string got;
    CHECK(closed_within(fd.get(), 3s, &got));
    CHECK(ms_since(t0) >= 300);
    if (!got.empty()) {  // an answer is optional; if there is one it says what was wrong
      RawResponse r;
      REQUIRE(parse_response(got, &r));
      check_refused(r, r.status, "half-sent body");
      CHECK(r.status >= 400);
    }
    CHECK(bg.progresses());
  }
  SECTION("a connection that sends nothing is closed after the idle time-out") {
    Fd fd = connect_tcp(port);
    REQUIRE(fd.valid());
    CHECK(closed_within(fd.get(), 3s));
    CHECK(bg.progresses());
  }

  bg.stop();
  INFO("background client: " << bg.first_failure());
  CHECK(bg.failures() == 0);
  CHECK(bg.rounds() > 0);
  // No input dropped another client's lock.
  BrokerState s = get_status(ep);
  REQUIRE(s.lock(held.lock_id));
  CHECK(holder.release(held.lock_id, H).status == CallStatus::Ok);
  CHECK(broker.pid() > 0);
  CHECK(::kill(broker.pid(), 0) == 0);  // still alive
}

TEST_CASE("2,000 idle connections do not stop the broker from serving", "[broker][input]") {
  raise_fd_limit(2600);
  BrokerProcess broker;
  const auto ep = broker.endpoint();
  BrokerClient holder(ep);
  const std::string H = uid("H");
  LockInfo held = must_acquire(holder, acq("held", "write", H));
  Background bg(ep);
  REQUIRE(bg.progresses());

  std::vector<Fd> idle;
  idle.reserve(2000);
  for (int i = 0; i < 2000; ++i) {
    Fd fd = connect_tcp(ep.port);
    if (!fd.valid()) FAIL("connection " << i << " failed: " << std::strerror(errno));
    idle.push_back(std::move(fd));
  }
  // The broker accepted them all (it counts open connections in /metrics)...
  BrokerClient m(ep);
  auto connections = [&]() -> long {
    HttpReply r = m.request("GET", "/metrics", "");
    auto p = r.body.find("\ngate_connections ");
    return p == std::string::npos ? -1 : std::atol(r.body.c_str() + p + 18);
  };
  CHECK(wait_until([&] { return connections() >= 2000; }, 10s, 20ms));
  // ...and keeps serving others, old connections and new ones.
  CHECK(bg.progresses());
  BrokerClient fresh(ep);
  const std::string F = uid("F");
  LockInfo lf = must_acquire(fresh, acq("fresh", "write", F));
  CHECK(fresh.release(lf.lock_id, F).status == CallStatus::Ok);
  // One of the idle connections can still be used.
  RawResponse r = exchange(idle[1234].get(), "GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(r.status == 200);
  check_refused(raw_request(ep.port, "POST", "/v1/locks/acquire", "[]"), 400, "array with 2,000 idle");

  idle.clear();
  CHECK(wait_until([&] { return connections() < 100; }, 10s, 20ms));
  CHECK(bg.progresses());
  bg.stop();
  INFO("background client: " << bg.first_failure());
  CHECK(bg.failures() == 0);
  CHECK(get_status(ep).lock(held.lock_id) != nullptr);
}

// =================================================================================
// Protocols and transports

TEST_CASE("an HTTP/1.0 client is answered and the connection closed", "[broker][http]") {
  BrokerProcess broker;
  const auto ep = broker.endpoint();
  const std::string O = uid("O");
  RawResponse g = raw_request(ep.port, "POST", "/v1/locks/acquire", acquire_body("old", "write", O), "HTTP/1.0");
  CHECK(g.closed);
  REQUIRE(g.status == 200);
  CHECK(g.version == "HTTP/1.0");
  auto body = parse_object(g.body);
  CHECK(str_field(body, "status") == "granted");
  const std::string lock_id = str_field(body.at("lock").as_object(), "lock_id");
  REQUIRE(!lock_id.empty());

  RawResponse s = raw_request(ep.port, "GET", "/v1/locks/status?path=old", "", "HTTP/1.0");
  CHECK(s.closed);
  REQUIRE(s.status == 200);
  CHECK(s.body.find(lock_id) != std::string::npos);

  RawResponse r = raw_request(ep.port, "POST", "/v1/locks/release",
                              "{\"lock_id\":\"" + lock_id + "\",\"owner\":\"" + O + "\"}", "HTTP/1.0");
  CHECK(r.closed);
  REQUIRE(r.status == 200);
  CHECK(str_field(parse_object(r.body), "status") == "released");
  CHECK(get_status(ep).locks.empty());
}

namespace {

std::string post_request(const std::string& target, const std::string& body) {
  return "POST " + target + " HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " +
         std::to_string(body.size()) + "\r\n\r\n" + body;
}

// Reads up to `n` responses off one connection within `limit`.
std::vector<RawResponse> read_responses(int fd, int n, std::chrono::milliseconds limit) {
  std::vector<RawResponse> out;
  std::string in;
  const auto end = SteadyClock::now() + limit;
  while (static_cast<int>(out.size()) < n && SteadyClock::now() < end) {
    RawResponse r;
    if (parse_response(in, &r)) {
      in.erase(0, r.head.size() + 4 + r.body.size());
      out.push_back(r);
      continue;
    }
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 50) <= 0) continue;
    char buf[65536];
    ssize_t got = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
    if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR)) break;
    if (got > 0) in.append(buf, static_cast<std::size_t>(got));
  }
  return out;
}

void send_all(int fd, const std::string& data) {
  REQUIRE(::send(fd, data.data(), data.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(data.size()));
}

}  // namespace

TEST_CASE("pipelined requests on one keep-alive connection are answered in order", "[broker][http]") {
  BrokerProcess broker;
  const auto ep = broker.endpoint();
  const std::string O = uid("O");
  Fd fd = connect_tcp(ep.port);
  REQUIRE(fd.valid());
  send_all(fd.get(), post_request("/v1/locks/acquire", acquire_body("p", "write", O)) +
                         "GET /v1/locks/status?path=p HTTP/1.1\r\nHost: x\r\n\r\n" +
                         "GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n");
  auto rs = read_responses(fd.get(), 3, 5s);
  REQUIRE(rs.size() == 3);
  CHECK(rs[0].status == 200);
  CHECK(str_field(parse_object(rs[0].body), "status") == "granted");
  CHECK(rs[1].status == 200);
  CHECK(rs[1].body.find(O) != std::string::npos);
  CHECK(rs[2].status == 200);
  CHECK(str_field(parse_object(rs[2].body), "status") == "ok");
}

// BROKER BUG (reported): Session::on_watch() moves bytes that arrive during a wait into
// buffer_ and re-arms the watch; after the grant is written, on_write() sees the watch
// pending and leaves the next request to it, but that request is already buffered, so
// nothing parses it until the client sends more. The pipelined request is never answered.
TEST_CASE("a request pipelined behind a waiting acquire is answered after the grant",
          "[broker][http]") {
  BrokerProcess broker;
  const auto ep = broker.endpoint();
  const std::string O = uid("O"), A = uid("A");
  BrokerClient a(ep);
  LockInfo la = must_acquire(a, acq("p", "write", A));
  Fd fd = connect_tcp(ep.port);
  REQUIRE(fd.valid());
  send_all(fd.get(), post_request("/v1/locks/acquire", acquire_body("p", "write", O, std::nullopt)));
  require_queued(ep, "p", O);
  send_all(fd.get(), "GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(get_status(ep, "p").queued(O));  // the pipelined bytes did not end the wait
  REQUIRE(a.release(la.lock_id, A).status == CallStatus::Ok);
  auto rs = read_responses(fd.get(), 2, 2s);
  REQUIRE(rs.size() >= 1);
  CHECK(rs[0].status == 200);
  CHECK(str_field(parse_object(rs[0].body), "status") == "granted");
  REQUIRE(rs.size() == 2);
  CHECK(rs[1].status == 200);
  CHECK(str_field(parse_object(rs[1].body), "status") == "ok");
}

// BROKER BUG (reported): while an acquire waits the session sets expires_never() and
// watches the socket; after the grant, on_write() calls expires_after(idle_timeout) while
// that watch read is already pending, which does not arm a timer for it, so the
// connection is never closed for idleness.
TEST_CASE("a connection that waited for a grant is still closed after the idle time-out",
          "[broker][http]") {
  BrokerProcess broker(BrokerProcess::Options{"", false, {"--idle-timeout-ms", "400"}});
  const auto ep = broker.endpoint();
  const std::string O = uid("O"), A = uid("A");
  BrokerClient a(ep);
  LockInfo la = must_acquire(a, acq("p", "write", A));
  Fd fd = connect_tcp(ep.port);
  REQUIRE(fd.valid());
  send_all(fd.get(), post_request("/v1/locks/acquire", acquire_body("p", "write", O, std::nullopt)));
  require_queued(ep, "p", O);
  REQUIRE(a.release(la.lock_id, A).status == CallStatus::Ok);
  auto rs = read_responses(fd.get(), 1, 3s);
  REQUIRE(rs.size() == 1);
  REQUIRE(rs[0].status == 200);
  // Now idle: closed after about 400 ms, like any other idle connection.
  CHECK(closed_within(fd.get(), 3s));
}

TEST_CASE("connections beyond --max-connections are answered 503 with an error", "[broker][input]") {
  BrokerProcess broker(BrokerProcess::Options{"", false, {"--max-connections", "5"}});
  const auto ep = broker.endpoint();
  BrokerClient m(ep);
  auto connections = [&]() -> long {
    HttpReply r = m.request("GET", "/metrics", "");
    auto p = r.body.find("\ngate_connections ");
    return p == std::string::npos ? -1 : std::atol(r.body.c_str() + p + 18);
  };
  std::vector<Fd> idle;
  for (int i = 0; i < 4; ++i) idle.push_back(connect_tcp(ep.port));
  REQUIRE(wait_until([&] { return connections() == 5; }));
  Fd extra = connect_tcp(ep.port);
  REQUIRE(extra.valid());
  check_refused(exchange(extra.get(), "GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"), 503, "sixth connection");
  // The connections it has keep working.
  CHECK(m.healthy());
  idle.clear();
  REQUIRE(wait_until([&] { return connections() == 1; }));
  BrokerClient later(ep);
  const std::string O = uid("O");
  LockInfo l = must_acquire(later, acq("k", "write", O));
  CHECK(later.release(l.lock_id, O).status == CallStatus::Ok);
}

TEST_CASE("a key of 4096 bytes is accepted and one of 4097 refused", "[broker][input]") {
  BrokerProcess broker;
  const auto ep = broker.endpoint();
  BrokerClient c(ep);
  const std::string O = uid("O");
  LockInfo l = must_acquire(c, acq(std::string(4096, 'k'), "write", O));
  CHECK(l.key.size() == 4096);
  CHECK(c.release(l.lock_id, O).status == CallStatus::Ok);
  check_refused(raw_request(ep.port, "POST", "/v1/locks/acquire", acquire_body(std::string(4097, 'k'), "write", O)),
                400, "4097-byte key");
  // UTF-8 keys are opaque strings: they come back as sent.
  const std::string utf8 = "d\xc3\xa9j\xc3\xa0/\xe6\x96\x87\xe4\xbb\xb6.txt";
  LockInfo u = must_acquire(c, acq(utf8, "read", O));
  CHECK(u.key == utf8);
  CHECK(get_status(ep, utf8).lock(u.lock_id) != nullptr);
}

TEST_CASE("the broker serves on a Unix socket of mode 0600", "[broker][http]") {
  BrokerProcess broker(BrokerProcess::Options{"", true, {}});
  const auto uep = broker.unix_endpoint();
  REQUIRE(!uep.unix_socket.empty());
  struct stat st {};
  REQUIRE(::lstat(uep.unix_socket.c_str(), &st) == 0);
  CHECK(S_ISSOCK(st.st_mode));
  CHECK((st.st_mode & 07777) == 0600);

  BrokerClient u(uep);
  CHECK(u.healthy());
  const std::string O = uid("O");
  LockInfo l = must_acquire(u, acq("via/unix", "write", O));
  // The same lock table answers on TCP.
  BrokerClient t(broker.endpoint());
  CHECK(t.acquire(acq("via/unix", "read", uid("P"), 0)).status == CallStatus::Timeout);
  BrokerState s = get_status(uep);
  CHECK(s.lock(l.lock_id) != nullptr);
  // And a raw HTTP/1.1 request over the socket works too.
  Fd fd = connect_unix(uep.unix_socket);
  REQUIRE(fd.valid());
  RawResponse h = exchange(fd.get(), "GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n");
  CHECK(h.status == 200);
  CHECK(u.release(l.lock_id, O).status == CallStatus::Ok);
}

TEST_CASE("GET /metrics reports held locks, queue length and counters", "[broker][http]") {
  BrokerProcess broker;
  const auto ep = broker.endpoint();
  BrokerClient c(ep);
  const std::string A = uid("A"), B = uid("B");
  LockInfo la = must_acquire(c, acq("m", "write", A));
  AsyncAcquire b(ep, acq("m", "write", B));
  require_queued(ep, "m", B);
  CHECK(c.acquire(acq("m", "write", uid("T"), 0)).status == CallStatus::Timeout);
  raw_request(ep.port, "POST", "/v1/locks/acquire", "nonsense");

  RawResponse m = raw_request(ep.port, "GET", "/metrics", "");
  REQUIRE(m.status == 200);
  CHECK(m.head.find("text/plain") != std::string::npos);
  const std::string& t = m.body;
  CHECK(t.find("# TYPE gate_locks_held gauge\ngate_locks_held 1\n") != std::string::npos);
  CHECK(t.find("\ngate_queue_length 1\n") != std::string::npos);
  CHECK(t.find("\ngate_grants_total ") != std::string::npos);
  CHECK(t.find("\ngate_acquire_timeouts_total 1\n") != std::string::npos);
  CHECK(t.find("\ngate_bad_requests_total 1\n") != std::string::npos);
  CHECK(t.find("gate_acquire_wait_seconds_bucket{le=\"+Inf\"}") != std::string::npos);

  REQUIRE(c.release(la.lock_id, A).status == CallStatus::Ok);
  CallResult rb = b.result();
  REQUIRE(rb.status == CallStatus::Ok);
  HttpReply after = c.request("GET", "/metrics", "");
  CHECK(after.body.find("\ngate_grants_after_wait_total 1\n") != std::string::npos);
  CHECK(after.body.find("\ngate_queue_length 0\n") != std::string::npos);
}

TEST_CASE("a release may say what a mount did with a stale replacement, which /metrics counts",
          "[broker][http]") {
  BrokerProcess broker;
  const auto ep = broker.endpoint();
  BrokerClient c(ep);
  const std::string A = uid("A");
  LockInfo l = must_acquire(c, acq("s", "write", A));
  // Anything but merged, conflict or refused is refused, and the lock stays.
  RawResponse bad = raw_request(ep.port, "POST", "/v1/locks/release",
                                "{\"lock_id\":\"" + l.lock_id + "\",\"owner\":\"" + A +
                                    "\",\"stale\":\"maybe\"}");
  CHECK(bad.status == 400);
  CHECK(bad.body.find("\\\"stale\\\" must be") != std::string::npos);
  REQUIRE(c.release(l.lock_id, A, true, "merged").status == CallStatus::Ok);
  l = must_acquire(c, acq("s", "write", A));
  REQUIRE(c.release(l.lock_id, A, false, "refused").status == CallStatus::Ok);
  const std::string t = c.request("GET", "/metrics", "").body;
  CHECK(t.find("gate_stale_replacements_total{outcome=\"merged\"} 1\n") != std::string::npos);
  CHECK(t.find("gate_stale_replacements_total{outcome=\"conflict\"} 0\n") != std::string::npos);
  CHECK(t.find("gate_stale_replacements_total{outcome=\"refused\"} 1\n") != std::string::npos);
}

TEST_CASE("gate locks prints the held locks and the queue of a running broker", "[broker][cli]") {
  BrokerProcess broker;
  const auto ep = broker.endpoint();
  BrokerClient c(ep);
  const std::string A = uid("holder"), B = uid("waiter");
  const std::string key = "project/src/held-file.c";
  LockInfo la = must_acquire(c, acq(key, "write", A));
  AsyncAcquire b(ep, acq(key, "read", B));
  require_queued(ep, key, B);

  test::TempDir out;
  auto run = [&](std::vector<std::string> extra) {
    const std::string file = out.path() + "/out-" + std::to_string(extra.size()) + ".txt";
    std::vector<std::string> argv = {test::gate_binary(), "locks", "--broker-host", "127.0.0.1",
                                     "--broker-port", std::to_string(ep.port)};
    argv.insert(argv.end(), extra.begin(), extra.end());
    test::Child child = test::Child::spawn(argv, file);
    const int code = child.wait(10s);
    return std::make_pair(code, test::read_file(file));
  };
  auto [code, text] = run({});
  INFO(text);
  CHECK(code == 0);
  CHECK(text.find(key) != std::string::npos);
  CHECK(text.find(A) != std::string::npos);
  CHECK(text.find(B) != std::string::npos);

  auto [jcode, jtext] = run({"--json"});
  CHECK(jcode == 0);
  auto o = parse_object(jtext);
  REQUIRE(o.at("locks").as_array().size() == 1);
  CHECK(str_field(o.at("locks").as_array()[0].as_object(), "lock_id") == la.lock_id);

  // Against no broker: a clear failure, not a hang.
  const auto port = ep.port;
  broker.kill9();
  test::Child child = test::Child::spawn({test::gate_binary(), "locks", "--broker-host", "127.0.0.1",
                                          "--broker-port", std::to_string(port)},
                                         out.path() + "/down.txt");
  CHECK(child.wait(10s) != 0);
}

// =================================================================================
// kill -9 in the middle of a burst

TEST_CASE("kill -9 during a burst of acquires and releases loses no held lock and grants none twice",
          "[broker][restart][burst]") {
  BrokerProcess broker;
  const auto ep = broker.endpoint();
  const std::vector<std::string> keys = {"burst/a", "burst/b", "burst/c", "burst/d"};

  struct Granted {
    std::string lock_id, path, mode, owner;
    std::uint64_t fence;
  };
  std::mutex m;
  std::map<std::string, Granted> held;       // granted, no release sent yet
  std::set<std::string> releasing;           // release sent, answer unknown
  std::set<std::string> released;            // release confirmed
  std::uint64_t max_fence = 0;
  std::atomic<long> grants{0};
  std::atomic<bool> stop{false};
  std::vector<std::string> thread_errors;

  constexpr int kThreads = 6;
  constexpr int kRounds = 2000;
  std::vector<std::unique_ptr<BrokerClient>> clients;
  for (int i = 0; i < kThreads; ++i) clients.push_back(std::make_unique<BrokerClient>(ep, 10s));
  std::vector<std::thread> threads;
  struct JoinAll {
    std::vector<std::unique_ptr<BrokerClient>>& clients;
    std::vector<std::thread>& threads;
    std::atomic<bool>& stop;
    ~JoinAll() {
      stop = true;
      for (auto& c : clients) c->abort();
      for (auto& t : threads)
        if (t.joinable()) t.join();
    }
  } join_all{clients, threads, stop};

  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      BrokerClient& c = *clients[i];
      std::mt19937 rng(static_cast<unsigned>(i * 7919 + 1));
      for (int n = 0; n < kRounds && !stop; ++n) {
        // Now and then take a lock of one's own and keep it: these must all survive.
        const bool keep = n % 10 == 0;
        const std::string key = keep ? "own/" + std::to_string(i) + "/" + std::to_string(n)
                                     : keys[rng() % keys.size()];
        const std::string mode = keep || rng() % 3 ? "write" : "read";
        const std::string owner = "t" + std::to_string(i) + "-" + std::to_string(n) + "-" + random_token().substr(0, 8);
        CallResult a = c.acquire(acq(key, mode, owner, 2000));
        if (a.status == CallStatus::Unavailable) return;
        if (a.status == CallStatus::Timeout) continue;
        if (a.status != CallStatus::Ok) {
          std::lock_guard<std::mutex> g(m);
          thread_errors.push_back("acquire: " + std::string(to_string(a.status)) + " " + a.error);
          return;
        }
        {
          std::lock_guard<std::mutex> g(m);
          // A lock whose holder has not sent its release yet is certainly still held:
          // the broker may not have granted anything conflicting with it.
          for (const auto& [id, other] : held)
            if (other.path == key && (mode == "write" || other.mode == "write"))
              thread_errors.push_back("granted " + mode + " '" + key + "' to " + owner + " while " +
                                      other.owner + " held " + other.mode);
          held[a.lock.lock_id] = {a.lock.lock_id, key, mode, owner, a.lock.fence};
          max_fence = std::max(max_fence, a.lock.fence);
        }
        ++grants;
        if (keep) continue;
        {
          std::lock_guard<std::mutex> g(m);
          held.erase(a.lock.lock_id);
          releasing.insert(a.lock.lock_id);
        }
        CallResult r = c.release(a.lock.lock_id, owner);
        if (r.status == CallStatus::Unavailable) return;
        std::lock_guard<std::mutex> g(m);
        if (r.status != CallStatus::Ok) {
          thread_errors.push_back("release: " + std::string(to_string(r.status)) + " " + r.error);
          return;
        }
        releasing.erase(a.lock.lock_id);
        released.insert(a.lock.lock_id);
      }
    });
  }

  // Kill mid-burst: once enough has happened, but long before the threads finish.
  REQUIRE(wait_until([&] { return grants >= 600; }, 20s));
  broker.kill9();
  for (auto& t : threads) t.join();
  {
    std::string errors;
    for (const auto& e : thread_errors) errors += e + "\n";
    INFO(errors);
    REQUIRE(thread_errors.empty());
  }
  INFO("grants before the kill: " << grants << ", held: " << held.size()
                                  << ", release in flight: " << releasing.size());
  CHECK(grants < kThreads * kRounds);  // really mid-burst
  REQUIRE(held.size() >= 30);

  broker.start();
  BrokerState s = get_status(ep);

  // No key has two writers, or a writer and anyone else.
  std::map<std::string, std::vector<HeldLock>> by_key;
  std::set<std::string> ids;
  for (const auto& l : s.locks) {
    by_key[l.path].push_back(l);
    CHECK(ids.insert(l.lock_id).second);
  }
  for (const auto& [key, ls] : by_key) {
    const auto writers = std::count_if(ls.begin(), ls.end(), [](const auto& l) { return l.mode == "write"; });
    INFO("key " << key << ": " << ls.size() << " holders, " << writers << " writers");
    CHECK((writers == 0 || ls.size() == 1));
  }
  // Every lock granted and not (being) released is still there, as it was.
  for (const auto& [id, g] : held) {
    const HeldLock* l = s.lock(id);
    INFO("lock " << id << " on " << g.path);
    REQUIRE(l != nullptr);
    CHECK(l->path == g.path);
    CHECK(l->owner == g.owner);
    CHECK(l->mode == g.mode);
    CHECK(l->fence == g.fence);
  }
  // No confirmed release came back to life.
  for (const auto& id : released) CHECK(s.lock(id) == nullptr);
  // Fences after the restart are above all before.
  BrokerClient c(ep);
  LockInfo after = must_acquire(c, acq("burst/after-restart", "write", uid("Z")));
  CHECK(after.fence > max_fence);
  for (const auto& l : s.locks) CHECK(after.fence > l.fence);
}

TEST_CASE("a full disk answers 503, keeps the held locks, and the broker recovers when space returns",
          "[broker][disk]") {
  if (::geteuid() != 0) return;  // mounting a small tmpfs needs root
  gate::test::TempDir dir("gate-disk");
  const std::string fs_dir = dir.path() + "/small";
  ::mkdir(fs_dir.c_str(), 0700);
  REQUIRE(gate::run_command({"mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", fs_dir}).status == 0);
  struct Unmount {
    std::string path;
    ~Unmount() { gate::run_command({"umount", "-l", path}); }
  } unmount{fs_dir};

  BrokerProcess broker(BrokerProcess::Options{fs_dir, false, {}});
  const auto ep = broker.endpoint();
  BrokerClient c(ep);
  const std::string A = uid("A");
  LockInfo held = must_acquire(c, acq("held.txt", "write", A));

  // Fill the file system, then keep acquiring until saving fails.
  const std::string filler = fs_dir + "/filler";
  {
    int fd = ::open(filler.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    REQUIRE(fd >= 0);
    std::string block(64 * 1024, 'x');
    while (::write(fd, block.data(), block.size()) > 0) {
    }
    ::close(fd);
  }
  std::optional<CallResult> failed;
  std::string failed_key;
  for (int i = 0; i < 5000 && !failed; ++i) {
    failed_key = "k" + std::to_string(i);
    CallResult r = c.acquire(acq(failed_key, "write", uid("F"), 0));
    if (r.status == CallStatus::Ok) c.release(r.lock.lock_id, r.lock.owner);
    else failed = r;
  }
  REQUIRE(failed);
  REQUIRE(failed->status == CallStatus::Unavailable);
  INFO(failed->error);
  CHECK(failed->error.find("could not be saved") != std::string::npos);
  // Alive, and saying what is wrong, while nothing can be saved.
  HttpReply health = c.request("GET", "/v1/health", "");
  CHECK(health.status == 503);
  CHECK(health.body.find("disk is full") != std::string::npos);

  ::unlink(filler.c_str());
  CallResult again = c.acquire(acq("after.txt", "write", uid("B"), 0));
  CHECK(again.status == CallStatus::Ok);
  // The grant that could not be saved was taken back: its key is free.
  CHECK(c.acquire(acq(failed_key, "write", uid("G"), 0)).status == CallStatus::Ok);
  CHECK(c.heartbeat(held.lock_id, A).status == CallStatus::Ok);
  BrokerClient m(ep);
  CHECK(m.request("GET", "/metrics", "").body.find("gate_store_failures_total 0") == std::string::npos);

  // What was saved survives a restart: the lock held before the disk filled is there.
  broker.kill9();
  broker.start();
  BrokerClient c2(broker.endpoint());
  CHECK(c2.heartbeat(held.lock_id, A).status == CallStatus::Ok);
}

// =================================================================================
// Content versions


TEST_CASE("a write release that says changed gives the key a new version, which every grant carries "
          "and a kill -9 keeps",
          "[broker][version][restart]") {
  BrokerProcess broker;
  const auto ep = broker.endpoint();
  BrokerClient c(ep);
  const std::string A = uid("A"), B = uid("B");
  LockInfo first = must_acquire(c, acq("src/v.c", "write", A));
  CHECK(first.version == 0);
  REQUIRE(c.release(first.lock_id, A).status == CallStatus::Ok);  // nothing changed
  CHECK(test::key_version(ep, "src/v.c") == 0);

  LockInfo w = must_acquire(c, acq("src/v.c", "write", A));
  REQUIRE(c.release(w.lock_id, A, /*changed=*/true).status == CallStatus::Ok);
  CHECK(test::key_version(ep, "src/v.c") == w.fence);
  LockInfo r = must_acquire(c, acq("src/v.c", "read", B));
  CHECK(r.version == w.fence);
  // A reader's "changed" changes nothing.
  REQUIRE(c.release(r.lock_id, B, true).status == CallStatus::Ok);
  CHECK(test::key_version(ep, "src/v.c") == w.fence);

  // A bad "changed" is refused with a clear error, and the lock stays.
  LockInfo held = must_acquire(c, acq("src/v.c", "write", A));
  RawResponse bad = raw_request(ep.port, "POST", "/v1/locks/release",
                                R"({"lock_id":")" + held.lock_id + R"(","owner":")" + A +
                                    R"(","changed":"yes"})");
  CHECK(bad.status == 400);
  CHECK(bad.body.find("'changed' must be true or false") != std::string::npos);
  REQUIRE(c.release(held.lock_id, A, true).status == CallStatus::Ok);
  const std::uint64_t before = held.fence;
  CHECK(test::key_version(ep, "src/v.c") == before);

  broker.kill9();
  broker.start();
  CHECK(test::key_version(ep, "src/v.c") == before);
  BrokerClient d(ep);
  LockInfo after = must_acquire(d, acq("src/v.c", "write", A));
  CHECK(after.version == before);
  CHECK(after.fence > before);  // no fence is reused, so no version goes backwards
  REQUIRE(d.release(after.lock_id, A, true).status == CallStatus::Ok);
  CHECK(test::key_version(ep, "src/v.c") == after.fence);
  // The whole-table view lists it too.
  HttpReply all = d.status("");
  CHECK(json::parse(all.body).at("versions").as_object().at("src/v.c").to_number<std::uint64_t>() ==
        after.fence);
}
