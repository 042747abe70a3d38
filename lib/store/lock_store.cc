#include "store/lock_store.h"

#include <SQLiteCpp/SQLiteCpp.h>

#include <algorithm>
#include <stdexcept>

namespace gate {

namespace {

void bind_optional(SQLite::Statement& st, int index, const std::optional<std::int64_t>& v) {
  if (v) st.bind(index, static_cast<int64_t>(*v));
  else st.bind(index);  // NULL
}

std::optional<std::int64_t> optional_column(const SQLite::Column& c) {
  if (c.isNull()) return std::nullopt;
  return c.getInt64();
}

// agent, pid, command from `first` on; NULL for what the client did not say.
void bind_holder(SQLite::Statement& st, int first, const HolderInfo& who) {
  if (who.agent.empty()) st.bind(first);
  else st.bind(first, who.agent);
  bind_optional(st, first + 1, who.pid > 0 ? std::optional<std::int64_t>(who.pid) : std::nullopt);
  if (who.command.empty()) st.bind(first + 2);
  else st.bind(first + 2, who.command);
}

HolderInfo holder_columns(SQLite::Statement& st, int first) {
  HolderInfo who;
  if (!st.getColumn(first).isNull()) who.agent = st.getColumn(first).getString();
  who.pid = optional_column(st.getColumn(first + 1)).value_or(0);
  if (!st.getColumn(first + 2).isNull()) who.command = st.getColumn(first + 2).getString();
  return who;
}

}  // namespace

LockStore::LockStore(std::unique_ptr<SQLite::Database> db, Sync sync) : db_(std::move(db)), sync_(sync) {}
LockStore::~LockStore() = default;

Result<std::unique_ptr<LockStore>> LockStore::open(const std::string& path, Sync sync) {
  try {
    auto db = std::make_unique<SQLite::Database>(
        path, SQLite::OPEN_READWRITE | SQLite::OPEN_CREATE | SQLite::OPEN_FULLMUTEX);
    db->setBusyTimeout(5000);
    // Reading the schema first makes a file that is not a database fail here.
    int version = db->execAndGet("PRAGMA user_version").getInt();
    if (version > kSchemaVersion)
      return Status::failure(path + " was written by a newer gate (schema " +
                             std::to_string(version) + ", this gate knows up to " +
                             std::to_string(kSchemaVersion) +
                             "); upgrade gate or use another --state-dir");
    db->exec("PRAGMA journal_mode=WAL");
    // Only this broker uses the file (broker.lock guarantees it): keeping SQLite's
    // lock saves the fcntl() calls of every transaction.
    db->exec("PRAGMA locking_mode=EXCLUSIVE");
    db->exec(sync == Sync::Full ? "PRAGMA synchronous=FULL" : "PRAGMA synchronous=NORMAL");
    std::unique_ptr<LockStore> store(new LockStore(std::move(db), sync));
    store->migrate();
    store->prepare();
    return store;
  } catch (const std::exception& e) {
    return Status::failure("cannot use the lock database " + path + ": " + e.what() +
                           " (move it aside to start with no locks, or use another --state-dir)");
  }
}

int LockStore::schema_version() { return db_->execAndGet("PRAGMA user_version").getInt(); }

void LockStore::migrate() {
  int version = schema_version();
  if (version == 0) {
    // A database with tables but no version is not ours: refuse to touch it.
    int tables = db_->execAndGet("SELECT count(*) FROM sqlite_master WHERE type='table'").getInt();
    if (tables != 0) throw std::runtime_error("it holds tables but is not a gate lock database");
    SQLite::Transaction tx(*db_);
    db_->exec(
        "CREATE TABLE locks ("
        " lock_id TEXT PRIMARY KEY, key TEXT NOT NULL, mode TEXT NOT NULL,"
        " owner TEXT NOT NULL, session TEXT NOT NULL, acquired_at INTEGER NOT NULL,"
        " lease_expires_at INTEGER NOT NULL, lease_ms INTEGER NOT NULL,"
        " max_hold_ms INTEGER, hold_count INTEGER NOT NULL, fence INTEGER NOT NULL);"
        "CREATE TABLE requests ("
        " req_id INTEGER PRIMARY KEY, key TEXT NOT NULL, mode TEXT NOT NULL,"
        " owner TEXT NOT NULL, session TEXT NOT NULL, request_id TEXT NOT NULL,"
        " requested_at INTEGER NOT NULL, lease_ms INTEGER NOT NULL, max_hold_ms INTEGER,"
        " deadline INTEGER);"
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);"
        "PRAGMA user_version = 1;");
    tx.commit();
    version = 1;
  }
  if (version == 1) {
    // v2: locks and counters keyed by their primary key alone (WITHOUT ROWID), so a
    // commit writes one b-tree instead of a table and its index.
    SQLite::Transaction tx(*db_);
    db_->exec(
        "CREATE TABLE locks_v2 ("
        " lock_id TEXT PRIMARY KEY, key TEXT NOT NULL, mode TEXT NOT NULL,"
        " owner TEXT NOT NULL, session TEXT NOT NULL, acquired_at INTEGER NOT NULL,"
        " lease_expires_at INTEGER NOT NULL, lease_ms INTEGER NOT NULL,"
        " max_hold_ms INTEGER, hold_count INTEGER NOT NULL, fence INTEGER NOT NULL) WITHOUT ROWID;"
        "INSERT INTO locks_v2 SELECT lock_id, key, mode, owner, session, acquired_at,"
        " lease_expires_at, lease_ms, max_hold_ms, hold_count, fence FROM locks;"
        "DROP TABLE locks;"
        "ALTER TABLE locks_v2 RENAME TO locks;"
        "CREATE TABLE counters_v2 (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;"
        "INSERT INTO counters_v2 SELECT name, value FROM counters;"
        "DROP TABLE counters;"
        "ALTER TABLE counters_v2 RENAME TO counters;"
        "PRAGMA user_version = 2;");
    tx.commit();
    version = 2;
  }
  if (version == 2) {
    // v3: who each lock and request is for (agent, process, command), for people;
    // and each key's content version (the fence of the last hold that changed it).
    SQLite::Transaction tx(*db_);
    db_->exec(
        "CREATE TABLE versions (key TEXT PRIMARY KEY, version INTEGER NOT NULL) WITHOUT ROWID;"
        "ALTER TABLE locks ADD COLUMN agent TEXT;"
        "ALTER TABLE locks ADD COLUMN pid INTEGER;"
        "ALTER TABLE locks ADD COLUMN command TEXT;"
        "ALTER TABLE requests ADD COLUMN agent TEXT;"
        "ALTER TABLE requests ADD COLUMN pid INTEGER;"
        "ALTER TABLE requests ADD COLUMN command TEXT;"
        "PRAGMA user_version = 3;");
    tx.commit();
    version = 3;
  }
  // Later versions add a step here: if (version == 3) { ...; user_version = 4 }.
}

void LockStore::prepare() {
  put_lock_ = std::make_unique<SQLite::Statement>(
      *db_,
      "INSERT OR REPLACE INTO locks (lock_id, key, mode, owner, session, acquired_at,"
      " lease_expires_at, lease_ms, max_hold_ms, hold_count, fence, agent, pid, command)"
      " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)");
  delete_lock_ = std::make_unique<SQLite::Statement>(*db_, "DELETE FROM locks WHERE lock_id=?");
  put_request_ = std::make_unique<SQLite::Statement>(
      *db_,
      "INSERT OR REPLACE INTO requests (req_id, key, mode, owner, session, request_id,"
      " requested_at, lease_ms, max_hold_ms, deadline, agent, pid, command)"
      " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)");
  delete_request_ =
      std::make_unique<SQLite::Statement>(*db_, "DELETE FROM requests WHERE req_id=?");
  put_counter_ = std::make_unique<SQLite::Statement>(
      *db_, "INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)");
  put_version_ = std::make_unique<SQLite::Statement>(
      *db_, "INSERT OR REPLACE INTO versions (key, version) VALUES (?, ?)");
}

Result<LockStore::Snapshot> LockStore::load() {
  try {
    return read_snapshot();
  } catch (const std::exception& e) {
    return Status::failure(std::string("reading the lock state failed: ") + e.what());
  }
}

LockStore::Snapshot LockStore::read_snapshot() {
  Snapshot snap;
  SQLite::Statement locks(*db_,
                          "SELECT lock_id, key, mode, owner, session, acquired_at,"
                          " lease_expires_at, lease_ms, max_hold_ms, hold_count, fence,"
                          " agent, pid, command FROM locks");
  while (locks.executeStep()) {
    Lock l;
    l.lock_id = locks.getColumn(0).getString();
    l.key = locks.getColumn(1).getString();
    l.mode = parse_lock_mode(locks.getColumn(2).getString()).value_or(LockMode::Write);
    l.owner = locks.getColumn(3).getString();
    l.session = locks.getColumn(4).getString();
    l.acquired_at = locks.getColumn(5).getInt64();
    l.lease_expires_at = locks.getColumn(6).getInt64();
    l.lease_ms = locks.getColumn(7).getInt64();
    l.max_hold_ms = optional_column(locks.getColumn(8));
    l.hold_count = locks.getColumn(9).getInt64();
    l.fence = static_cast<std::uint64_t>(locks.getColumn(10).getInt64());
    l.who = holder_columns(locks, 11);
    snap.locks.push_back(std::move(l));
  }
  SQLite::Statement reqs(*db_,
                         "SELECT req_id, key, mode, owner, session, request_id, requested_at,"
                         " lease_ms, max_hold_ms, deadline, agent, pid, command"
                         " FROM requests ORDER BY req_id");
  while (reqs.executeStep()) {
    QueuedRequest r;
    r.req_id = static_cast<std::uint64_t>(reqs.getColumn(0).getInt64());
    r.key = reqs.getColumn(1).getString();
    r.mode = parse_lock_mode(reqs.getColumn(2).getString()).value_or(LockMode::Write);
    r.owner = reqs.getColumn(3).getString();
    r.session = reqs.getColumn(4).getString();
    r.request_id = reqs.getColumn(5).getString();
    r.requested_at = reqs.getColumn(6).getInt64();
    r.lease_ms = reqs.getColumn(7).getInt64();
    r.max_hold_ms = optional_column(reqs.getColumn(8));
    r.deadline = optional_column(reqs.getColumn(9));
    r.who = holder_columns(reqs, 10);
    snap.queue.push_back(std::move(r));
  }
  SQLite::Statement counters(*db_, "SELECT name, value FROM counters");
  while (counters.executeStep()) {
    const std::string name = counters.getColumn(0).getString();
    const auto value = static_cast<std::uint64_t>(counters.getColumn(1).getInt64());
    if (name == "next_fence") snap.next_fence = value;
    else snap.counters[name] = counters.getColumn(1).getInt64();
  }
  SQLite::Statement versions(*db_, "SELECT key, version FROM versions");
  while (versions.executeStep())
    snap.versions[versions.getColumn(0).getString()] =
        static_cast<std::uint64_t>(versions.getColumn(1).getInt64());
  return snap;
}

Status LockStore::apply(const std::vector<JournalEntry>& journal) {
  // A new fence floor is synced with its commit (the WAL is synced at the commit):
  // the grants answered after it may use fences up to it. So is a delegation given or
  // taken back (SetCounter): after a power loss the broker must still know of it.
  const bool raises_floor = std::any_of(journal.begin(), journal.end(), [](const JournalEntry& e) {
    return e.kind == JournalEntry::Kind::Counters || e.kind == JournalEntry::Kind::SetCounter;
  });
  const bool sync_this = raises_floor && sync_ == Sync::Normal;
  try {
    if (sync_this) db_->exec("PRAGMA synchronous=FULL");
    struct Back {
      SQLite::Database* db;
      ~Back() {
        if (db) try { db->exec("PRAGMA synchronous=NORMAL"); } catch (const std::exception&) {}
      }
    } back{sync_this ? db_.get() : nullptr};
    SQLite::Transaction tx(*db_);
    std::uint64_t fence_floor = 0;
    for (const auto& e : journal) {
      switch (e.kind) {
        case JournalEntry::Kind::PutLock: {
          auto& st = *put_lock_;
          const Lock& l = e.lock;
          st.bind(1, l.lock_id);
          st.bind(2, l.key);
          st.bind(3, to_string(l.mode));
          st.bind(4, l.owner);
          st.bind(5, l.session);
          st.bind(6, static_cast<int64_t>(l.acquired_at));
          st.bind(7, static_cast<int64_t>(l.lease_expires_at));
          st.bind(8, static_cast<int64_t>(l.lease_ms));
          bind_optional(st, 9, l.max_hold_ms);
          st.bind(10, static_cast<int64_t>(l.hold_count));
          st.bind(11, static_cast<int64_t>(l.fence));
          bind_holder(st, 12, l.who);
          st.exec();
          st.reset();
          break;
        }
        case JournalEntry::Kind::DeleteLock:
          delete_lock_->bind(1, e.lock_id);
          delete_lock_->exec();
          delete_lock_->reset();
          break;
        case JournalEntry::Kind::PutRequest: {
          auto& st = *put_request_;
          const QueuedRequest& r = e.request;
          st.bind(1, static_cast<int64_t>(r.req_id));
          st.bind(2, r.key);
          st.bind(3, to_string(r.mode));
          st.bind(4, r.owner);
          st.bind(5, r.session);
          st.bind(6, r.request_id);
          st.bind(7, static_cast<int64_t>(r.requested_at));
          st.bind(8, static_cast<int64_t>(r.lease_ms));
          bind_optional(st, 9, r.max_hold_ms);
          bind_optional(st, 10, r.deadline);
          bind_holder(st, 11, r.who);
          st.exec();
          st.reset();
          break;
        }
        case JournalEntry::Kind::DeleteRequest:
          delete_request_->bind(1, static_cast<int64_t>(e.req_id));
          delete_request_->exec();
          delete_request_->reset();
          break;
        case JournalEntry::Kind::Counters:
          fence_floor = std::max(fence_floor, e.fence_floor);
          break;
        case JournalEntry::Kind::PutVersion:
          put_version_->bind(1, e.key);
          put_version_->bind(2, static_cast<int64_t>(e.version));
          put_version_->exec();
          put_version_->reset();
          break;
        case JournalEntry::Kind::SetCounter:
          put_counter_->bind(1, e.counter);
          put_counter_->bind(2, static_cast<int64_t>(e.value));
          put_counter_->exec();
          put_counter_->reset();
          break;
      }
    }
    if (fence_floor) {
      put_counter_->bind(1, "next_fence");
      put_counter_->bind(2, static_cast<int64_t>(fence_floor));
      put_counter_->exec();
      put_counter_->reset();
    }
    tx.commit();
    return {};
  } catch (const SQLite::Exception& e) {
    for (auto* st : {put_lock_.get(), delete_lock_.get(), put_request_.get(),
                     delete_request_.get(), put_counter_.get(), put_version_.get()})
      st->tryReset();  // reset() throws the step's error again (fuzz finding: the broker ended)
    return Status::failure(std::string("saving lock state failed: ") + e.what());
  }
}

}  // namespace gate
