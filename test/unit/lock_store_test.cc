// The SQLite store: round trips, counters, versions, refusing what is not ours.
#include <SQLiteCpp/SQLiteCpp.h>
#include <catch2/catch.hpp>

#include <fstream>

#include "store/lock_store.h"
#include "support/test_support.h"

using namespace gate;

namespace {
LockTable make_table() {
  static int n = 0;
  return LockTable({}, [] { return "id-" + std::to_string(++n); });
}
constexpr Micros kNow = 1'800'000'000'000'000;
}  // namespace

// Opens a store that must open.
std::unique_ptr<LockStore> open_ok(const std::string& path, LockStore::Sync sync = LockStore::Sync::Normal) {
  auto r = LockStore::open(path, sync);
  INFO(r.message());
  REQUIRE(r.ok());
  return std::move(r).value();
}

TEST_CASE("held locks, queued requests and counters survive a reopen", "[store]") {
  test::TempDir dir;
  const std::string path = dir.path() + "/locks.db";
  std::vector<Lock> before;
  {
    auto store = open_ok(path);
    LockTable t = make_table();
    AcquireParams p{"src/a.c", LockMode::Write, "A", "m:1", "", std::nullopt, 5000, std::nullopt};
    p.who = {"claude-1", 4242, "node"};
    t.acquire(p, kNow);
    p.who = {"codex", 0, ""};
    p.owner = "B";
    p.session = "m:2";
    p.request_id = "rid";
    t.acquire(p, kNow);
    p.key = "src/b.c";
    p.mode = LockMode::Read;
    t.acquire(p, kNow);
    t.acquire(p, kNow);  // hold_count 2
    REQUIRE(store->apply(t.take_journal()).ok());
    before = t.locks();
  }
  auto store = open_ok(path);
  auto loaded = store->load();
  REQUIRE(loaded.ok());
  auto& snap = *loaded;
  REQUIRE(snap.locks.size() == 2);
  REQUIRE(snap.queue.size() == 1);
  CHECK(snap.queue[0].owner == "B");
  CHECK(snap.queue[0].request_id == "rid");
  CHECK(snap.queue[0].who.agent == "codex");
  CHECK(snap.queue[0].who.pid == 0);
  CHECK(snap.queue[0].who.command.empty());
  CHECK(snap.next_fence > 2);  // a floor above every fence handed out
  for (const auto& l : before) {
    auto it = std::find_if(snap.locks.begin(), snap.locks.end(),
                           [&](const Lock& s) { return s.lock_id == l.lock_id; });
    REQUIRE(it != snap.locks.end());
    CHECK(it->key == l.key);
    CHECK(it->mode == l.mode);
    CHECK(it->owner == l.owner);
    CHECK(it->session == l.session);
    CHECK(it->hold_count == l.hold_count);
    CHECK(it->fence == l.fence);
    CHECK(it->lease_expires_at == l.lease_expires_at);
    CHECK(it->max_hold_ms == l.max_hold_ms);
    CHECK(it->who.agent == l.who.agent);
    CHECK(it->who.pid == l.who.pid);
    CHECK(it->who.command == l.who.command);
  }
  CHECK(std::any_of(snap.locks.begin(), snap.locks.end(), [](const Lock& l) {
    return l.who.agent == "claude-1" && l.who.pid == 4242 && l.who.command == "node";
  }));
}

TEST_CASE("released locks are gone from the store", "[store]") {
  test::TempDir dir;
  auto store = open_ok(dir.path() + "/locks.db", LockStore::Sync::Full);
  LockTable t = make_table();
  auto r = t.acquire({"k", LockMode::Write, "A", "", "", std::nullopt, std::nullopt, std::nullopt}, kNow);
  REQUIRE(store->apply(t.take_journal()).ok());
  t.release(r.lock.lock_id, "A", kNow);
  REQUIRE(store->apply(t.take_journal()).ok());
  CHECK(store->load()->locks.empty());
}

TEST_CASE("a new database gets the current schema version", "[store]") {
  test::TempDir dir;
  auto store = open_ok(dir.path() + "/locks.db");
  CHECK(store->schema_version() == LockStore::kSchemaVersion);
}

TEST_CASE("a database from a newer gate is refused, not overwritten", "[store]") {
  test::TempDir dir;
  const std::string path = dir.path() + "/locks.db";
  {
    SQLite::Database db(path, SQLite::OPEN_READWRITE | SQLite::OPEN_CREATE);
    db.exec("CREATE TABLE future (x); PRAGMA user_version = 99;");
  }
  auto refused = LockStore::open(path, LockStore::Sync::Normal);
  CHECK_FALSE(refused.ok());
  CHECK(refused.message().find("newer gate") != std::string::npos);
  SQLite::Database db(path, SQLite::OPEN_READONLY);
  CHECK(db.tableExists("future"));
}

TEST_CASE("a file that is not a database is refused with a clear message", "[store]") {
  test::TempDir dir;
  const std::string path = dir.path() + "/locks.db";
  { std::ofstream(path) << std::string(4096, 'x'); }
  auto refused = LockStore::open(path, LockStore::Sync::Normal);
  CHECK_FALSE(refused.ok());
  CHECK(refused.message().find(path) != std::string::npos);
  CHECK(test::read_file(path) == std::string(4096, 'x'));
}

TEST_CASE("a database with foreign tables and no version is refused", "[store]") {
  test::TempDir dir;
  const std::string path = dir.path() + "/locks.db";
  { SQLite::Database db(path, SQLite::OPEN_READWRITE | SQLite::OPEN_CREATE); db.exec("CREATE TABLE t (x)"); }
  auto refused = LockStore::open(path, LockStore::Sync::Normal);
  CHECK_FALSE(refused.ok());
  CHECK(refused.message().find("not a gate lock database") != std::string::npos);
}

TEST_CASE("a version 1 database is migrated forward with its locks", "[store]") {
  test::TempDir dir;
  const std::string path = dir.path() + "/locks.db";
  {
    // The schema as gate 0.1's first store wrote it.
    SQLite::Database db(path, SQLite::OPEN_READWRITE | SQLite::OPEN_CREATE);
    db.exec(
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
        "INSERT INTO locks VALUES ('old-lock', 'src/a.c', 'write', 'o', 'owner:o', 1, 2, 30000, NULL, 3, 41);"
        "INSERT INTO counters VALUES ('next_fence', 1066);"
        "PRAGMA user_version = 1;");
  }
  auto store = open_ok(path);
  CHECK(store->schema_version() == LockStore::kSchemaVersion);
  auto loaded = store->load();
  REQUIRE(loaded.ok());
  auto& snap = *loaded;
  REQUIRE(snap.locks.size() == 1);
  CHECK(snap.locks[0].lock_id == "old-lock");
  CHECK(snap.locks[0].who.agent.empty());  // v3 columns: nobody said
  CHECK(snap.locks[0].who.pid == 0);
  CHECK(snap.locks[0].hold_count == 3);
  CHECK(snap.locks[0].fence == 41);
  CHECK_FALSE(snap.locks[0].max_hold_ms);
  CHECK(snap.next_fence == 1066);
}

TEST_CASE("a version 2 database gains the holder columns and keeps its locks and queue",
          "[store]") {
  test::TempDir dir;
  const std::string path = dir.path() + "/locks.db";
  {
    // The schema as gate's v2 store wrote it.
    SQLite::Database db(path, SQLite::OPEN_READWRITE | SQLite::OPEN_CREATE);
    db.exec(
        "CREATE TABLE locks ("
        " lock_id TEXT PRIMARY KEY, key TEXT NOT NULL, mode TEXT NOT NULL,"
        " owner TEXT NOT NULL, session TEXT NOT NULL, acquired_at INTEGER NOT NULL,"
        " lease_expires_at INTEGER NOT NULL, lease_ms INTEGER NOT NULL,"
        " max_hold_ms INTEGER, hold_count INTEGER NOT NULL, fence INTEGER NOT NULL) WITHOUT ROWID;"
        "CREATE TABLE requests ("
        " req_id INTEGER PRIMARY KEY, key TEXT NOT NULL, mode TEXT NOT NULL,"
        " owner TEXT NOT NULL, session TEXT NOT NULL, request_id TEXT NOT NULL,"
        " requested_at INTEGER NOT NULL, lease_ms INTEGER NOT NULL, max_hold_ms INTEGER,"
        " deadline INTEGER);"
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;"
        "INSERT INTO locks VALUES ('v2-lock', 'a', 'write', 'o', 'm:1', 1, 2, 30000, 5000, 1, 7);"
        "INSERT INTO requests VALUES (3, 'a', 'read', 'p', 'm:2', 'rid', 5, 30000, NULL, NULL);"
        "INSERT INTO counters VALUES ('next_fence', 100);"
        "PRAGMA user_version = 2;");
  }
  {
    auto store = open_ok(path);
    CHECK(store->schema_version() == 3);
    auto snap = store->load();
    REQUIRE(snap.ok());
    REQUIRE(snap->locks.size() == 1);
    CHECK(snap->locks[0].lock_id == "v2-lock");
    CHECK(snap->locks[0].max_hold_ms == 5000);
    REQUIRE(snap->queue.size() == 1);
    CHECK(snap->queue[0].request_id == "rid");
    CHECK(snap->queue[0].who.agent.empty());
    CHECK(snap->next_fence == 100);
    // The migrated tables take holder information from now on.
    LockTable t = make_table();
    AcquireParams p{"b", LockMode::Write, "q", "m:3", "", std::nullopt, 5000, std::nullopt};
    p.who = {"aider", 77, "python3"};
    t.acquire(p, kNow);
    REQUIRE(store->apply(t.take_journal()).ok());
  }
  auto store = open_ok(path);
  auto snap = store->load();
  REQUIRE(snap.ok());
  auto it = std::find_if(snap->locks.begin(), snap->locks.end(),
                         [](const Lock& l) { return l.key == "b"; });
  REQUIRE(it != snap->locks.end());
  CHECK(it->who.agent == "aider");
  CHECK(it->who.pid == 77);
  CHECK(it->who.command == "python3");
}
