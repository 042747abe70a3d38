// broker_bench: how fast a running `gate broker` is, next to the ceiling of HTTP.
//
// Drives a broker on 127.0.0.1 (or a Unix socket) with N concurrent keep-alive
// clients and prints, per scenario:
//   uncontended  every client locks and unlocks its own key: pairs/s, HTTP
//                requests/s, p50/p99 latency of an acquire+release pair.
//   baseline     the same clients send the same POSTs, as many as the broker
//                answered, to trivial_server (`200 {}`); the broker's request
//                rate as a share of it is the figure that matters.
//   contended    every client write-locks one key: pairs/s and the hand-off time
//                from a holder sending release to the next holder seeing its grant.
//   handoff      two clients (one per broker with --port2) take one key in turn,
//                each releasing once the other waits: the hand-off time alone.
//   memory       (--hold N) N distinct keys held at once, then the broker's VmRSS.
//
// The clients are coroutines on one io_context in one thread: on a 2-core machine
// that leaves the other core to the server, and the bench prints its own CPU use
// next to the server's so a client-bound figure shows itself. Every loop is
// bounded by a count or a deadline, and a hard deadline closes whatever is left.
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/json.hpp>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace json = boost::json;
using tcp = asio::ip::tcp;
using generic_stream = asio::generic::stream_protocol;
using Clock = std::chrono::steady_clock;

namespace {

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

Clock::duration seconds_to_duration(double s) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
}

// ---------------------------------------------------------------------------
// Where a server listens: loopback TCP or a Unix socket, nothing else.
struct Endpoint {
  std::string host = "127.0.0.1";
  int port = 0;
  std::string unix_path;

  bool is_unix() const { return !unix_path.empty(); }
  std::string describe() const {
    return is_unix() ? "unix:" + unix_path : host + ":" + std::to_string(port);
  }
  generic_stream::endpoint resolve() const {
    if (is_unix()) return generic_stream::endpoint(asio::local::stream_protocol::endpoint(unix_path));
    return generic_stream::endpoint(tcp::endpoint(asio::ip::make_address(host), static_cast<unsigned short>(port)));
  }
};

// ---------------------------------------------------------------------------
// One keep-alive HTTP/1.1 connection that posts JSON and reads the answer.
struct Reply {
  unsigned status = 0;
  std::string body;
  json::value json;  // null when the body is not JSON
};

class HttpConnection {
 public:
  HttpConnection(asio::io_context& ioc, Endpoint ep) : socket_(ioc), endpoint_(std::move(ep)) {}

  asio::awaitable<void> connect() {
    if (socket_.is_open()) {
      beast::error_code ignored;
      socket_.close(ignored);
    }
    buffer_.clear();
    co_await socket_.async_connect(endpoint_.resolve(), asio::use_awaitable);
    if (!endpoint_.is_unix()) socket_.set_option(tcp::no_delay(true));
    connected_ = true;
  }

  asio::awaitable<Reply> post(std::string_view target, std::string body) {
    co_return co_await exchange(http::verb::post, target, std::move(body));
  }
  asio::awaitable<Reply> get(std::string_view target) { co_return co_await exchange(http::verb::get, target, ""); }

  asio::awaitable<Reply> exchange(http::verb verb, std::string_view target, std::string body) {
    if (!connected_) {
      ++reconnects_;
      co_await connect();
    }
    http::request<http::string_body> req{verb, target, 11};
    req.set(http::field::host, endpoint_.is_unix() ? std::string("localhost") : endpoint_.host);
    if (verb == http::verb::post) req.set(http::field::content_type, "application/json");
    req.body() = std::move(body);
    req.prepare_payload();
    co_await http::async_write(socket_, req, asio::use_awaitable);

    http::response<http::string_body> res;
    co_await http::async_read(socket_, buffer_, res, asio::use_awaitable);
    if (!res.keep_alive()) connected_ = false;  // the server will close; reconnect next time

    Reply reply;
    reply.status = res.result_int();
    reply.body = std::move(res.body());
    json::error_code ec;
    reply.json = json::parse(reply.body, ec);
    if (ec) reply.json = nullptr;
    co_return reply;
  }

  // Aborts whatever the connection is waiting for (used by the hard deadline).
  void close() {
    beast::error_code ignored;
    socket_.close(ignored);
    connected_ = false;
  }

  std::uint64_t reconnects() const { return reconnects_; }

 private:
  generic_stream::socket socket_;
  Endpoint endpoint_;
  beast::flat_buffer buffer_;
  bool connected_ = false;
  std::uint64_t reconnects_ = 0;
};

std::string acquire_body(const std::string& path, const std::string& owner,
                         std::optional<std::int64_t> lease_ms = std::nullopt) {
  json::object o;
  o["path"] = path;
  o["mode"] = "write";
  o["owner"] = owner;
  o["timeout_ms"] = nullptr;  // wait as long as it takes
  if (lease_ms) o["lease_ms"] = *lease_ms;
  return json::serialize(o);
}

std::string release_body(const std::string& lock_id, const std::string& owner) {
  json::object o;
  o["lock_id"] = lock_id;
  o["owner"] = owner;
  return json::serialize(o);
}

std::string clip(std::string s) {
  if (s.size() > 300) s = s.substr(0, 300) + "...";
  return s;
}

// The lock_id of a granted acquire, or an exception saying what came back instead.
std::string granted_lock_id(const Reply& r, const std::string& path) {
  const json::object* o = r.json.if_object();
  if (r.status == 200 && o) {
    const json::value* status = o->if_contains("status");
    const json::value* lock = o->if_contains("lock");
    if (status && status->is_string() && status->as_string() == "granted" && lock && lock->is_object()) {
      const json::value* id = lock->as_object().if_contains("lock_id");
      if (id && id->is_string()) return std::string(id->as_string());
      if (id && id->is_int64()) return std::to_string(id->as_int64());
    }
  }
  throw std::runtime_error("acquire of '" + path + "' answered " + std::to_string(r.status) + " " + clip(r.body));
}

void expect_released(const Reply& r, const std::string& lock_id) {
  if (r.status == 200) return;
  throw std::runtime_error("release of " + lock_id + " answered " + std::to_string(r.status) + " " + clip(r.body));
}

// ---------------------------------------------------------------------------
// CPU time of a process, to tell a client-bound figure from a server-bound one.
double cpu_seconds_of(int pid) {
  if (pid <= 0) return -1;
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(f, line)) return -1;
  // Fields after the ")" that ends the command name: state is field 3, utime 14, stime 15.
  auto close = line.rfind(')');
  if (close == std::string::npos) return -1;
  std::istringstream rest(line.substr(close + 2));
  std::string field;
  unsigned long long utime = 0, stime = 0;
  for (int n = 3; rest >> field; ++n) {
    if (n == 14) utime = std::stoull(field);
    if (n == 15) {
      stime = std::stoull(field);
      break;
    }
  }
  return double(utime + stime) / double(::sysconf(_SC_CLK_TCK));
}

// CPU time all processes on the machine have used (busy, not idle or iowait).
double machine_busy_seconds() {
  std::ifstream f("/proc/stat");
  std::string cpu;
  unsigned long long user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0;
  if (!(f >> cpu >> user >> nice >> system >> idle >> iowait >> irq >> softirq >> steal)) return -1;
  return double(user + nice + system + irq + softirq + steal) / double(::sysconf(_SC_CLK_TCK));
}

double own_cpu_seconds() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  auto tv = [](timeval t) { return double(t.tv_sec) + double(t.tv_usec) / 1e6; };
  return tv(ru.ru_utime) + tv(ru.ru_stime);
}

// VmRSS (and the peak, VmHWM) of a process in MB, from /proc/<pid>/status.
struct Rss {
  double rss_mb = -1;
  double hwm_mb = -1;
};
Rss rss_of(int pid) {
  Rss out;
  std::ifstream f("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(f, line)) {
    auto kb = [&] { return std::stod(line.substr(line.find(':') + 1)) / 1024.0; };
    if (line.rfind("VmRSS:", 0) == 0) out.rss_mb = kb();
    if (line.rfind("VmHWM:", 0) == 0) out.hwm_mb = kb();
  }
  return out;
}

// ---------------------------------------------------------------------------
// trivial_server started by the bench itself; killed and reaped on scope exit.
class ChildServer {
 public:
  ChildServer(const std::string& exe, const std::string& unix_path) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error(std::string("pipe: ") + std::strerror(errno));
    pid_ = ::fork();
    if (pid_ < 0) throw std::runtime_error(std::string("fork: ") + std::strerror(errno));
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);  // no orphaned server if the bench is killed
      ::dup2(fds[1], STDOUT_FILENO);
      std::vector<const char*> argv{exe.c_str()};
      if (unix_path.empty()) {
        argv.insert(argv.end(), {"--port", "0"});
      } else {
        argv.insert(argv.end(), {"--unix-socket", unix_path.c_str()});
      }
      argv.push_back(nullptr);
      ::execv(exe.c_str(), const_cast<char* const*>(argv.data()));
      std::fprintf(stderr, "broker_bench: cannot run %s: %s\n", exe.c_str(), std::strerror(errno));
      ::_exit(127);
    }
    ::close(fds[1]);
    std::string line = read_line(fds[0], std::chrono::seconds(10));
    ::close(fds[0]);
    const std::string prefix = "listening on ";
    if (line.rfind(prefix, 0) != 0) {
      throw std::runtime_error("trivial server " + exe + " did not say where it listens (got '" + line + "')");
    }
    std::string where = line.substr(prefix.size());
    if (where.rfind("unix:", 0) == 0) {
      endpoint_.unix_path = where.substr(5);
    } else {
      endpoint_.port = std::stoi(where.substr(where.rfind(':') + 1));
    }
  }
  ~ChildServer() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGTERM);
    int status = 0;
    ::waitpid(pid_, &status, 0);
  }
  ChildServer(const ChildServer&) = delete;
  ChildServer& operator=(const ChildServer&) = delete;

  const Endpoint& endpoint() const { return endpoint_; }
  int pid() const { return pid_; }

 private:
  static std::string read_line(int fd, std::chrono::milliseconds budget) {
    std::string line;
    auto deadline = Clock::now() + budget;
    while (Clock::now() < deadline) {
      pollfd p{fd, POLLIN, 0};
      int left = int(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
      if (::poll(&p, 1, std::max(left, 1)) <= 0) continue;
      char c;
      ssize_t n = ::read(fd, &c, 1);
      if (n <= 0) break;
      if (c == '\n') return line;
      line += c;
    }
    return line;
  }

  int pid_ = -1;
  Endpoint endpoint_;
};

// ---------------------------------------------------------------------------
// Figures of one scenario.
// The p-th percentile (nearest rank) of v; sorts v.
double percentile(std::vector<double>& v, double p) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  std::size_t rank = std::size_t(std::ceil(p / 100.0 * double(v.size())));
  return v[std::min(v.size() - 1, rank == 0 ? 0 : rank - 1)];
}

struct RunResult {
  std::uint64_t pairs = 0;
  std::uint64_t requests = 0;
  std::uint64_t errors = 0;
  std::uint64_t reconnects = 0;
  double seconds = 0;
  std::vector<double> pair_ms;
  std::vector<double> acquire_ms;  // the acquire of each pair alone
  bool aborted = false;
  std::string first_error;
  double bench_cpu = 0;   // seconds of CPU used by this process during the run
  double server_cpu = -1; // seconds of CPU used by the server, when its pid is known
  double machine_cpu = -1; // seconds of CPU used by everything on the machine

  double pairs_per_s() const { return seconds > 0 ? double(pairs) / seconds : 0; }
  double requests_per_s() const { return seconds > 0 ? double(requests) / seconds : 0; }
};

// Runs `client(i, connection, result)` for clients 0..n-1 on fresh connections
// to `ep`, all on one io_context. Connections are made before the clock starts.
// At `hard_deadline` whatever is still running is cut off and the run marked aborted.
using ClientFn = std::function<asio::awaitable<void>(int, HttpConnection&, RunResult&)>;

// Client i talks to eps[i % eps.size()] (several brokers serving one lock space).
RunResult run_clients(const std::vector<Endpoint>& eps, int n, Clock::duration hard_limit, int server_pid,
                      const ClientFn& client) {
  RunResult result;
  asio::io_context ioc{1};
  std::vector<std::unique_ptr<HttpConnection>> conns;
  for (int i = 0; i < n; ++i) conns.push_back(std::make_unique<HttpConnection>(ioc, eps[std::size_t(i) % eps.size()]));
  const Endpoint& ep = eps.front();

  // Keeps the first failure in words; system errors without Boost's source location.
  auto note_error = [&result](std::exception_ptr e) {
    if (!e) return;
    ++result.errors;
    if (!result.first_error.empty()) return;
    try {
      std::rethrow_exception(e);
    } catch (const boost::system::system_error& ex) {
      result.first_error = ex.code().message();
    } catch (const std::exception& ex) {
      result.first_error = ex.what();
    }
  };

  int connected = 0;
  for (auto& c : conns) {
    asio::co_spawn(ioc, c->connect(), [&](std::exception_ptr e) {
      if (!e) ++connected;
      note_error(e);
    });
  }
  ioc.run_for(std::chrono::seconds(10));
  if (connected != n) {
    if (result.first_error.empty()) result.first_error = "no connection within 10 s";
    throw std::runtime_error("could not connect " + std::to_string(n) + " clients to " + ep.describe() + " (" +
                             result.first_error + "); is the server running there?");
  }

  ioc.restart();
  const double cpu0 = own_cpu_seconds();
  const double server0 = cpu_seconds_of(server_pid);
  const double machine0 = machine_busy_seconds();
  const auto start = Clock::now();
  auto last_done = start;
  for (int i = 0; i < n; ++i) {
    asio::co_spawn(ioc, client(i, *conns[i], result), [&](std::exception_ptr e) {
      last_done = Clock::now();
      note_error(e);
    });
  }
  ioc.run_until(start + hard_limit);
  if (!ioc.stopped()) {
    // Whatever is still waiting now would wait forever; its cancellation is not news.
    result.aborted = true;
    if (result.first_error.empty()) {
      result.first_error = "no answer within " +
                           std::to_string(std::chrono::duration_cast<std::chrono::seconds>(hard_limit).count()) +
                           " s, so the run was cut off";
    }
    for (auto& c : conns) c->close();
    ioc.restart();
    ioc.run();
    last_done = Clock::now();
  }
  result.seconds = std::chrono::duration<double>(last_done - start).count();
  result.bench_cpu = own_cpu_seconds() - cpu0;
  if (server0 >= 0) result.server_cpu = cpu_seconds_of(server_pid) - server0;
  if (machine0 >= 0) result.machine_cpu = machine_busy_seconds() - machine0;
  for (auto& c : conns) result.reconnects += c->reconnects();
  return result;
}

// ---------------------------------------------------------------------------
struct Options {
  Endpoint broker;
  Endpoint broker2;  // port 0: none (a second broker on the same lock space)
  Endpoint baseline;  // port 0 and no unix path: none given
  std::string trivial_server;
  int clients = 32;
  double seconds = 5;
  int rounds = 3;  // uncontended and baseline alternate this many times within --seconds
  double grace = 20;  // beyond --seconds before a run is cut off
  int broker_pid = 0;
  int baseline_pid = 0;
  long hold = 0;
  int hold_clients = 4;
  double hold_seconds = 300;
  std::int64_t lease_ms = 600000;
  std::vector<std::string> only;

  bool wants(std::string_view s) const {
    return only.empty() || std::find(only.begin(), only.end(), s) != only.end();
  }
  Clock::duration run_length() const { return seconds_to_duration(seconds); }
  // Every broker the clients spread over.
  std::vector<Endpoint> brokers() const {
    if (broker2.port == 0) return {broker};
    return {broker, broker2};
  }
  Clock::duration run_limit() const { return seconds_to_duration(seconds + grace); }
};

bool failed = false;

void print_run(const RunResult& r, const char* server_name) {
  std::printf("  pairs            %llu in %.2f s = %.0f pairs/s\n", (unsigned long long)r.pairs, r.seconds,
              r.pairs_per_s());
  std::printf("  HTTP requests    %llu = %.0f req/s\n", (unsigned long long)r.requests, r.requests_per_s());
  std::vector<double> lat = r.pair_ms;
  if (!lat.empty()) {
    std::printf("  pair latency     p50 %.3f ms  p99 %.3f ms  max %.3f ms\n", percentile(lat, 50),
                percentile(lat, 99), percentile(lat, 100));
  }
  std::vector<double> acq = r.acquire_ms;
  if (!acq.empty()) {
    std::printf("  acquire latency  p50 %.3f ms  p99 %.3f ms  max %.3f ms\n", percentile(acq, 50),
                percentile(acq, 99), percentile(acq, 100));
  }
  if (r.seconds > 0) {
    std::printf("  cpu              bench %.0f%% of a core", 100 * r.bench_cpu / r.seconds);
    if (r.server_cpu >= 0) std::printf(", %s %.0f%%", server_name, 100 * r.server_cpu / r.seconds);
    if (r.server_cpu >= 0 && r.machine_cpu >= 0) {
      // Load from elsewhere on a shared machine makes every figure above worse.
      double others = std::max(0.0, r.machine_cpu - r.bench_cpu - r.server_cpu);
      std::printf(", everything else %.0f%% (of %ld cores)", 100 * others / r.seconds, ::sysconf(_SC_NPROCESSORS_ONLN));
    }
    std::printf("\n");
  }
  if (r.reconnects) std::printf("  reconnects       %llu (server closed keep-alive connections)\n",
                                (unsigned long long)r.reconnects);
  if (r.errors || r.aborted) {
    failed = true;
    std::printf("  ERRORS           %llu client(s) failed; first: %s\n", (unsigned long long)r.errors,
                r.first_error.c_str());
  }
}

// Client i locks and unlocks its own key until the deadline or the shared budget
// of pairs runs out. Against the trivial server (check = false) it sends the same
// requests but cannot check the answers.
struct PairLoop {
  Clock::time_point deadline;
  std::int64_t budget = INT64_MAX;  // pairs still to start, shared by all clients
  bool check = true;
};

asio::awaitable<void> pair_client(int i, HttpConnection& conn, RunResult& out, PairLoop& loop) {
  const std::string path = "bench/key-" + std::to_string(i);
  const std::string owner = "bench-" + std::to_string(i);
  const std::string fake_id = "00000000-0000-4000-8000-" + std::to_string(100000000000 + i);
  const std::string acquire = acquire_body(path, owner);
  while (loop.budget > 0 && Clock::now() < loop.deadline) {
    --loop.budget;
    auto t0 = Clock::now();
    Reply acquired = co_await conn.post("/v1/locks/acquire", acquire);
    out.acquire_ms.push_back(ms_between(t0, Clock::now()));
    ++out.requests;
    std::string id = loop.check ? granted_lock_id(acquired, path) : fake_id;
    Reply released = co_await conn.post("/v1/locks/release", release_body(id, owner));
    ++out.requests;
    if (loop.check) expect_released(released, id);
    out.pair_ms.push_back(ms_between(t0, Clock::now()));
    ++out.pairs;
  }
}

// ---------------------------------------------------------------------------
// The contended scenario's shared view of the one hot key. All clients run on
// one thread, so plain fields are enough and the timestamps share one clock.
struct HotKey {
  Clock::time_point deadline;
  bool held = false;
  std::optional<Clock::time_point> release_sent;  // by the last holder, not yet followed by a grant
  std::vector<double> handoff_ms;
  std::vector<double> cross_ms;  // hand-offs from a holder on one broker to a client of another
  int brokers = 1;
  int last_side = -1;            // the broker of the last holder (client i uses broker i % brokers)
  std::vector<double> wait_ms;  // acquire sent -> granted
  std::uint64_t overlaps = 0;   // a grant seen while another client still held the key
};

// Client i takes `hot`'s key: its acquire, then the grant noted (the hand-off from the
// last release to it, and whether another client still held the key). The lock's id.
asio::awaitable<std::string> take(int i, HttpConnection& conn, RunResult& out, HotKey& hot, const std::string& path,
                                  const std::string& acquire) {
  auto t0 = Clock::now();
  Reply acquired = co_await conn.post("/v1/locks/acquire", acquire);
  auto granted_at = Clock::now();
  ++out.requests;
  std::string id = granted_lock_id(acquired, path);
  if (hot.held) ++hot.overlaps;
  hot.held = true;
  if (hot.release_sent) {
    hot.handoff_ms.push_back(ms_between(*hot.release_sent, granted_at));
    if (hot.last_side != i % hot.brokers) hot.cross_ms.push_back(hot.handoff_ms.back());
  }
  hot.last_side = i % hot.brokers;
  hot.release_sent.reset();
  hot.wait_ms.push_back(ms_between(t0, granted_at));
  co_return id;
}

asio::awaitable<void> hot_client(int i, HttpConnection& conn, RunResult& out, HotKey& hot) {
  const std::string path = "bench/hot";
  const std::string owner = "bench-" + std::to_string(i);
  const std::string acquire = acquire_body(path, owner);
  while (Clock::now() < hot.deadline) {
    auto t0 = Clock::now();
    std::string id = co_await take(i, conn, out, hot, path, acquire);
    hot.held = false;
    hot.release_sent = Clock::now();
    Reply released = co_await conn.post("/v1/locks/release", release_body(id, owner));
    ++out.requests;
    expect_released(released, id);
    out.pair_ms.push_back(ms_between(t0, Clock::now()));
    ++out.pairs;
  }
}

// ---------------------------------------------------------------------------
// The hand-off scenario: two clients (one on each broker, with --port2) take one key
// in turn (a HotKey). The holder releases only once its broker shows the other's
// acquire queued, so each hand-off is a release with its successor already waiting:
// the time from sending the release to the other client's grant, with nothing else
// under way.

// How many wait in the queue of a /v1/locks/status answer (-1: not an answer).
long queued_in(const Reply& r) {
  if (r.status != 200 || !r.json.is_object()) return -1;
  const json::value* q = r.json.as_object().if_contains("queue");
  return q && q->is_array() ? static_cast<long>(q->as_array().size()) : -1;
}

asio::awaitable<void> pingpong_client(int i, HttpConnection& conn, RunResult& out, HotKey& hot) {
  const std::string path = "bench/pingpong";
  const std::string owner = "bench-pp-" + std::to_string(i);
  const std::string acquire = acquire_body(path, owner);
  asio::steady_timer pause(co_await asio::this_coro::executor);
  while (Clock::now() < hot.deadline) {
    auto t0 = Clock::now();
    std::string id = co_await take(i, conn, out, hot, path, acquire);
    bool queued = false;
    while (Clock::now() < hot.deadline) {
      Reply st = co_await conn.get("/v1/locks/status?path=" + path);
      ++out.requests;
      if ((queued = queued_in(st) > 0)) break;
      pause.expires_after(std::chrono::microseconds(200));
      co_await pause.async_wait(asio::use_awaitable);
    }
    hot.held = false;
    if (queued) hot.release_sent = Clock::now();  // (the last one, at the deadline, is no hand-off)
    Reply released = co_await conn.post("/v1/locks/release", release_body(id, owner));
    ++out.requests;
    expect_released(released, id);
    out.pair_ms.push_back(ms_between(t0, Clock::now()));
    ++out.pairs;
  }
}

// One run of `clients` clients of `client` on one key for --seconds, printed; what they
// saw of the key.
using HotClientFn = asio::awaitable<void> (*)(int, HttpConnection&, RunResult&, HotKey&);

HotKey run_hot(const Options& opt, int clients, HotClientFn client) {
  HotKey hot;
  hot.deadline = Clock::now() + std::chrono::hours(1);
  hot.brokers = int(opt.brokers().size());
  RunResult r = run_clients(opt.brokers(), clients, opt.run_limit(), opt.broker_pid,
                            [&](int i, HttpConnection& c, RunResult& res) {
                              if (i == 0) hot.deadline = Clock::now() + opt.run_length();
                              return client(i, c, res, hot);
                            });
  print_run(r, "broker");
  return hot;
}

// Grants that came while another client still held the key fail the bench.
void check_exclusion(const HotKey& hot, const char* key) {
  if (!hot.overlaps) return;
  failed = true;
  std::printf("  EXCLUSION BROKEN %llu grants arrived while another client still held %s\n",
              (unsigned long long)hot.overlaps, key);
}

// ---------------------------------------------------------------------------
// The memory scenario: N distinct keys held at once by a few clients.
struct HoldSet {
  long count = 0;
  long next = 0;
  Clock::time_point deadline;
  std::vector<std::string> ids;  // "" where the acquire did not happen
  std::vector<int> owners;       // which hold client took key j
  std::int64_t lease_ms = 0;
};

asio::awaitable<void> hold_client(int c, HttpConnection& conn, RunResult& out, HoldSet& set) {
  const std::string owner = "bench-hold-" + std::to_string(c);
  while (set.next < set.count && Clock::now() < set.deadline) {
    long j = set.next++;
    const std::string path = "bench/hold-" + std::to_string(j);
    Reply r = co_await conn.post("/v1/locks/acquire", acquire_body(path, owner, set.lease_ms));
    ++out.requests;
    set.ids[j] = granted_lock_id(r, path);
    set.owners[j] = c;
    ++out.pairs;
  }
}

asio::awaitable<void> unhold_client(int, HttpConnection& conn, RunResult& out, HoldSet& set) {
  while (set.next < set.count && Clock::now() < set.deadline) {
    long j = set.next++;
    if (set.ids[j].empty()) continue;
    const std::string owner = "bench-hold-" + std::to_string(set.owners[j]);
    Reply r = co_await conn.post("/v1/locks/release", release_body(set.ids[j], owner));
    ++out.requests;
    expect_released(r, set.ids[j]);
    set.ids[j].clear();
    ++out.pairs;
  }
}

// One timed (or counted) run of pair_client on every client.
RunResult pair_run(const Options& opt, const Endpoint& ep, int pid, double seconds, std::int64_t budget,
                   bool check) {
  PairLoop loop;
  loop.budget = budget;
  loop.check = check;
  const auto length = seconds_to_duration(seconds);
  return run_clients(&ep == &opt.broker ? opt.brokers() : std::vector<Endpoint>{ep}, opt.clients,
                     length + seconds_to_duration(opt.grace), pid,
                     [&](int i, HttpConnection& c, RunResult& r) {
                       if (i == 0) loop.deadline = Clock::now() + length;
                       return pair_client(i, c, r, loop);
                     });
}

void merge_into(RunResult& total, const RunResult& r) {
  total.pairs += r.pairs;
  total.requests += r.requests;
  total.errors += r.errors;
  total.reconnects += r.reconnects;
  total.seconds += r.seconds;
  total.pair_ms.insert(total.pair_ms.end(), r.pair_ms.begin(), r.pair_ms.end());
  total.acquire_ms.insert(total.acquire_ms.end(), r.acquire_ms.begin(), r.acquire_ms.end());
  total.aborted = total.aborted || r.aborted;
  if (total.first_error.empty()) total.first_error = r.first_error;
  total.bench_cpu += r.bench_cpu;
  if (r.server_cpu >= 0) total.server_cpu = std::max(0.0, total.server_cpu) + r.server_cpu;
  if (r.machine_cpu >= 0) total.machine_cpu = std::max(0.0, total.machine_cpu) + r.machine_cpu;
}

// ---------------------------------------------------------------------------
int usage(FILE* to) {
  std::fprintf(to,
               "usage: broker_bench (--port N | --unix-socket PATH) [options]\n"
               "  --host ADDR             broker address, loopback only (127.0.0.1)\n"
               "  --port2 N               a second broker on the same lock space (etcd store):\n"
               "                          odd clients use it; contended reports cross-broker hand-offs\n"
               "  --clients N             concurrent keep-alive clients (32)\n"
               "  --seconds S             length of each timed scenario (5)\n"
               "  --rounds N              uncontended and baseline alternate N times within it (3)\n"
               "  --broker-pid PID        read the broker's CPU use and VmRSS from /proc\n"
               "  --baseline-port N       a running trivial_server to compare with\n"
               "  --baseline-unix-socket PATH\n"
               "  --baseline-pid PID      its pid, for its CPU use\n"
               "  --trivial-server PATH   start trivial_server from PATH instead\n"
               "  --hold N                memory scenario: hold N distinct keys (0 = skip)\n"
               "  --hold-clients N        clients taking the held keys (4)\n"
               "  --hold-seconds S        give up taking/releasing held keys after S (300)\n"
               "  --lease-ms MS           lease of the held keys (600000)\n"
               "  --only LIST             comma list of uncontended,baseline,contended,handoff,memory\n"
               "  --grace S               a run still going S seconds after its end is cut off (20)\n");
  return 2;
}

bool parse_number(const char* s, double& out) {
  char* end = nullptr;
  errno = 0;
  out = std::strtod(s, &end);
  return errno == 0 && end != s && *end == '\0';
}

std::optional<Options> parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    if (a == "--help" || a == "-h") {
      usage(stdout);
      std::exit(0);
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "broker_bench: %s needs a value (or is unknown)\n", argv[i]);
      return std::nullopt;
    }
    const char* v = argv[++i];
    double d = 0;
    bool numeric = parse_number(v, d);
    auto need_number = [&](double lo, double hi) {
      if (numeric && d >= lo && d <= hi) return true;
      std::fprintf(stderr, "broker_bench: %s wants a number in %g..%g, got '%s'\n", a.data(), lo, hi, v);
      return false;
    };
    if (a == "--host") {
      o.broker.host = v == std::string_view("localhost") ? "127.0.0.1" : v;
      beast::error_code ec;
      auto addr = asio::ip::make_address(o.broker.host, ec);
      if (ec || !addr.is_loopback()) {
        std::fprintf(stderr, "broker_bench: --host must be a loopback address, got '%s'\n", v);
        return std::nullopt;
      }
      o.baseline.host = o.broker.host;
    } else if (a == "--port") {
      if (!need_number(1, 65535)) return std::nullopt;
      o.broker.port = int(d);
    } else if (a == "--port2") {
      if (!need_number(1, 65535)) return std::nullopt;
      o.broker2.port = int(d);
    } else if (a == "--unix-socket") {
      o.broker.unix_path = v;
    } else if (a == "--clients") {
      if (!need_number(1, 10000)) return std::nullopt;
      o.clients = int(d);
    } else if (a == "--seconds") {
      if (!need_number(0.1, 3600)) return std::nullopt;
      o.seconds = d;
    } else if (a == "--rounds") {
      if (!need_number(1, 100)) return std::nullopt;
      o.rounds = int(d);
    } else if (a == "--grace") {
      if (!need_number(1, 3600)) return std::nullopt;
      o.grace = d;
    } else if (a == "--broker-pid") {
      if (!need_number(1, 1e9)) return std::nullopt;
      o.broker_pid = int(d);
    } else if (a == "--baseline-port") {
      if (!need_number(1, 65535)) return std::nullopt;
      o.baseline.port = int(d);
    } else if (a == "--baseline-unix-socket") {
      o.baseline.unix_path = v;
    } else if (a == "--baseline-pid") {
      if (!need_number(1, 1e9)) return std::nullopt;
      o.baseline_pid = int(d);
    } else if (a == "--trivial-server") {
      o.trivial_server = v;
    } else if (a == "--hold") {
      if (!need_number(0, 1e8)) return std::nullopt;
      o.hold = long(d);
    } else if (a == "--hold-clients") {
      if (!need_number(1, 1000)) return std::nullopt;
      o.hold_clients = int(d);
    } else if (a == "--hold-seconds") {
      if (!need_number(1, 36000)) return std::nullopt;
      o.hold_seconds = d;
    } else if (a == "--lease-ms") {
      if (!need_number(1, 1e12)) return std::nullopt;
      o.lease_ms = std::int64_t(d);
    } else if (a == "--only") {
      std::string list = v;
      for (std::size_t p = 0; p <= list.size();) {
        auto q = list.find(',', p);
        if (q == std::string::npos) q = list.size();
        std::string name = list.substr(p, q - p);
        if (name != "uncontended" && name != "baseline" && name != "contended" && name != "handoff" &&
            name != "memory") {
          std::fprintf(stderr,
                       "broker_bench: --only knows uncontended, baseline, contended, handoff, memory; not '%s'\n",
                       name.c_str());
          return std::nullopt;
        }
        o.only.push_back(name);
        p = q + 1;
      }
    } else {
      std::fprintf(stderr, "broker_bench: unknown option %s\n", argv[i - 1]);
      return std::nullopt;
    }
  }
  bool needs_broker = o.wants("uncontended") || o.wants("contended") || o.wants("handoff") || (o.wants("memory") && o.hold > 0);
  if (needs_broker && o.broker.port == 0 && !o.broker.is_unix()) {
    std::fprintf(stderr, "broker_bench: say where the broker listens: --port N or --unix-socket PATH\n");
    return std::nullopt;
  }
  return o;
}

const char* verdict(bool ok) { return ok ? "met" : "NOT met"; }

}  // namespace

int main(int argc, char** argv) {
  std::optional<Options> parsed = parse(argc, argv);
  if (!parsed) return usage(stderr);
  Options& opt = *parsed;
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  std::signal(SIGPIPE, SIG_IGN);

  std::printf("broker_bench: broker %s, %d clients, %.1f s per timed run\n",
              opt.broker.port || opt.broker.is_unix() ? opt.broker.describe().c_str() : "(none)", opt.clients,
              opt.seconds);
  if (opt.broker_pid) {
    Rss idle = rss_of(opt.broker_pid);
    std::printf("broker pid %d, VmRSS at start %.1f MB\n", opt.broker_pid, idle.rss_mb);
  }

  try {
    // The ceiling: a trivial server given to us, or one we start.
    std::optional<ChildServer> child;
    if (opt.wants("baseline") && opt.baseline.port == 0 && !opt.baseline.is_unix() && !opt.trivial_server.empty()) {
      std::string unix_path;
      if (opt.broker.is_unix()) unix_path = "/tmp/broker_bench_trivial." + std::to_string(::getpid()) + ".sock";
      child.emplace(opt.trivial_server, unix_path);
      opt.baseline = child->endpoint();
      opt.baseline_pid = child->pid();
    }
    const bool have_baseline = opt.baseline.port != 0 || opt.baseline.is_unix();

    // Uncontended and baseline alternate in short rounds, so that load from
    // elsewhere on a shared machine falls on both sides of the ratio alike.
    const bool run_unc = opt.wants("uncontended");
    const bool run_base = opt.wants("baseline") && have_baseline;
    if (opt.wants("baseline") && !have_baseline) {
      std::printf("\n(baseline skipped: give --baseline-port, --baseline-unix-socket or --trivial-server)\n");
    }
    if (run_unc || run_base) {
      if (run_unc) {
        std::printf("\n== uncontended: %d clients, each write-locks and releases its own key (bench/key-<i>)\n",
                    opt.clients);
      }
      if (run_unc && run_base) {
        std::printf("   baseline: the same clients send the same POSTs, as many as the broker answered,\n"
                    "   to trivial_server %s; %d round(s) of each, alternating\n",
                    opt.baseline.describe().c_str(), opt.rounds);
      } else if (run_base) {
        std::printf("\n== baseline: %d clients post acquire/release pairs to trivial_server %s, %d round(s)\n",
                    opt.clients, opt.baseline.describe().c_str(), opt.rounds);
      }
      const double round_s = opt.seconds / opt.rounds;
      RunResult unc, base;
      for (int round = 1; round <= opt.rounds; ++round) {
        std::optional<RunResult> u, b;
        if (run_unc) {
          u = pair_run(opt, opt.broker, opt.broker_pid, round_s, INT64_MAX, true);
          merge_into(unc, *u);
        }
        if (run_base && (!u || u->pairs > 0)) {
          // With the broker's count to match, allow the ceiling 3x the time before giving up.
          b = u ? pair_run(opt, opt.baseline, opt.baseline_pid, 3 * round_s, std::int64_t(u->pairs), false)
                : pair_run(opt, opt.baseline, opt.baseline_pid, round_s, INT64_MAX, false);
          merge_into(base, *b);
        }
        std::printf("  round %d:", round);
        if (u) std::printf(" broker %.0f req/s", u->requests_per_s());
        if (b) std::printf("%s trivial %.0f req/s", u ? "," : "", b->requests_per_s());
        if (u && b && b->requests_per_s() > 0) std::printf(" = %.1f%%", 100 * u->requests_per_s() / b->requests_per_s());
        std::printf("\n");
        if ((u && (u->errors || u->aborted)) || (b && (b->errors || b->aborted))) break;
      }
      if (run_unc) {
        std::printf("  -- broker\n");
        print_run(unc, "broker");
      }
      if (run_base) {
        std::printf("  -- trivial_server\n");
        print_run(base, "trivial_server");
      }
      if (run_unc && run_base && base.requests_per_s() > 0) {
        double pct = 100 * unc.requests_per_s() / base.requests_per_s();
        std::printf("  broker/trivial   %.0f / %.0f req/s = %.1f%%  (target >= 60%%: %s)\n", unc.requests_per_s(),
                    base.requests_per_s(), pct, verdict(pct >= 60));
      }
    }

    if (opt.wants("contended")) {
      std::printf("\n== contended: %d clients write-lock one key, bench/hot\n", opt.clients);
      HotKey hot = run_hot(opt, opt.clients, hot_client);
      if (!hot.handoff_ms.empty()) {
        double p50 = percentile(hot.handoff_ms, 50);
        std::printf("  hand-off         p50 %.3f ms  p99 %.3f ms  max %.3f ms  (%zu hand-offs; target p50 < 0.5 ms: %s)\n",
                    p50, percentile(hot.handoff_ms, 99), percentile(hot.handoff_ms, 100),
                    hot.handoff_ms.size(), verdict(p50 < 0.5));
        std::printf("  acquire wait     p50 %.3f ms  p99 %.3f ms\n", percentile(hot.wait_ms, 50),
                    percentile(hot.wait_ms, 99));
        if (!hot.cross_ms.empty())
          std::printf("  cross-broker     hand-off p50 %.3f ms  p99 %.3f ms  (%zu from a holder on the other broker)\n",
                      percentile(hot.cross_ms, 50), percentile(hot.cross_ms, 99), hot.cross_ms.size());
      }
      check_exclusion(hot, "bench/hot");
    }

    if (opt.wants("handoff")) {
      std::printf("\n== hand-off: 2 clients%s take bench/pingpong in turn; each releases once the other "
                  "waits\n", opt.brokers().size() > 1 ? " (one on each broker)" : "");
      HotKey pp = run_hot(opt, 2, pingpong_client);
      if (!pp.handoff_ms.empty()) {
        double p50 = percentile(pp.handoff_ms, 50);
        std::printf("  hand-off         p50 %.3f ms  p99 %.3f ms  max %.3f ms  (%zu hand-offs, %zu of them to a "
                    "client of the other broker)\n",
                    p50, percentile(pp.handoff_ms, 99), percentile(pp.handoff_ms, 100), pp.handoff_ms.size(),
                    pp.cross_ms.size());
      }
      check_exclusion(pp, "bench/pingpong");
    }

    if (opt.wants("memory") && opt.hold > 0) {
      std::printf("\n== memory: %d clients hold %ld distinct keys (lease %lld ms)\n", opt.hold_clients, opt.hold,
                  (long long)opt.lease_ms);
      HoldSet set;
      set.count = opt.hold;
      set.ids.assign(std::size_t(opt.hold), std::string());
      set.owners.assign(std::size_t(opt.hold), 0);
      set.lease_ms = opt.lease_ms;
      auto hold_for = seconds_to_duration(opt.hold_seconds);
      Rss before = opt.broker_pid ? rss_of(opt.broker_pid) : Rss{};
      set.deadline = Clock::now() + hold_for;
      RunResult taken = run_clients({opt.broker}, opt.hold_clients, hold_for + std::chrono::seconds(30),
                                    opt.broker_pid, [&](int c, HttpConnection& conn, RunResult& res) {
                                      if (c == 0) set.deadline = Clock::now() + hold_for;
                                      return hold_client(c, conn, res, set);
                                    });
      long held = long(std::count_if(set.ids.begin(), set.ids.end(), [](auto& s) { return !s.empty(); }));
      std::printf("  acquired         %ld keys in %.2f s = %.0f acquires/s\n", held, taken.seconds,
                  taken.seconds > 0 ? double(held) / taken.seconds : 0);
      if (taken.errors || taken.aborted) {
        failed = true;
        std::printf("  ERRORS           %s\n", taken.first_error.c_str());
      }
      if (opt.broker_pid) {
        Rss after = rss_of(opt.broker_pid);
        std::printf("  broker VmRSS     %.1f MB before, %.1f MB with %ld locks held (peak %.1f MB)", before.rss_mb,
                    after.rss_mb, held, after.hwm_mb);
        if (held == opt.hold && opt.hold == 100000) std::printf("  (target < 100 MB: %s)", verdict(after.rss_mb < 100));
        std::printf("\n");
      } else {
        std::printf("  broker VmRSS     unknown: give --broker-pid\n");
      }

      // Release them all, so the broker is left as it was found.
      set.next = 0;
      RunResult freed = run_clients({opt.broker}, opt.hold_clients, hold_for + std::chrono::seconds(30),
                                    opt.broker_pid, [&](int c, HttpConnection& conn, RunResult& res) {
                                      if (c == 0) set.deadline = Clock::now() + hold_for;
                                      return unhold_client(c, conn, res, set);
                                    });
      std::printf("  released         %llu keys in %.2f s = %.0f releases/s\n", (unsigned long long)freed.pairs,
                  freed.seconds, freed.seconds > 0 ? double(freed.pairs) / freed.seconds : 0);
      if (freed.errors || freed.aborted) {
        failed = true;
        std::printf("  ERRORS           %s\n", freed.first_error.c_str());
      }
      if (opt.broker_pid) std::printf("  broker VmRSS     %.1f MB after the release\n", rss_of(opt.broker_pid).rss_mb);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "broker_bench: %s\n", e.what());
    return 1;
  }
  if (failed) {
    std::printf("\nbroker_bench: some runs had errors (see above); their figures are not trustworthy\n");
    return 1;
  }
  return 0;
}
