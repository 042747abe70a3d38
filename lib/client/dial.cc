#include "client/dial.h"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace gate {

Dialing dial(const BrokerEndpoint& ep) {
  Dialing d;
  sockaddr_storage addr{};
  socklen_t len = 0;
  int family;
  if (!ep.unix_socket.empty()) {
    auto* un = reinterpret_cast<sockaddr_un*>(&addr);
    if (ep.unix_socket.size() >= sizeof un->sun_path) {
      d.error = "socket path too long";
      return d;
    }
    un->sun_family = AF_UNIX;
    std::memcpy(un->sun_path, ep.unix_socket.c_str(), ep.unix_socket.size() + 1);
    len = sizeof(sockaddr_un);
    family = AF_UNIX;
  } else {
    addrinfo hints{};
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    addrinfo* res = nullptr;
    if (int rc = ::getaddrinfo(ep.host.c_str(), std::to_string(ep.port).c_str(), &hints, &res); rc != 0) {
      d.error = std::string("cannot resolve ") + ep.host + ": " + ::gai_strerror(rc);
      return d;
    }
    std::memcpy(&addr, res->ai_addr, res->ai_addrlen);
    len = res->ai_addrlen;
    family = res->ai_family;
    ::freeaddrinfo(res);
  }
  d.fd = ::socket(family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (d.fd < 0) {
    d.error = std::strerror(errno);
    return d;
  }
  if (::connect(d.fd, reinterpret_cast<sockaddr*>(&addr), len) == 0) {
    d.error = dial_result(d.fd);
  } else if (errno == EINPROGRESS || errno == EAGAIN) {
    d.in_progress = true;
  } else {
    d.error = std::strerror(errno);
  }
  if (!d.error.empty()) {
    ::close(d.fd);
    d.fd = -1;
  }
  return d;
}

std::string dial_result(int fd) {
  int err = 0;
  socklen_t elen = sizeof err;
  if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) != 0) err = errno;
  if (err != 0) return std::strerror(err);
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0 && addr.ss_family != AF_UNIX) {
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  return "";
}

}  // namespace gate
