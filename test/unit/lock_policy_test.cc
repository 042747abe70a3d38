// The mount's lock policy against locking.md ("What the mount locks") and the
// README's table of kernel locks: one row per FUSE call.
#include <fcntl.h>

#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "mount/lock_policy.h"

using namespace gate;
using namespace gate::mount;

namespace {

std::vector<KeyLock> W(std::vector<std::string> keys) {
  std::vector<KeyLock> out;
  for (auto& k : keys) out.push_back({k, LockMode::Write});
  return out;
}

}  // namespace

TEST_CASE("opens lock for the handle's life and wait their turn", "[unit][policy]") {
  struct Row {
    int flags;
    LockMode mode;
    Wait wait;
  };
  const std::vector<Row> rows = {
      {O_RDONLY, LockMode::Read, Wait::Fifo},
      {O_WRONLY, LockMode::Write, Wait::Fifo},
      {O_RDWR, LockMode::Write, Wait::Fifo},
      {O_RDONLY | O_TRUNC, LockMode::Write, Wait::Fifo},
      {O_RDONLY | O_APPEND, LockMode::Write, Wait::Fifo},
      {O_WRONLY | O_CREAT, LockMode::Write, Wait::Fifo},  // O_CREAT of an existing name
      {O_RDONLY | O_NONBLOCK, LockMode::Read, Wait::NoWait},
      {O_WRONLY | O_NONBLOCK, LockMode::Write, Wait::NoWait},
  };
  for (const Row& row : rows) {
    INFO("flags " << row.flags);
    LockPlan plan = plan_locks({.op = FsOp::Open, .key = "src/a.c", .open_flags = row.flags});
    CHECK(plan.locks == std::vector<KeyLock>{{"src/a.c", row.mode}});
    CHECK(plan.span == Span::Handle);
    CHECK(plan.wait == row.wait);
    CHECK(std::string(plan.name) == "open");
  }
}

TEST_CASE("creating a name locks it for the handle and waits only a bounded time",
          "[unit][policy]") {
  LockPlan plan = plan_locks({.op = FsOp::Create, .key = "new.txt", .open_flags = O_WRONLY | O_CREAT});
  CHECK(plan.locks == W({"new.txt"}));
  CHECK(plan.span == Span::Handle);
  CHECK(plan.wait == Wait::Bounded);
  plan = plan_locks({.op = FsOp::Create, .key = "new.txt", .open_flags = O_WRONLY | O_CREAT | O_NONBLOCK});
  CHECK(plan.wait == Wait::NoWait);
}

TEST_CASE("calls under the kernel's inode locks take the write lock for the call, bounded",
          "[unit][policy]") {
  struct Row {
    FsOp op;
    AttrChange attr;
    const char* name;
  };
  const std::vector<Row> rows = {
      {FsOp::Setattr, AttrChange::Size, "truncate"},   {FsOp::Setattr, AttrChange::Mode, "chmod"},
      {FsOp::Setattr, AttrChange::Owner, "chown"},     {FsOp::Setattr, AttrChange::Times, "utimens"},
      {FsOp::Setxattr, AttrChange::Times, "setxattr"}, {FsOp::Removexattr, AttrChange::Times, "removexattr"},
      {FsOp::Unlink, AttrChange::Times, "unlink"},     {FsOp::Rmdir, AttrChange::Times, "rmdir"},
      {FsOp::Mknod, AttrChange::Times, "mknod"},       {FsOp::Mkdir, AttrChange::Times, "mkdir"},
  };
  for (const Row& row : rows) {
    INFO(row.name);
    LockPlan plan = plan_locks({.op = row.op, .key = "d/f", .attr = row.attr});
    CHECK(plan.locks == W({"d/f"}));
    CHECK(plan.span == Span::Call);
    CHECK(plan.wait == Wait::Bounded);
    CHECK(std::string(plan.name) == row.name);
  }
}

TEST_CASE("rename and link lock both names in sorted order, once each", "[unit][policy]") {
  for (FsOp op : {FsOp::Rename, FsOp::Link}) {
    LockPlan plan = plan_locks({.op = op, .key = "z.tmp", .second = "a.txt"});
    CHECK(plan.locks == W({"a.txt", "z.tmp"}));
    CHECK(plan.span == Span::Call);
    CHECK(plan.wait == Wait::Bounded);
    // Onto itself: one lock, not two (the broker would see the second as re-entry anyway).
    CHECK(plan_locks({.op = op, .key = "same", .second = "same"}).locks == W({"same"}));
  }
}

TEST_CASE("a symlink locks its name and a target inside the mount", "[unit][policy]") {
  CHECK(plan_locks({.op = FsOp::Symlink, .key = "d/link", .symlink_target = "../t"}).locks ==
        W({"d/link", "t"}));
  CHECK(plan_locks({.op = FsOp::Symlink, .key = "d/link", .symlink_target = "x/./y"}).locks ==
        W({"d/link", "d/x/y"}));
  // Absolute, or climbing out of the root: nothing to lock but the name.
  CHECK(plan_locks({.op = FsOp::Symlink, .key = "link", .symlink_target = "/etc/passwd"}).locks ==
        W({"link"}));
  CHECK(plan_locks({.op = FsOp::Symlink, .key = "d/link", .symlink_target = "../../out"}).locks ==
        W({"d/link"}));
  CHECK(plan_locks({.op = FsOp::Symlink, .key = "link", .symlink_target = "."}).locks ==
        W({".", "link"}));
}

TEST_CASE("keys of targets and parents are resolved by text", "[unit][policy]") {
  CHECK(parent_key("a/b/c") == "a/b");
  CHECK(parent_key("c") == ".");
  CHECK(target_key(".", "a/../b") == "b");
  CHECK(target_key("a", "..") == ".");
  CHECK(target_key("a", "../..") == std::nullopt);
  CHECK(target_key("a", "") == std::nullopt);
  CHECK(target_key("a/b", "c//d/") == "a/b/c/d");
}

TEST_CASE("opens_for_writing follows the access mode and the changing flags", "[unit][policy]") {
  CHECK_FALSE(opens_for_writing(O_RDONLY));
  CHECK_FALSE(opens_for_writing(O_RDONLY | O_NONBLOCK | O_CLOEXEC));
  CHECK(opens_for_writing(O_WRONLY));
  CHECK(opens_for_writing(O_RDWR));
  CHECK(opens_for_writing(O_RDONLY | O_TRUNC));
  CHECK(opens_for_writing(O_RDONLY | O_APPEND));
}

TEST_CASE("a call names the keys whose content it changes, not those whose metadata it does",
          "[unit][policy]") {
  using V = std::vector<std::string>;
  CHECK(plan_locks({.op = FsOp::Rename, .key = "a.tmp", .second = "a"}).changes == V{"a.tmp", "a"});
  CHECK(plan_locks({.op = FsOp::Link, .key = "a", .second = "b"}).changes == V{"b"});
  CHECK(plan_locks({.op = FsOp::Unlink, .key = "a"}).changes == V{"a"});
  CHECK(plan_locks({.op = FsOp::Mknod, .key = "fifo"}).changes == V{"fifo"});
  CHECK(plan_locks({.op = FsOp::Symlink, .key = "l", .symlink_target = "t"}).changes == V{"l"});
  CHECK(plan_locks({.op = FsOp::Setattr, .key = "a", .attr = AttrChange::Size}).changes == V{"a"});
  for (AttrChange meta : {AttrChange::Mode, AttrChange::Owner, AttrChange::Times})
    CHECK(plan_locks({.op = FsOp::Setattr, .key = "a", .attr = meta}).changes.empty());
  for (FsOp op : {FsOp::Setxattr, FsOp::Removexattr, FsOp::Mkdir, FsOp::Rmdir})
    CHECK(plan_locks({.op = op, .key = "d"}).changes.empty());
  // Handles report their own changes when they are released.
  CHECK(plan_locks({.op = FsOp::Open, .key = "a", .open_flags = O_WRONLY | O_TRUNC}).changes.empty());
}
