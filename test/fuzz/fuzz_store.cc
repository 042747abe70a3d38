// The broker's start on whatever file is in its state directory: any bytes as
// locks.db are opened, loaded and restored into a LockTable as `gate broker` does
// (cmd_broker.cc), or refused with a reason; a database that loads takes new
// changes, and never hands out a fence at or below a restored one.
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>

#include "lock/lock_table.h"
#include "store/lock_store.h"

namespace {

constexpr const char* kDbFiles[] = {"/locks.db", "/locks.db-wal", "/locks.db-shm", "/locks.db-journal"};

// The directory the inputs are written to, removed with what is in it when the
// fuzzer exits (a static's destructor: on return from main and on exit()).
struct StateDir {
  std::string path;
  StateDir() {
    char tmpl[] = "/tmp/gate-fuzz-store-XXXXXX";
    if (!::mkdtemp(tmpl)) std::abort();
    path = tmpl;
  }
  ~StateDir() {
    clear();
    ::rmdir(path.c_str());
  }
  void clear() const {
    for (const char* f : kDbFiles) ::unlink((path + f).c_str());
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace gate;
  static const StateDir dir;
  dir.clear();
  const std::string db = dir.path + "/locks.db";
  std::ofstream(db, std::ios::binary).write(reinterpret_cast<const char*>(data),
                                            static_cast<std::streamsize>(size));
  auto store = LockStore::open(db, LockStore::Sync::Normal);
  if (!store.ok()) {
    if (store.message().empty()) std::abort();
    return 0;
  }
  auto snap = (*store)->load();
  if (!snap.ok()) {
    if (snap.message().empty()) std::abort();
    return 0;
  }
  // The fences and versions restore keeps (it leaves out numbers past 2^62).
  constexpr std::uint64_t kKept = std::uint64_t{1} << 62;
  auto seen = [](std::uint64_t v) { return v < kKept ? v : 0; };
  std::uint64_t highest = snap->next_fence ? seen(snap->next_fence - 1) : 0;
  for (const Lock& l : snap->locks) highest = std::max(highest, seen(l.fence));
  for (const auto& [key, version] : snap->versions) highest = std::max(highest, seen(version));
  Micros now = 1'800'000'000'000'000;
  int ids = 0;
  LockTable table(LockTableOptions{}, [&ids] { return "F" + std::to_string(++ids); });
  table.restore(std::move(snap->locks), std::move(snap->queue), snap->next_fence, now,
                std::move(snap->versions));
  (void)(*store)->apply(table.take_journal());
  table.take_events();
  AcquireParams p;
  p.key = "fuzz/new";
  p.owner = "fuzz";
  p.timeout_ms = 0;
  AcquireResult r = table.acquire(p, now);
  if (r.kind == AcquireResult::Kind::Granted && r.lock.fence <= highest) std::abort();
  (void)(*store)->apply(table.take_journal());
  table.expire(now + 4'000'000'000'000);  // everything restored ends
  (void)(*store)->apply(table.take_journal());
  return 0;
}
