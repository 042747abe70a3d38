#include "mount/agent_resolver.h"

#include <cstdlib>
#include <string_view>

#include "core/files.h"

namespace gate::mount {

namespace {

constexpr int kMaxDepth = 64;  // ancestors walked at most (a loop guard)
constexpr std::size_t kMaxAgentBytes = 64;
constexpr std::string_view kAgentVar = "GATE_AGENT=";

}  // namespace

std::string clean_agent_name(const std::string& raw) {
  std::string name;
  for (char c : raw) {
    if (name.size() == kMaxAgentBytes) break;
    name.push_back(c > ' ' && c < 0x7f ? c : '_');
  }
  return name;
}

AgentResolver::AgentResolver(std::string proc, std::size_t capacity, std::chrono::milliseconds recheck)
    : proc_(std::move(proc)), capacity_(capacity), recheck_(recheck) {}

bool AgentResolver::read_stat(pid_t pid, Process* out) const {
  const auto text = read_file(proc_ + "/" + std::to_string(pid) + "/stat", 4096);
  if (!text) return false;
  const std::string& s = *text;
  // "pid (comm) state ppid ...": comm may hold spaces and parentheses itself.
  const auto open = s.find('('), close = s.rfind(')');
  if (open == std::string::npos || close == std::string::npos || close < open) return false;
  out->command = s.substr(open + 1, close - open - 1);
  out->stat_comm = out->command;
  // Fields from 3 (state) on; ppid is field 4, starttime field 22.
  std::size_t field = 3, pos = close + 2;
  while (pos < s.size() && field <= 22) {
    const auto end = s.find(' ', pos);
    const std::string_view v(s.data() + pos, (end == std::string::npos ? s.size() : end) - pos);
    if (field == 4) out->ppid = static_cast<pid_t>(std::strtol(std::string(v).c_str(), nullptr, 10));
    if (field == 22) out->start = std::strtoull(std::string(v).c_str(), nullptr, 10);
    if (end == std::string::npos) break;
    pos = end + 1;
    ++field;
  }
  return field >= 22;
}

bool AgentResolver::read_status(pid_t pid, Process* out) const {
  const auto text = read_file(proc_ + "/" + std::to_string(pid) + "/status", 8192);
  if (!text) return false;
  const std::string& s = *text;
  const auto at = s.find("\nTgid:");
  if (at == std::string::npos) return false;
  out->tgid = static_cast<pid_t>(std::strtol(s.c_str() + at + 6, nullptr, 10));
  return out->tgid > 0;
}

std::string AgentResolver::own_agent(pid_t pid) const {
  // The environment at exec time; unreadable for another user's process.
  const auto text = read_file(proc_ + "/" + std::to_string(pid) + "/environ", 1 << 20);
  if (!text) return "";
  const std::string& env = *text;
  std::size_t pos = 0;
  while (pos < env.size()) {
    auto end = env.find('\0', pos);
    if (end == std::string::npos) end = env.size();
    const std::string_view var(env.data() + pos, end - pos);
    if (var.substr(0, kAgentVar.size()) == kAgentVar)
      return clean_agent_name(std::string(var.substr(kAgentVar.size())));
    pos = end + 1;
  }
  return "";
}

const AgentResolver::Process* AgentResolver::process(pid_t pid, int depth) {
  if (pid <= 0 || depth > kMaxDepth) return nullptr;
  const auto t = std::chrono::steady_clock::now();
  auto cached = cache_.find(pid);
  if (cached != cache_.end() && t - cached->second.checked < recheck_) return &cached->second;
  Process now;
  if (!read_stat(pid, &now)) return nullptr;
  // The same process (its start time) that has not exec'd (its comm): as cached. An
  // exec keeps pid and start but may bring another command and environment
  // (`env GATE_AGENT=x cmd`).
  if (cached != cache_.end() && cached->second.start == now.start && cached->second.stat_comm == now.stat_comm) {
    cached->second.checked = t;
    return &cached->second;
  }
  now.checked = t;
  now.tgid = pid;
  read_status(pid, &now);
  if (now.tgid != pid) {
    // A thread: its process decides (threads may carry names of their own).
    if (const Process* p = process(now.tgid, depth + 1)) {
      now.agent = p->agent;
      now.command = p->command;
    }
  } else {
    now.agent = own_agent(pid);
    if (now.agent.empty())
      if (const Process* parent = process(now.ppid, depth + 1)) now.agent = parent->agent;
  }
  // Pointers handed out above are used before this point: clearing is safe.
  if (cache_.size() >= capacity_) cache_.clear();
  return &(cache_[pid] = std::move(now));
}

Caller AgentResolver::resolve(pid_t tid) {
  std::lock_guard guard(m_);
  const Process* p = process(tid, 0);
  Caller c;
  c.tid = tid;
  if (!p) {
    // Gone before we looked (or no procfs): the thread id is all we know.
    c.pid = tid;
    c.agent = "pid-" + std::to_string(tid);
    c.command = "?";
    return c;
  }
  c.pid = p->tgid;
  c.command = p->command.empty() ? "?" : p->command;
  c.agent = p->agent.empty() ? "pid-" + std::to_string(p->tgid) : p->agent;
  return c;
}

}  // namespace gate::mount
