#pragma once
// Connecting to the broker without blocking: the socket is made and the connect
// started; the caller waits for writability (poll) and then asks how it went.
#include <string>

#include "core/config.h"

namespace gate {

struct Dialing {
  int fd = -1;               // -1: failed at once (error says why)
  bool in_progress = false;  // wait for POLLOUT, then call dial_result()
  std::string error;
};

// A non-blocking, close-on-exec stream socket to the endpoint, its connect started.
Dialing dial(const BrokerEndpoint& ep);
// After POLLOUT: "" when connected (and TCP_NODELAY set for TCP), else why not.
std::string dial_result(int fd);

}  // namespace gate
