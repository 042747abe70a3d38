#include "vm/vm_host.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/config.h"
#include "core/process.h"

namespace gate::vm {

namespace fs = std::filesystem;

std::uint16_t free_tcp_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return 0;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  std::uint16_t port = 0;
  socklen_t len = sizeof addr;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0)
    port = ntohs(addr.sin_port);
  ::close(fd);
  return port;
}

bool tcp_port_free(std::uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(port);
  bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  ::close(fd);
  return ok;
}

AccelChoice choose_accel(const std::string& requested,
                         const std::function<Status()>& kvm_works) {
  AccelChoice c;
  if (requested == "tcg") {
    c.reason = "using software emulation (TCG), as asked";
    return c;
  }
  const Status works = kvm_works();
  if (works.ok()) {
    c.accel = Accel::Kvm;
    c.reason = "using KVM";
    return c;
  }
  c.reason = (requested == "kvm" ? "KVM was asked for but does not work here (" : "KVM does not work here (") +
             works.message() + "); using software emulation (TCG), which is slower";
  return c;
}

Status kvm_usable() {
  if (::access("/dev/kvm", R_OK | W_OK) != 0)
    return Status::failure("/dev/kvm is missing or not accessible");
  // A vCPU that cannot be set up makes qemu exit at once; one that can keeps it
  // running (paused with -S) until we stop it.
  Daemon probe = start_daemon(kvm_probe_command(), "/dev/null", std::chrono::milliseconds(0));
  if (probe.pid < 0) return Status::failure("qemu could not be started");
  const bool exited = wait_for_exit(probe.pid, std::chrono::seconds(3));
  if (exited) return Status::failure("qemu -accel kvm -cpu host exits at start");
  ::kill(probe.pid, SIGKILL);
  wait_for_exit(probe.pid, std::chrono::seconds(5));
  return {};
}

Result<std::string> ensure_gate_ssh_key() {
  const std::string dir = user_state_root() + "/ssh";
  const std::string key = dir + "/id_ed25519";
  if (fs::exists(key) && fs::exists(key + ".pub")) return key;
  std::error_code ec;
  fs::create_directories(dir, ec);
  ::chmod(dir.c_str(), 0700);
  RunResult r = run_command({"ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "gate", "-f", key},
                            std::chrono::seconds(30));
  if (r.status != 0) return Status::failure("ssh-keygen failed: " + r.output);
  return key;
}

Status qmp_powerdown(const std::string& qmp_socket) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (qmp_socket.size() >= sizeof addr.sun_path) {
    ::close(fd);
    return Status::failure("QMP socket path too long");
  }
  std::strcpy(addr.sun_path, qmp_socket.c_str());
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    const int err = errno;
    ::close(fd);
    return Status::failure("cannot reach qemu's QMP socket " + qmp_socket + ": " + std::strerror(err));
  }
  const std::string cmds =
      "{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"system_powerdown\"}\n";
  bool ok = ::send(fd, cmds.data(), cmds.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(cmds.size());
  // Read the greeting and both answers (bounded), so qemu has seen the commands.
  std::string got;
  pollfd p{fd, POLLIN, 0};
  while (ok && got.find("\"return\"", got.find("\"return\"") + 1) == std::string::npos &&
         ::poll(&p, 1, 2000) > 0) {
    char buf[1024];
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0) break;
    got.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fd);
  if (!ok) return Status::failure("writing to qemu's QMP socket failed");
  return {};
}

}  // namespace gate::vm
