#pragma once
// The mount's lock policy: for each FUSE call, which broker locks it takes (keys and
// modes), whether they last for the call or for the open handle, and how long the
// call may wait for them. This is locking.md's "What the mount locks" and the
// README's table of kernel locks, as code:
//   open read-only                  read,  handle, FIFO (O_NONBLOCK: no wait)
//   open for writing/O_TRUNC/APPEND write, handle, FIFO (O_NONBLOCK: no wait)
//   create (a new name)             write, handle, bounded (O_NONBLOCK: no wait)
//   setattr, setxattr, removexattr,
//   unlink, rmdir, mknod, mkdir     write, call,   bounded
//   rename, link                    write on both names, call, bounded
//   symlink                         write on the name (and on its target when that
//                                   lies inside the mount), call, bounded
// and which keys' content a call changes (LockPlan::changes).
// "Bounded" calls are the ones the kernel makes while holding inode or directory
// locks: they wait at most --meta-wait-ms, then fail with EBUSY. Locks come sorted
// by key, one per key (the stronger mode wins), so two calls never take the same
// keys in different orders.
//
// Pure: no I/O, no state, no FUSE session. GateFs asks, the LockAgent carries out.
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/lock_mode.h"

namespace gate::mount {

enum class FsOp {
  Open, Create, Setattr, Setxattr, Removexattr,
  Unlink, Rmdir, Mknod, Mkdir, Symlink, Rename, Link,
};

enum class Span {
  Call,    // given back before the call's reply
  Handle,  // kept by the open handle until its release
};

enum class Wait {
  Fifo,     // waits its turn: the kernel holds no inode lock while it waits
  NoWait,   // O_NONBLOCK: EAGAIN instead of waiting
  Bounded,  // under the kernel's inode/directory locks: --meta-wait-ms, then EBUSY
};

// What attribute a setattr changes, for log lines.
enum class AttrChange { Size, Mode, Owner, Times };

struct FsCall {
  FsOp op = FsOp::Open;
  std::string key;            // the name the call is about
  std::string second;         // rename, link: the new name
  std::string symlink_target; // symlink: the target as given (may be outside the mount)
  int open_flags = 0;         // open, create
  AttrChange attr = AttrChange::Times;  // setattr
};

struct KeyLock {
  std::string key;
  LockMode mode = LockMode::Write;
  bool operator==(const KeyLock&) const = default;
};

struct LockPlan {
  const char* name = "";       // "open", "rename", "chmod", ...: for log lines
  std::vector<KeyLock> locks;  // sorted by key, one per key
  Span span = Span::Call;
  Wait wait = Wait::Fifo;
  // Keys whose content the call changes when it succeeds (a new version at the
  // broker): what a rename leaves and replaces, what unlink removes, a new name,
  // a truncate. Metadata (mode, owner, times, xattrs) and directories are not
  // content. An open handle reports its own changes (writes, O_TRUNC, create).
  std::vector<std::string> changes;
};

LockPlan plan_locks(const FsCall& call);

// An open that changes the file: O_WRONLY, O_RDWR, O_TRUNC or O_APPEND.
bool opens_for_writing(int flags);

// The key a relative symlink target names, resolved by text against the key of
// the link's directory; nullopt for absolute targets and targets outside the root.
std::optional<std::string> target_key(std::string_view dir_key, std::string_view target);

// The directory part of a key ("a/b" for "a/b/c", "." for "c").
std::string parent_key(std::string_view key);

}  // namespace gate::mount
