#include "mount/lock_policy.h"

#include <fcntl.h>

#include <algorithm>

namespace gate::mount {

namespace {

const char* name_of(const FsCall& call) {
  switch (call.op) {
    case FsOp::Open: return "open";
    case FsOp::Create: return "create";
    case FsOp::Setattr:
      switch (call.attr) {
        case AttrChange::Size: return "truncate";
        case AttrChange::Mode: return "chmod";
        case AttrChange::Owner: return "chown";
        case AttrChange::Times: return "utimens";
      }
      return "setattr";
    case FsOp::Setxattr: return "setxattr";
    case FsOp::Removexattr: return "removexattr";
    case FsOp::Unlink: return "unlink";
    case FsOp::Rmdir: return "rmdir";
    case FsOp::Mknod: return "mknod";
    case FsOp::Mkdir: return "mkdir";
    case FsOp::Symlink: return "symlink";
    case FsOp::Rename: return "rename";
    case FsOp::Link: return "link";
  }
  return "call";
}

// Sorted by key, one per key; a write need beats a read need on the same key.
std::vector<KeyLock> normalised(std::vector<KeyLock> locks) {
  std::sort(locks.begin(), locks.end(),
            [](const KeyLock& a, const KeyLock& b) { return a.key < b.key; });
  std::vector<KeyLock> out;
  for (auto& l : locks) {
    if (!out.empty() && out.back().key == l.key) {
      if (l.mode == LockMode::Write) out.back().mode = LockMode::Write;
      continue;
    }
    out.push_back(std::move(l));
  }
  return out;
}

}  // namespace

bool opens_for_writing(int flags) {
  return (flags & O_ACCMODE) != O_RDONLY || (flags & (O_TRUNC | O_APPEND)) != 0;
}

LockPlan plan_locks(const FsCall& call) {
  LockPlan plan;
  plan.name = name_of(call);
  const bool nonblocking = (call.open_flags & O_NONBLOCK) != 0;
  std::vector<KeyLock> locks{{call.key, LockMode::Write}};
  switch (call.op) {
    case FsOp::Open:
      locks[0].mode = opens_for_writing(call.open_flags) ? LockMode::Write : LockMode::Read;
      plan.span = Span::Handle;
      plan.wait = nonblocking ? Wait::NoWait : Wait::Fifo;
      break;
    case FsOp::Create:
      plan.span = Span::Handle;
      plan.wait = nonblocking ? Wait::NoWait : Wait::Bounded;
      break;
    case FsOp::Rename:
      locks.push_back({call.second, LockMode::Write});
      plan.changes = {call.key, call.second};
      plan.wait = Wait::Bounded;
      break;
    case FsOp::Link:
      locks.push_back({call.second, LockMode::Write});
      plan.changes = {call.second};
      plan.wait = Wait::Bounded;
      break;
    case FsOp::Symlink:
      if (auto target = target_key(parent_key(call.key), call.symlink_target))
        locks.push_back({*target, LockMode::Write});
      plan.changes = {call.key};
      plan.wait = Wait::Bounded;
      break;
    case FsOp::Setattr:
      if (call.attr == AttrChange::Size) plan.changes = {call.key};
      plan.wait = Wait::Bounded;
      break;
    case FsOp::Unlink:
    case FsOp::Mknod:
      plan.changes = {call.key};
      plan.wait = Wait::Bounded;
      break;
    case FsOp::Setxattr:
    case FsOp::Removexattr:
    case FsOp::Rmdir:
    case FsOp::Mkdir:
      plan.wait = Wait::Bounded;
      break;
  }
  plan.locks = normalised(std::move(locks));
  return plan;
}

std::string parent_key(std::string_view key) {
  auto slash = key.rfind('/');
  if (slash == std::string_view::npos) return ".";
  return std::string(key.substr(0, slash));
}

std::optional<std::string> target_key(std::string_view dir_key, std::string_view target) {
  if (target.empty() || target.front() == '/') return std::nullopt;
  std::vector<std::string_view> parts;
  auto split_into = [&parts](std::string_view text) -> bool {
    while (!text.empty()) {
      auto slash = text.find('/');
      std::string_view part = text.substr(0, slash);
      text = slash == std::string_view::npos ? std::string_view{} : text.substr(slash + 1);
      if (part.empty() || part == ".") continue;
      if (part == "..") {
        if (parts.empty()) return false;
        parts.pop_back();
        continue;
      }
      parts.push_back(part);
    }
    return true;
  };
  if (dir_key != ".") split_into(dir_key);
  if (!split_into(target)) return std::nullopt;
  if (parts.empty()) return std::string(".");
  std::string key;
  for (auto p : parts) {
    if (!key.empty()) key += '/';
    key += p;
  }
  return key;
}

}  // namespace gate::mount
