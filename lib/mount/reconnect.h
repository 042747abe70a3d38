#pragma once
// Reconnect: how a queued wait rides out a broker that went away. The wait asks
// again every `pause` while the broker has been unreachable for at most `window` (a
// restarted broker keeps its queue that long, and the request_id re-attaches the
// wait to its place), never past the job's own deadline; then it gives up (EIO).
// The first loss is always retried once, since a kept-alive connection may simply
// have been closed by a restart.
//
// This is the mount's only retry policy; BrokerClient below it only re-sends a call
// once on a fresh connection when a kept-alive one turns out closed. Pure: time comes
// in as arguments.
#include <chrono>
#include <optional>

namespace gate::mount {

class Reconnect {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr std::chrono::milliseconds kPause{200};

  Reconnect(std::chrono::milliseconds window, std::optional<Clock::time_point> deadline,
            std::chrono::milliseconds pause = kPause)
      : window_(window), pause_(pause), deadline_(deadline) {}

  // The broker answered: a later loss starts a new window.
  void reached() { in_outage_ = false; }

  // The broker could not be reached at `now`: when to ask again, or nullopt to give up.
  std::optional<Clock::time_point> lost(Clock::time_point now) {
    const bool first = !in_outage_;
    if (first) {
      in_outage_ = true;
      since_ = now;
    }
    if (!first && (now - since_ > window_ || (deadline_ && now >= *deadline_))) return std::nullopt;
    Clock::time_point at = now + pause_;
    if (deadline_ && *deadline_ < at) at = *deadline_;
    return at;
  }

  // Whether the last lost() began a new window (for one log line per outage).
  bool outage_began(Clock::time_point now) const { return in_outage_ && since_ == now; }

 private:
  std::chrono::milliseconds window_, pause_;
  std::optional<Clock::time_point> deadline_;
  bool in_outage_ = false;
  Clock::time_point since_{};  // start of the outage, while in_outage_
};

}  // namespace gate::mount
