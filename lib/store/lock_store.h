#pragma once
// LockStore: the broker's lock state in SQLite (<state-dir>/locks.db, WAL).
//
// Holds the held locks, the queued requests, the counters (next fence, next
// request number) and each key's content version, so that a broker restarted on the same state directory serves
// the same locks under the same ids and never reuses a fence.
//
// Durability: by default synchronous=NORMAL in WAL mode. Every change is committed
// before the broker answers, so a crash of the broker process (kill -9) loses
// nothing; a power loss or kernel crash can lose the last transactions committed
// since the last WAL sync (the database itself stays consistent: each batch is all
// there or all gone). Sync::Full makes every commit durable at the cost of an fsync
// per batch. Either way the commit that raises the fence floor is made durable
// (once per 1,024 fences), so no fence is handed out twice, even across a power loss.
//
// The schema carries a version (PRAGMA user_version) and is migrated forward on
// open; a database from a newer gate, or one that is not a gate database, is refused
// and never overwritten.
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/status.h"
#include "lock/lock_table.h"

namespace SQLite {
class Database;
class Statement;
}  // namespace SQLite

namespace gate {

class LockStore {
 public:
  enum class Sync { Normal, Full };
  static constexpr int kSchemaVersion = 3;

  // Opens (creating if needed and migrating) the database.
  static Result<std::unique_ptr<LockStore>> open(const std::string& path, Sync sync);
  ~LockStore();

  struct Snapshot {
    std::vector<Lock> locks;
    std::vector<QueuedRequest> queue;
    std::uint64_t next_fence = 1;
    std::unordered_map<std::string, std::uint64_t> versions;  // key -> content version
    std::unordered_map<std::string, std::int64_t> counters;   // JournalEntry::SetCounter's
  };
  Result<Snapshot> load();

  // Writes the changes (and the fence floor) in one transaction; a failure (disk
  // full...) leaves the database as it was.
  Status apply(const std::vector<JournalEntry>& journal);

  int schema_version();

 private:
  LockStore(std::unique_ptr<SQLite::Database> db, Sync sync);
  // Both throw SQLite's exceptions; open() and load() turn them into failures.
  void migrate();
  Snapshot read_snapshot();
  void prepare();

  std::unique_ptr<SQLite::Database> db_;
  Sync sync_;
  std::unique_ptr<SQLite::Statement> put_lock_, delete_lock_, put_request_, delete_request_,
      put_counter_, put_version_;
};

}  // namespace gate
