#pragma once
// AgentResolver: who a request through the mount is for.
//
// The kernel tells the mount only the thread id of the caller (Node does its file
// I/O on worker threads). resolve() turns it into the process (its thread group
// id), the process's command name, and its agent: the value of GATE_AGENT in the
// environment of the process or of its nearest ancestor that has one (agents' helper
// children may clear their environment, so the ancestors count), else
// "pid-<tgid>".
//
// It never fails: a process that is gone, or whose environment cannot be read
// (another user's, with the mount not running as root), is skipped or falls back
// to "pid-<tgid>"; a request is never refused because of who made it.
//
// Results are cached per process and checked against the process's start time, so
// a reused pid is never taken for the old process: at most every `recheck` (100 ms;
// the kernel hands pids out in a cycle, so one cannot come back that fast), so that
// a burst of requests from one process costs no read of /proc/<tid>/stat each.
#include <sys/types.h>

#include <cstdint>
#include <chrono>
#include <mutex>
#include <string>
#include <unordered_map>

namespace gate::mount {

struct Caller {
  pid_t tid = 0;        // the thread that made the request (as the kernel said)
  pid_t pid = 0;        // its process (thread group id)
  std::string agent;    // never empty
  std::string command;  // the process's command name (comm); "?" when unknown
};

// A GATE_AGENT value made safe to show and send: printable ASCII without spaces,
// at most 64 bytes; empty when nothing is left.
std::string clean_agent_name(const std::string& raw);

class AgentResolver {
 public:
  // `proc` is where procfs is mounted; `capacity` bounds the cache.
  explicit AgentResolver(std::string proc = "/proc", std::size_t capacity = 4096,
                         std::chrono::milliseconds recheck = std::chrono::milliseconds(100));

  Caller resolve(pid_t tid);

 private:
  struct Process {
    std::uint64_t start = 0;  // start time in clock ticks since boot
    pid_t tgid = 0;
    pid_t ppid = 0;
    std::string command;
    std::string stat_comm;  // comm as its own stat said (an exec changes it, not `start`)
    std::string agent;  // resolved (own GATE_AGENT or an ancestor's); empty: none
    std::chrono::steady_clock::time_point checked;  // last found as it is cached
  };
  // Reads what /proc says about `pid` (thread or process); false when it is gone.
  bool read_stat(pid_t pid, Process* out) const;
  bool read_status(pid_t pid, Process* out) const;
  std::string own_agent(pid_t pid) const;  // GATE_AGENT from its environ, or ""
  // The agent of process `pid` (resolved through its ancestors); mutex held.
  const Process* process(pid_t pid, int depth);

  std::string proc_;
  std::size_t capacity_;
  std::chrono::milliseconds recheck_;
  std::mutex m_;
  std::unordered_map<pid_t, Process> cache_;  // by pid (threads by their tid too)
};

}  // namespace gate::mount
