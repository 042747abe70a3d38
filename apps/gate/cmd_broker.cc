// gate broker: the lock authority.
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <iostream>

#include "broker/broker_service.h"
#include "broker/etcd_service.h"
#include "broker/http_server.h"
#include "cli.h"
#include "commands.h"
#include "core/limits.h"
#include "core/log.h"
#include "gate/version.h"
#include "core/token.h"
#include "etcd/etcd_client.h"
#include "lock/lock_table.h"
#include "store/lock_store.h"

namespace gate::cmd {

namespace {

bool is_loopback(const std::string& host) {
  return host == "127.0.0.1" || host == "::1" || host == "localhost" || host.rfind("127.", 0) == 0;
}

// One broker per state directory: a second one would fork the lock state.
// Returns the descriptor holding the lock (kept open for the broker's life).
Result<int> lock_state_dir(const std::string& dir) {
  const std::string path = dir + "/broker.lock";
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) return Status::failure("cannot open " + path + ": " + std::strerror(errno));
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    ::close(fd);
    return Status::failure("another broker is using the state directory " + dir +
                           " (stop it, or choose another --state-dir)");
  }
  return fd;
}


// Listens on TCP (and a Unix socket when asked), tells --ready-fd, and runs the loop
// until SIGINT/SIGTERM: then `on_signal` (waiters answered), and the answers in flight
// are written. 0, or the exit code of a failure (said).
int serve(const po::variables_map& args, boost::asio::io_context& ioc, RequestHandler& handler,
          std::function<void()> on_signal, const std::string& host, unsigned socket_mode,
          const std::string& what) {
  const std::string me = "gate broker";
  ServerLimits limits;
  limits.max_body_bytes = args["max-body-bytes"].as<std::size_t>();
  limits.request_timeout = std::chrono::milliseconds(args["request-timeout-ms"].as<std::int64_t>());
  limits.idle_timeout = std::chrono::milliseconds(args["idle-timeout-ms"].as<std::int64_t>());
  limits.max_connections = args["max-connections"].as<std::size_t>();
  HttpServer server(ioc, handler, limits);

  if (Status s = server.listen_tcp(host, args["port"].as<std::uint16_t>()); !s.ok())
    return cli::fail(me, s.message());
  const std::string socket_path = args["unix-socket"].as<std::string>();
  if (!socket_path.empty()) {
    Status s = server.listen_unix(socket_path, socket_mode, args["socket-group"].as<std::string>());
    if (!s.ok()) return cli::fail(me, s.message());
  }
  if (!is_loopback(host))
    log(LogLevel::Warn, "broker", "listening on non-loopback address ", host,
        ": anyone who can reach it can take and release locks");
  log(LogLevel::Info, "broker", "gate ", kVersion, " listening on ", host, ":", server.tcp_port(),
      socket_path.empty() ? "" : " and unix:" + socket_path, ", ", what);

  // Signals are handled before anyone is told the broker is ready.
  boost::asio::signal_set signals(ioc, SIGINT, SIGTERM);
  signals.async_wait([&](boost::system::error_code ec, int sig) {
    if (ec) return;
    log(LogLevel::Info, "broker", "signal ", sig, ": answering waiters 503, saving state, exiting");
    on_signal();
    server.drain(std::chrono::seconds(2), [&] { ioc.stop(); });
  });
  if (int fd = args["ready-fd"].as<int>(); fd >= 0) {
    std::string line = std::to_string(server.tcp_port()) + "\n";
    if (::write(fd, line.data(), line.size()) < 0) log(LogLevel::Warn, "broker", "--ready-fd write failed");
    ::close(fd);
  }
  ioc.run();
  return 0;
}

}  // namespace

int broker(int argc, char** argv) {
  po::options_description desc("Options");
  desc.add_options()
      ("state-dir", po::value<std::string>()->default_value(defaults::kStateDir),
       "where locks.db lives (env GATE_STATE_DIR)")
      ("host", po::value<std::string>()->default_value(defaults::kBrokerHost),
       "TCP address to listen on (env GATE_BROKER_HOST)")
      ("port", po::value<std::uint16_t>()->default_value(defaults::kBrokerPort),
       "TCP port; 0 picks a free one (env GATE_BROKER_PORT)")
      ("unix-socket", po::value<std::string>()->default_value(""),
       "also listen on this Unix socket (env GATE_BROKER_SOCKET)")
      ("socket-mode", po::value<std::string>()->default_value("0600"),
       "permissions of the Unix socket (octal)")
      ("socket-group", po::value<std::string>()->default_value(""),
       "group of the Unix socket (then use --socket-mode 0660)")
      ("allow-remote", po::bool_switch(),
       "allow a non-loopback --host; anyone who can reach it can take locks")
      ("lease-ms", po::value<std::int64_t>()->default_value(defaults::kLeaseMs),
       "default lease of a lock (env GATE_LEASE_MS)")
      ("max-hold-ms", po::value<std::int64_t>()->default_value(defaults::kMaxHoldMs),
       "cap on how long a lock is held in one go; 0 = no cap (env GATE_MAX_HOLD_MS)")
      ("restore-grace-ms", po::value<std::int64_t>()->default_value(defaults::kRestoreGraceMs),
       "after a restart, how long queued requests keep their place for their clients")
      ("sync", po::value<std::string>()->default_value("normal"),
       "normal: a broker crash loses nothing; full: a power loss loses nothing either "
       "(an fsync per commit)")
      ("max-body-bytes", po::value<std::size_t>()->default_value(defaults::kMaxBodyBytes),
       "largest request body accepted (413 above)")
      ("request-timeout-ms", po::value<std::int64_t>()->default_value(10'000),
       "time allowed to send a request once its header arrived")
      ("idle-timeout-ms", po::value<std::int64_t>()->default_value(120'000),
       "an idle keep-alive connection (or a header not finished) is closed after this")
      ("max-connections", po::value<std::size_t>()->default_value(10'000),
       "connections beyond this are answered 503")
      ("log-level", po::value<std::string>()->default_value("info"),
       "debug, info, warn or error (env GATE_LOG_LEVEL)")
      ("log-file", po::value<std::string>()->default_value(""), "append the log here instead of stderr")
      ("ready-fd", po::value<int>()->default_value(-1),
       "write the TCP port and a newline to this file descriptor once listening")
      ("store", po::value<std::string>()->default_value("sqlite"),
       "where the lock space lives: sqlite (locks.db in the state dir), or "
       "etcd://HOST:PORT[,HOST:PORT...] to share one lock space with every broker on that etcd "
       "cluster (env GATE_STORE)")
      ("etcd-session-ttl", po::value<std::int64_t>()->default_value(2),
       "with an etcd store: seconds after this broker stops answering etcd (killed, cut off) that its "
       "locks and queued requests end; a restart within it keeps them (at least 2)")
      ("etcd-timeout-ms", po::value<std::int64_t>()->default_value(5'000),
       "with an etcd store: the deadline of one call to etcd (503 to the client after it)")
      ("etcd-lend", po::value<std::string>()->default_value("on"),
       "with an etcd store: on: a key nobody else uses is lent to this broker, which serves it without "
       "etcd until someone else asks; off: every lock is an etcd write (env GATE_ETCD_LEND)");
  int code = 0;
  auto args = cli::parse(argc, argv, desc, "gate broker [options]",
                       "Runs the lock broker: FIFO read/write locks per path over HTTP, kept in "
                       "SQLite so that a restart loses nothing, or in etcd, shared by every broker "
                       "on one etcd cluster (--store etcd://...).",
                       &code);
  if (!args) return code;
  const std::string me = "gate broker";

  LogLevel level;
  if (!parse_log_level((*args)["log-level"].as<std::string>(), &level))
    return cli::fail(me, "--log-level must be debug, info, warn or error"), 2;
  set_log_level(level);
  if (auto f = (*args)["log-file"].as<std::string>(); !f.empty() && !set_log_file(f))
    return cli::fail(me, "cannot open log file " + f);

  const std::string host = (*args)["host"].as<std::string>();
  if (!is_loopback(host) && !(*args)["allow-remote"].as<bool>())
    return cli::fail(me, "--host " + host +
                             " is not a loopback address; anyone who can reach it could take "
                             "and release locks. Add --allow-remote if that is intended."),
           2;
  const std::string sync = (*args)["sync"].as<std::string>();
  if (sync != "normal" && sync != "full") return cli::fail(me, "--sync must be normal or full"), 2;
  unsigned socket_mode = 0;
  try {
    socket_mode = static_cast<unsigned>(std::stoul((*args)["socket-mode"].as<std::string>(), nullptr, 8));
  } catch (const std::exception&) {
    return cli::fail(me, "--socket-mode must be octal, e.g. 0600"), 2;
  }

  auto resolved = resolve_state_dir((*args)["state-dir"].as<std::string>(),
                                    !(*args)["state-dir"].defaulted());
  if (!resolved.ok()) return cli::fail(me, resolved.message());
  const std::string state_dir = resolved->path;
  if (!resolved->note.empty()) log(LogLevel::Warn, "broker", resolved->note);

  auto lock_fd = lock_state_dir(state_dir);
  if (!lock_fd.ok()) return cli::fail(me, lock_fd.message());

  const std::string store_spec = (*args)["store"].as<std::string>();
  if (store_spec.rfind("etcd://", 0) == 0) {
    auto endpoints = etcd::parse_store(store_spec);
    if (!endpoints.ok()) return cli::fail(me, "--store: " + endpoints.message()), 2;
    const std::int64_t ttl = (*args)["etcd-session-ttl"].as<std::int64_t>();
    if (ttl < 2) return cli::fail(me, "--etcd-session-ttl must be at least 2 (etcd's shortest lease)"), 2;
    EtcdServiceOptions o;
    o.endpoints = std::move(*endpoints);
    o.state_dir = state_dir;
    o.default_lease_ms = std::max<std::int64_t>(1, (*args)["lease-ms"].as<std::int64_t>());
    o.max_hold_ms = (*args)["max-hold-ms"].as<std::int64_t>();
    o.restore_grace_ms = (*args)["restore-grace-ms"].as<std::int64_t>();
    o.session_ttl_s = ttl;
    o.call_timeout = std::chrono::milliseconds(std::max<std::int64_t>(100, (*args)["etcd-timeout-ms"].as<std::int64_t>()));
    o.address = host;
    const std::string lend = (*args)["etcd-lend"].as<std::string>();
    if (lend == "on" || lend == "1" || lend == "yes") o.lend = true;
    else if (lend == "off" || lend == "0" || lend == "no") o.lend = false;
    else return cli::fail(me, "--etcd-lend must be on or off, not '" + lend + "'"), 2;
    raise_fd_limit(/*beyond_hard_limit=*/false);
    ::signal(SIGPIPE, SIG_IGN);
    boost::asio::io_context ioc(1);
    EtcdService service(ioc, std::move(o));
    if (Status s = service.start(); !s.ok()) return cli::fail(me, "--store " + store_spec + ": " + s.message());
    if (service.restored_waiting())
      log(LogLevel::Info, "broker", "the last run's ", service.restored_waiting(),
          " queued requests keep their places for ", (*args)["restore-grace-ms"].as<std::int64_t>(),
          " ms for their clients to ask again");
    const int rc = serve(*args, ioc, service, [&] { service.shutdown(); }, host, socket_mode,
                         "etcd store " + store_spec + " as broker " + service.broker_id());
    service.stop();
    log(LogLevel::Info, "broker", "stopped; its etcd session lives ", (*args)["etcd-session-ttl"].as<std::int64_t>(),
        " s more, for a restart to take up");
    ::close(*lock_fd);
    return rc;
  }
  if (store_spec != "sqlite" && !store_spec.empty())
    return cli::fail(me, "--store must be sqlite or etcd://HOST:PORT[,HOST:PORT...], not '" + store_spec + "'"), 2;

  const std::string db_path = state_dir + "/locks.db";
  auto opened = LockStore::open(db_path, sync == "full" ? LockStore::Sync::Full : LockStore::Sync::Normal);
  if (!opened.ok()) return cli::fail(me, opened.message());
  std::unique_ptr<LockStore> store = std::move(opened).value();

  LockTableOptions options;
  options.default_lease_ms = std::max<std::int64_t>(1, (*args)["lease-ms"].as<std::int64_t>());
  options.max_hold_ms = (*args)["max-hold-ms"].as<std::int64_t>();
  options.restore_grace_ms = (*args)["restore-grace-ms"].as<std::int64_t>();
  LockTable table(options, random_token);
  std::unordered_map<std::string, std::int64_t> counters;
  {
    auto snap = store->load();
    if (!snap.ok()) return cli::fail(me, "cannot read " + db_path + ": " + snap.message());
    const auto held = snap->locks.size(), queued = snap->queue.size();
    const std::size_t left_out = table.restore(std::move(snap->locks), std::move(snap->queue),
                                               snap->next_fence, wall_clock_micros(),
                                               std::move(snap->versions));
    if (left_out)
      log(LogLevel::Warn, "broker", "left out ", left_out, " saved locks, requests or versions of ",
          db_path, " that break the lock rules (a damaged or edited database): they count as ended");
    if (Status s = store->apply(table.take_journal()); !s.ok())
      return cli::fail(me, "cannot write " + db_path + ": " + s.message());
    table.take_events();
    counters = std::move(snap->counters);
    if (held || queued)
      log(LogLevel::Info, "broker", "restored ", held, " held locks and ", queued,
          " queued requests from ", db_path);
  }

  raise_fd_limit(/*beyond_hard_limit=*/false);
  ::signal(SIGPIPE, SIG_IGN);
  boost::asio::io_context ioc(1);
  BrokerService service(ioc, table, store.get());
  service.restore_delegation(counters);
  const int rc = serve(*args, ioc, service, [&] { service.shutdown(); }, host, socket_mode,
                       "state dir " + state_dir + " (lease " + std::to_string(options.default_lease_ms) +
                           " ms, hold cap " + std::to_string(options.max_hold_ms) + " ms)");
  if (rc != 0) return rc;
  service.flush();
  log(LogLevel::Info, "broker", "stopped with ", table.lock_count(), " locks held and ",
      table.queue_length(), " requests queued (saved in ", db_path, ")");
  ::close(*lock_fd);
  return 0;
}

}  // namespace gate::cmd
