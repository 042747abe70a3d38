#include "support/test_support.h"

#include <boost/json.hpp>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <utility>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "client/broker_client.h"

namespace gate::test {

std::string gate_binary() { return GATE_BINARY; }

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

bool kernel_passthrough_expected() {
  utsname u{};
  if (::geteuid() != 0 || ::uname(&u) != 0) return false;
  int major = 0, minor = 0;
  if (std::sscanf(u.release, "%d.%d", &major, &minor) != 2) return false;
  if (major < 6 || (major == 6 && minor < 9)) return false;
  // Root of the first user namespace (the kernel asks CAP_SYS_ADMIN there), not of a
  // container's.
  std::ifstream uid_map("/proc/self/uid_map");
  std::string inside, outside, count;
  if (!(uid_map >> inside >> outside >> count) || inside != "0" || outside != "0" || count != "4294967295")
    return false;
  // The kernel's build configuration, where it is installed, says for sure.
  std::ifstream config(std::string("/boot/config-") + u.release);
  for (std::string line; config && std::getline(config, line);)
    if (line.rfind("CONFIG_FUSE_PASSTHROUGH", 0) == 0) return line == "CONFIG_FUSE_PASSTHROUGH=y";
  return !config.is_open();
}

ScopedEnv::ScopedEnv(const char* name, const std::string& value) : name_(name) {
  if (const char* old = std::getenv(name)) previous_ = old;
  ::setenv(name, value.c_str(), 1);
}

ScopedEnv::~ScopedEnv() {
  if (previous_) ::setenv(name_, previous_->c_str(), 1);
  else ::unsetenv(name_);
}

TempDir::TempDir(const std::string& prefix) {
  const char* base = std::getenv("TMPDIR");
  std::string templ = std::string(base && *base ? base : "/tmp") + "/" + prefix + "-XXXXXX";
  if (!::mkdtemp(templ.data())) throw std::runtime_error("mkdtemp failed for " + templ);
  path_ = templ;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

Child Child::spawn(const std::vector<std::string>& argv, const std::string& log_path, int keep_fd) {
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  const pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) {
    // Should the test process die without its destructors (a crash), its brokers and
    // mounts end with it: SIGTERM, so that a mount still unmounts itself.
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) ::_exit(127);  // it died before the line above
    if (!log_path.empty()) {
      int fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) {
        ::dup2(fd, 1);
        ::dup2(fd, 2);
        ::close(fd);
      }
    }
    // Close every descriptor but stdio and the one the child should keep.
    for (int fd = 3; fd < 1024; ++fd)
      if (fd != keep_fd) ::close(fd);
    ::execvp(args[0], args.data());
    ::_exit(127);
  }
  Child c;
  c.pid_ = pid;
  return c;
}

Child::Child(Child&& other) noexcept : pid_(std::exchange(other.pid_, -1)) {}
Child& Child::operator=(Child&& other) noexcept {
  if (this != &other) {
    kill_and_wait();
    pid_ = std::exchange(other.pid_, -1);
  }
  return *this;
}
Child::~Child() { kill_and_wait(); }

void Child::signal(int sig) const {
  if (pid_ > 0) ::kill(pid_, sig);
}

int Child::wait(std::chrono::milliseconds timeout) {
  if (pid_ <= 0) return -1;
  // Wait for the exit as an event: a pidfd becomes readable when the process ends.
  int pfd = static_cast<int>(::syscall(SYS_pidfd_open, pid_, 0));
  if (pfd >= 0) {
    pollfd p{pfd, POLLIN, 0};
    int ready = ::poll(&p, 1, static_cast<int>(timeout.count()));
    ::close(pfd);
    if (ready <= 0) return -1;
  }
  int status = 0;
  pid_t r = ::waitpid(pid_, &status, 0);
  pid_ = -1;
  if (r < 0) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

void Child::kill_and_wait() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  int status;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
}

BrokerProcess::BrokerProcess() : BrokerProcess(Options{}) {}

BrokerProcess::BrokerProcess(Options options) : options_(std::move(options)) {
  if (options_.state_dir.empty()) {
    own_dir_ = std::make_unique<TempDir>("gate-broker");
    state_dir_ = own_dir_->path();
  } else {
    state_dir_ = options_.state_dir;
  }
  log_path_ = state_dir_ + "/broker.log";
  if (options_.unix_socket) socket_path_ = state_dir_ + "/broker.sock";
  start();
}

BrokerProcess::~BrokerProcess() {
  if (child_.running()) {
    child_.signal(SIGTERM);
    if (child_.wait(std::chrono::seconds(5)) < 0) child_.kill_and_wait();
  }
}

BrokerEndpoint BrokerProcess::endpoint() const {
  BrokerEndpoint ep;
  ep.host = "127.0.0.1";
  ep.port = port_;
  return ep;
}

BrokerEndpoint BrokerProcess::unix_endpoint() const {
  BrokerEndpoint ep;
  ep.unix_socket = socket_path_;
  return ep;
}

void BrokerProcess::start() {
  std::vector<std::string> argv = {gate_binary(), "broker", "--state-dir", state_dir_,
                                   "--port", std::to_string(port_), "--log-level", "debug"};
  if (!socket_path_.empty()) {
    argv.push_back("--unix-socket");
    argv.push_back(socket_path_);
  }
  for (const auto& a : options_.extra_args) argv.push_back(a);
  // The broker's ready line is its TCP port.
  const std::string line = spawn_until_ready(child_, argv, log_path_);
  if (line.empty()) throw std::runtime_error("gate broker did not start; its log:\n" + log());
  port_ = static_cast<std::uint16_t>(std::stoi(line));
}

std::string spawn_until_ready(Child& child, std::vector<std::string> argv,
                              const std::string& log_path) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe failed");
  // The write end must survive exec in the child.
  ::fcntl(fds[1], F_SETFD, 0);
  argv.insert(argv.end(), {"--ready-fd", std::to_string(fds[1])});
  child = Child::spawn(argv, log_path, fds[1]);
  ::close(fds[1]);
  std::string line;
  pollfd p{fds[0], POLLIN, 0};
  while (line.find('\n') == std::string::npos && ::poll(&p, 1, 20'000) > 0) {
    char buf[64];
    ssize_t n = ::read(fds[0], buf, sizeof buf);
    if (n <= 0) break;
    line.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fds[0]);
  const auto nl = line.find('\n');
  return nl == std::string::npos ? "" : line.substr(0, nl);
}

void BrokerProcess::kill9() { child_.kill_and_wait(); }

int BrokerProcess::stop() {
  child_.signal(SIGTERM);
  int status = child_.wait(std::chrono::seconds(10));
  if (status < 0) child_.kill_and_wait();
  return status;
}

std::string BrokerProcess::log() const { return read_file(log_path_); }

std::uint64_t key_version(const BrokerEndpoint& ep, const std::string& key) {
  BrokerClient c(ep, std::chrono::seconds(5));
  HttpReply r = c.status(key);
  if (r.status != 200) throw std::runtime_error("GET /v1/locks/status failed: " + r.error);
  const boost::json::value v = boost::json::parse(r.body);
  const auto& versions = v.at("versions").as_object();
  auto it = versions.find(key);
  return it == versions.end() ? 0 : it->value().to_number<std::uint64_t>();
}

}  // namespace gate::test
