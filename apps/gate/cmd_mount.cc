// gate mount: shows a directory through FUSE with every open holding a broker lock.
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>

#include "cli.h"
#include "client/broker_client.h"
#include "commands.h"
#include "core/limits.h"
#include "core/log.h"
#include "core/mounts.h"
#include "mount/gate_fs.h"

namespace gate::cmd {

namespace {

std::string real_path(const std::string& path) {
  char buf[PATH_MAX];
  return ::realpath(path.c_str(), buf) ? std::string(buf) : std::string();
}

bool is_under(const std::string& inner, const std::string& outer) {
  return inner == outer || (inner.size() > outer.size() && inner.compare(0, outer.size(), outer) == 0 &&
                            (outer == "/" || inner[outer.size()] == '/'));
}

// Checks the mount point; returns "" or the one-line reason to refuse.
std::string check_mount_point(const std::string& mnt) {
  const std::string stale = mnt + " is a stale FUSE mount (its daemon is gone); run: fusermount3 -u " + mnt;
  const std::string in_use = "mount point " + mnt + " is in use (something is mounted there); unmount it first " +
                             "(fusermount3 -u " + mnt + ") or choose another directory";
  // Asked before anything touches it: a stat of a view whose daemon is stopped waits
  // for that daemon unless the kernel still has the answer cached, and a stat of a
  // dead one may be answered from the cache (mount_state asks with a time limit).
  switch (mount_state(mnt)) {
    case MountState::Stale: return stale;
    case MountState::Mounted: return in_use;
    case MountState::NotMounted: break;
  }
  struct stat st;
  if (::stat(mnt.c_str(), &st) != 0) {
    if (errno == ENOTCONN) return stale;
    if (errno == ENOENT) return "mount point " + mnt + " does not exist; create it with: mkdir -p " + mnt;
    return "cannot stat mount point " + mnt + ": " + std::strerror(errno);
  }
  if (!S_ISDIR(st.st_mode)) return "mount point " + mnt + " is not a directory";
  const std::string real = real_path(mnt);
  if (listed_in_mountinfo(real)) return in_use;  // (reached through a symbolic link)
  DIR* dir = ::opendir(mnt.c_str());
  if (!dir) return "cannot read mount point " + mnt + ": " + std::strerror(errno);
  bool empty = true;
  while (dirent* e = ::readdir(dir)) {
    if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) {
      empty = false;
      break;
    }
  }
  ::closedir(dir);
  if (!empty)
    return "mount point " + mnt + " is not empty; gate mounts only over an empty directory "
           "(its files would be hidden)";
  return "";
}

std::string short_random() { return random_token().substr(0, 8); }

std::string host_name() {
  char buf[256] = {0};
  if (::gethostname(buf, sizeof(buf) - 1) != 0 || !buf[0]) return "host";
  return buf;
}

std::string file_safe(std::string s) {
  for (char& c : s)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') c = '_';
  return s.empty() ? "root" : s;
}

void write_ready(int fd) {
  if (fd < 0) return;
  static const char line[] = "ready\n";
  if (::write(fd, line, sizeof(line) - 1) < 0)
    log(LogLevel::Warn, "mount", "--ready-fd write failed: ", std::strerror(errno));
  ::close(fd);
}

// Leaves the terminal once the mount is up: the parent reports and exits, the
// child (a new session, stdio on /dev/null and the log) serves the mount.
bool daemonize(const std::string& log_path) {
  pid_t pid = ::fork();
  if (pid < 0) return false;
  if (pid > 0) ::_exit(0);
  ::setsid();
  if (::chdir("/") != 0) { /* "/" always exists */ }
  int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  if (null >= 0) {
    ::dup2(null, 0);
    ::dup2(null, 1);
    ::close(null);
  }
  int err = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (err >= 0) {
    ::dup2(err, 2);  // libfuse's own messages go to stderr
    ::close(err);
  }
  return true;
}

}  // namespace

int mount(int argc, char** argv) {
  po::options_description desc("Options");
  desc.add_options()
      ("root", po::value<std::string>(), "the directory to show (required)")
      ("mount", po::value<std::string>(), "where to show it: an empty directory (required)");
  add_broker_endpoint_options(desc);
  desc.add_options()
      ("foreground,f", po::bool_switch(), "stay in the foreground, logging to stderr")
      ("owner", po::value<std::string>()->default_value(""),
       "name of this mount at the broker (prefix of its owner tokens and sessions); "
       "default: the host name")
      ("lease-ms", po::value<std::int64_t>()->default_value(defaults::kLeaseMs),
       "lease of every lock; a mount that dies loses its locks this long after (env GATE_LEASE_MS)")
      ("max-hold-ms", po::value<std::int64_t>(),
       "cap on holding one lock; default: the broker's (env GATE_MAX_HOLD_MS)")
      ("acquire-timeout-ms", po::value<std::int64_t>(),
       "an open waits at most this long, then fails with EAGAIN; default: wait until granted "
       "(env GATE_ACQUIRE_TIMEOUT_MS)")
      ("meta-wait-ms", po::value<std::int64_t>()->default_value(defaults::kMetaWaitMs),
       "chmod, truncate, rename, unlink, create and the other calls the kernel makes while "
       "holding inode or directory locks wait at most this long for their lock, then fail "
       "with EBUSY (env GATE_META_WAIT_MS)")
      ("allow-other", po::bool_switch(),
       "let other users use the mount, with the kernel checking permissions (default_permissions)")
      ("attr-timeout-ms", po::value<std::int64_t>()->default_value(1000),
       "how long the kernel may cache attributes and names when DIR is not watched (--no-watch, "
       "or a network or FUSE file system); a watched DIR is cached until a change is seen")
      ("no-delegation", po::bool_switch(),
       "never ask the broker to lend this mount its lock space (while the mount is the "
       "broker's only client, locks are otherwise taken in-process; see gate-mount(1))")
      ("no-passthrough", po::bool_switch(),
       "never let the kernel read a file straight from DIR; by default, files opened "
       "read-only are (FUSE passthrough: Linux 6.9 or later, and root)")
      ("passthrough-writes", po::bool_switch(),
       "let the kernel also write straight to DIR through handles whose open created or "
       "truncated the file (sequential writes at native speed); such a handle whose lock is "
       "lost can then go on writing, where it would otherwise get EIO")
      ("no-watch", po::bool_switch(),
       "do not watch DIR with inotify for changes made beside the mount; cache attributes and "
       "names for --attr-timeout-ms instead")
      ("log-file", po::value<std::string>()->default_value(""),
       "append the log here; default in the background: $XDG_STATE_HOME/gate/logs/mount-NAME.log")
      ("log-level", po::value<std::string>()->default_value("info"),
       "debug, info, warn or error (env GATE_LOG_LEVEL)")
      ("ready-fd", po::value<int>()->default_value(-1),
       "write \"ready\" and a newline to this file descriptor once mounted")
      ("history-dir", po::value<std::string>(),
       "where to keep replaced versions; default: $XDG_STATE_HOME/gate/history/ROOT (ROOT with "
       "'/' as '_')")
      ("history-max-file", po::value<std::string>()->default_value("8M"),
       "keep no version of files larger than this (K, M, G suffixes)")
      ("history-max-bytes", po::value<std::string>()->default_value("1G"),
       "the history holds at most this much; the oldest versions go first")
      ("history-keep-ignored", po::bool_switch(),
       "keep versions of what the repository's ignore rules ignore too (never .git/)")
      ("no-history", po::bool_switch(), "keep no history of replaced versions")
      ("stale-writes", po::value<std::string>(),
       "what a stale replacement (a save over a file another agent changed after this "
       "agent read it) gets: merge (three-way, with what it missed), refuse (EBUSY, nothing "
       "changes) or off; default merge, off with --no-history (env GATE_STALE_WRITES)")
      ("no-locking", po::bool_switch(),
       "benchmarks only: a plain passthrough that takes no locks and needs no broker")
      ("debug-fuse", po::bool_switch(), "print every FUSE request (implies --foreground)");
  po::positional_options_description positional;
  positional.add("root", 1).add("mount", 1);
  int code = 0;
  auto args = cli::parse(argc, argv, desc, "gate mount --root DIR --mount MNT [options]",
                       "Shows DIR at MNT. Every open holds a lock at the broker until its last "
                       "close: read-only opens share a read lock, all others take the write lock, "
                       "in FIFO order. Stop with Ctrl-C, SIGTERM or fusermount3 -u MNT; every "
                       "lock is released. GATE_RELEASE_ON_FLUSH=1 releases on flush instead.",
                       &code, &positional);
  if (!args) return code;
  const std::string me = argv[0];

  LogLevel level;
  if (!parse_log_level((*args)["log-level"].as<std::string>(), &level))
    return cli::fail(me, "--log-level must be debug, info, warn or error"), 2;
  set_log_level(level);
  const bool history_on = !(*args)["no-history"].as<bool>() && !(*args)["no-locking"].as<bool>();
  mount::StaleWrites stale_writes = history_on ? mount::StaleWrites::Merge : mount::StaleWrites::Off;
  if (args->count("stale-writes")) {
    const std::string v = (*args)["stale-writes"].as<std::string>();
    if (v == "merge") stale_writes = mount::StaleWrites::Merge;
    else if (v == "refuse") stale_writes = mount::StaleWrites::Refuse;
    else if (v == "off") stale_writes = mount::StaleWrites::Off;
    else return cli::fail(me, "--stale-writes must be merge, refuse or off, not '" + v + "'"), 2;
    if (v == "merge" && !history_on)
      return cli::fail(me, "--stale-writes merge needs the history (it merges with the versions "
                           "it kept): drop --no-history, or use refuse"), 2;
  }
  if (!args->count("root") || !args->count("mount"))
    return cli::fail(me, "both --root DIR and --mount MNT are needed; see --help"), 2;

  const std::string root_arg = (*args)["root"].as<std::string>();
  const std::string mnt_arg = (*args)["mount"].as<std::string>();
  const bool debug_fuse = (*args)["debug-fuse"].as<bool>();
  const bool foreground = (*args)["foreground"].as<bool>() || debug_fuse;
  const bool locking = !(*args)["no-locking"].as<bool>();

  const std::string root = real_path(root_arg);
  struct stat st;
  if (root.empty() || ::stat(root.c_str(), &st) != 0)
    return cli::fail(me, "cannot use " + root_arg + " as the directory to show: " + std::strerror(errno));
  if (!S_ISDIR(st.st_mode)) return cli::fail(me, root_arg + " is not a directory");
  if (std::string why = check_mount_point(mnt_arg); !why.empty()) return cli::fail(me, why);
  const std::string mnt = real_path(mnt_arg);
  if (is_under(mnt, root) || is_under(root, mnt))
    return cli::fail(me, "the mount point " + mnt + " and the directory " + root +
                             " must not contain each other");

  // Every open file costs the daemon two descriptors (the handle and the inode's
  // O_PATH fd), so take all there is: root may go past the hard limit to nr_open.
  raise_fd_limit(/*beyond_hard_limit=*/true);

  mount::MountOptions options;
  options.root = root;
  options.mountpoint = mnt;
  options.locking = locking;
  options.allow_other = (*args)["allow-other"].as<bool>();
  options.debug_fuse = debug_fuse;
  options.cache_timeout_s = static_cast<double>((*args)["attr-timeout-ms"].as<std::int64_t>()) / 1000.0;
  options.watch_source = !(*args)["no-watch"].as<bool>();
  options.passthrough = !(*args)["no-passthrough"].as<bool>();
  options.passthrough_writes = (*args)["passthrough-writes"].as<bool>();
  if (options.passthrough_writes && !options.passthrough)
    return cli::fail(me, "--passthrough-writes and --no-passthrough contradict each other"), 2;
  options.locks.delegation = !(*args)["no-delegation"].as<bool>();
  if (const char* v = std::getenv("GATE_RELEASE_ON_FLUSH"); v && std::string(v) == "1")
    options.release_on_flush = true;
  const std::string owner_name = (*args)["owner"].as<std::string>();
  auto& locks = options.locks;
  locks.broker = broker_endpoint_from(*args);
  locks.mount_id = (owner_name.empty() ? host_name() : owner_name) + "-" + short_random();
  locks.view = host_name() + ":" + mnt;
  locks.lease_ms = (*args)["lease-ms"].as<std::int64_t>();
  if (locks.lease_ms <= 0) return cli::fail(me, "--lease-ms must be positive"), 2;
  if (args->count("max-hold-ms")) locks.max_hold_ms = (*args)["max-hold-ms"].as<std::int64_t>();
  if (args->count("acquire-timeout-ms"))
    locks.acquire_timeout_ms = (*args)["acquire-timeout-ms"].as<std::int64_t>();
  const std::int64_t meta_wait_ms = (*args)["meta-wait-ms"].as<std::int64_t>();
  if (meta_wait_ms < 0) return cli::fail(me, "--meta-wait-ms must be 0 or more"), 2;
  locks.meta_wait = std::chrono::milliseconds(meta_wait_ms);

  if (!locking && stale_writes != mount::StaleWrites::Off)
    return cli::fail(me, "--stale-writes needs locking (versions come from the broker)"), 2;
  options.stale_writes = stale_writes;

  if (history_on) {
    auto max_file = parse_size((*args)["history-max-file"].as<std::string>());
    auto max_bytes = parse_size((*args)["history-max-bytes"].as<std::string>());
    if (!max_file || !max_bytes)
      return cli::fail(me, "--history-max-file and --history-max-bytes take sizes such as 8M or 1G"), 2;
    options.history.dir = args->count("history-dir") ? (*args)["history-dir"].as<std::string>()
                                                     : default_history_dir(root);
    options.history.max_file_bytes = *max_file;
    options.history.max_total_bytes = *max_bytes;
    options.history_git_rules = !(*args)["history-keep-ignored"].as<bool>();
  }

  if (locking) {
    BrokerClient probe(locks.broker, std::chrono::seconds(3));
    if (!probe.healthy())
      return cli::fail(me, "no broker answers at " + locks.broker.describe() +
                               "; start one with `gate broker`, or point --broker-host/--broker-port "
                               "or --broker-socket at a running one");
  }

  std::string log_path = (*args)["log-file"].as<std::string>();
  if (log_path.empty() && !foreground) {
    const std::string dir = user_state_root() + "/logs";
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    log_path = dir + "/mount-" +
               file_safe(owner_name.empty() ? std::filesystem::path(mnt).filename().string()
                                            : owner_name) +
               ".log";
  }
  if (!log_path.empty() && !set_log_file(log_path))
    return cli::fail(me, "cannot open the log file " + log_path + " (choose one with --log-file)");

  const std::string broker_text = locks.broker.describe(), mount_id = locks.mount_id;
  const std::int64_t lease_ms = locks.lease_ms;
  mount::GateFs fs(std::move(options));
  if (Status s = fs.mount(); !s.ok()) return cli::fail(me, s.message());

  if (!foreground) {
    std::cout << "gate mount: " << root << " is at " << mnt << " (log: " << log_path
              << "); stop with: fusermount3 -u " << mnt << std::endl;
    if (!daemonize(log_path)) return cli::fail(me, "could not go to the background (fork failed)");
  }
  fs.start();
  log(LogLevel::Info, "mount", "mounted ", root, " at ", mnt,
      locking ? " with locks at broker " + broker_text + " as " + mount_id + " (lease " +
                    std::to_string(lease_ms) + " ms)"
              : std::string(" WITHOUT locking (--no-locking)"));
  write_ready((*args)["ready-fd"].as<int>());
  int rc = fs.serve();
  log(LogLevel::Info, "mount", "unmounted ", mnt);
  return rc;
}

}  // namespace gate::cmd
