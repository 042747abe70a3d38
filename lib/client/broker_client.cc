#include "client/broker_client.h"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>

#include "client/dial.h"

namespace gate {

// Blocking sockets with poll() for time limits: a call costs a send and a receive
// or two, with no event loop or timers around them (the mount makes thousands of
// these calls a second). abort() shuts the socket down from another thread, which
// wakes a blocked poll() at once.
struct BrokerClient::Impl {
  std::mutex mu;  // guards fd against abort() from another thread
  int fd = -1;
  std::string inbuf;  // bytes received but not yet parsed
  std::atomic<bool> aborted{false};
  std::chrono::milliseconds io_timeout;

  bool connected() {
    std::lock_guard lock(mu);
    return fd >= 0;
  }

  void close() {
    std::lock_guard lock(mu);
    if (fd >= 0) ::close(fd);
    fd = -1;
    inbuf.clear();
  }

  // Waits until fd is ready for `events`; false on time-out, error or abort.
  bool wait(int sock, short events, int timeout_ms, std::string* error) {
    pollfd p{sock, events, 0};
    while (true) {
      int r = ::poll(&p, 1, timeout_ms);
      if (r < 0 && errno == EINTR) continue;
      if (aborted) {
        *error = "aborted";
        return false;
      }
      if (r == 0) {
        *error = "timed out after " + std::to_string(timeout_ms) + " ms";
        return false;
      }
      if (r < 0) {
        *error = std::strerror(errno);
        return false;
      }
      return true;  // ready, or hung up: the next read/write says which
    }
  }

  std::string connect(const BrokerEndpoint& ep) {
    Dialing d = dial(ep);
    if (d.fd < 0) return d.error;
    {
      std::lock_guard lock(mu);
      fd = d.fd;
    }
    if (aborted) return "aborted";
    if (d.in_progress) {
      std::string error;
      if (!wait(d.fd, POLLOUT, static_cast<int>(io_timeout.count()), &error)) return error;
      return dial_result(d.fd);
    }
    return "";
  }

  std::string send_all(const std::string& data) {
    const int sock = fd;
    std::size_t sent = 0;
    while (sent < data.size()) {
      ssize_t n = ::send(sock, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
      if (n > 0) {
        sent += static_cast<std::size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        std::string error;
        if (!wait(sock, POLLOUT, static_cast<int>(io_timeout.count()), &error)) return error;
        continue;
      }
      return aborted ? "aborted" : std::strerror(errno);
    }
    return "";
  }

  // Reads one answer into `reader` (which says whether anything at all arrived).
  std::string receive(wire::AnswerReader& reader, bool wait_forever) {
    const int sock = fd;
    if (!inbuf.empty()) {
      const std::string held = std::move(inbuf);
      inbuf.clear();
      if (reader.feed(held.data(), held.size()) != wire::AnswerReader::State::NeedMore)
        return finished(reader);
    }
    char buf[16384];
    while (true) {
      ssize_t n = ::recv(sock, buf, sizeof buf, 0);
      if (n > 0) {
        if (reader.feed(buf, static_cast<std::size_t>(n)) != wire::AnswerReader::State::NeedMore)
          return finished(reader);
        continue;
      }
      if (n == 0) {
        if (aborted) return "aborted";
        reader.end_of_stream();
        return finished(reader);
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        std::string error;
        if (!wait(sock, POLLIN, wait_forever ? -1 : static_cast<int>(io_timeout.count()), &error))
          return error;
        continue;
      }
      return aborted ? "aborted" : std::strerror(errno);
    }
  }

  // "" for an answer read whole; what was past it is kept for the next one.
  std::string finished(wire::AnswerReader& reader) {
    inbuf = reader.take_leftover();
    return reader.reply().status != 0 ? "" : reader.error();
  }
};

BrokerClient::BrokerClient(BrokerEndpoint endpoint, std::chrono::milliseconds io_timeout)
    : endpoint_(std::move(endpoint)), impl_(std::make_unique<Impl>()) {
  impl_->io_timeout = io_timeout;
}

BrokerClient::~BrokerClient() { impl_->close(); }

void BrokerClient::abort() {
  impl_->aborted = true;
  std::lock_guard lock(impl_->mu);
  if (impl_->fd >= 0) ::shutdown(impl_->fd, SHUT_RDWR);
}

void BrokerClient::reset() {
  impl_->close();
  impl_->aborted = false;
}

HttpReply BrokerClient::request(const std::string& method, const std::string& target,
                                const std::string& body, bool wait_forever) {
  HttpReply reply;
  for (int attempt = 0; attempt < 2; ++attempt) {
    if (impl_->aborted) {
      reply.error = "aborted";
      return reply;
    }
    const bool reused = impl_->connected();
    if (!reused) {
      if (std::string e = impl_->connect(endpoint_); !e.empty()) {
        impl_->close();
        reply.error = impl_->aborted ? "aborted"
                                     : "cannot reach the broker at " + endpoint_.describe() + ": " + e;
        return reply;
      }
    }
    wire::AnswerReader reader;
    std::string error = impl_->send_all(wire::http_text({method, target, body}, endpoint_));
    if (error.empty()) error = impl_->receive(reader, wait_forever);
    if (error.empty()) {
      reply = reader.reply();
      if (!reader.keep_alive()) impl_->close();
      return reply;
    }
    const bool got_bytes = reader.got_bytes();
    impl_->close();
    if (impl_->aborted) {
      reply.error = "aborted";
      return reply;
    }
    // A kept-alive connection the broker had already closed: try once on a new one.
    if (reused && !got_bytes && error.find("timed out") == std::string::npos) continue;
    reply.error = "broker at " + endpoint_.describe() + " did not answer: " + error;
    return reply;
  }
  return reply;
}

HttpReply BrokerClient::exchange(const wire::Request& r) {
  return request(r.method, r.target, r.body, r.wait_forever);
}

CallResult BrokerClient::call(const wire::Request& r) { return wire::to_result(exchange(r)); }

CallResult BrokerClient::acquire(const AcquireRequest& req) {
  return call(wire::acquire(req, impl_->io_timeout));
}

CallResult BrokerClient::release(const std::string& lock_id, const std::string& owner,
                                 bool changed, const std::string& stale) {
  return call(wire::release(lock_id, owner, changed, stale));
}

CallResult BrokerClient::heartbeat(const std::string& lock_id, const std::string& owner,
                                   std::optional<std::int64_t> lease_ms) {
  return call(wire::heartbeat(lock_id, owner, lease_ms));
}

HttpReply BrokerClient::status(const std::string& path) { return exchange(wire::status(path)); }

std::optional<std::vector<LockInfo>> BrokerClient::holders(const std::string& key) {
  return wire::holders_from(status(key), key);
}

bool BrokerClient::healthy() { return exchange(wire::health()).status == 200; }

}  // namespace gate
