#pragma once
// HistoryStore: what a mount keeps of each version of the files it serves, so that
// nothing an agent overwrites is lost.
//
// - keep(): before the first change of a version (a write, a truncate, an O_TRUNC
//   open, a rename onto the file, an unlink), the mount hands over the file's
//   current content with the broker's version of it. The content goes into a
//   content-addressed store, <dir>/objects/<git blob id> (FICLONE where the file
//   system has reflinks, a copy elsewhere; equal contents are kept once), indexed
//   in <dir>/history.db (SQLite).
// - made(): when a change is released, the mount records the new version, when
//   and by whom (agent, process, command) it was made, and how ("write",
//   "rename", "unlink", ...).
// - Bounds: files over max_file_bytes are not kept; the store holds at most
//   max_total_bytes (the oldest contents go first); below min_free_bytes of free
//   space it keeps nothing more. Each skipped content is said once in the log.
// - Best effort: every call returns a Status for the log and never throws; a
//   store that cannot be written (full disk, unreadable, corrupt) never makes a
//   file operation fail.
// - Index writes are queued and written in batches, one transaction each, by a
//   writer thread (start(); it runs at nice 10, below the threads that answer the
//   kernel), so a save waits for no SQLite commit; flush() waits
//   until everything queued so far is written, and every read flushes first.
//   Before start() (and in tests) each call writes at once. Memory is bounded:
//   past 32 MiB of queued contents a keep() waits for the writer.
// Thread-safe: the copy happens outside the store's locks.
#include <sys/types.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <set>
#include <thread>
#include <utility>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "core/iso_time.h"
#include "core/status.h"

namespace SQLite {
class Database;
class Statement;
}

namespace gate::mount {

struct HistoryOptions {
  std::string dir;
  std::uint64_t max_file_bytes = 8ull << 20;
  std::uint64_t max_total_bytes = 1ull << 30;
  std::uint64_t min_free_bytes = 256ull << 20;
};

struct MadeBy {
  std::string agent;
  std::int64_t pid = 0;
  std::string command;
};

// One version of one key, as the store knows it.
struct HistoryEntry {
  std::string key;
  std::uint64_t version = 0;
  Micros made_at = 0;      // 0: made elsewhere (before this mount, or outside it)
  MadeBy by;
  std::string event;       // "write", "truncate", "create", "rename", "unlink", ...
  std::string blob;        // content id; empty: not kept (or evicted)
  std::int64_t size = -1;  // of the kept content
  Micros kept_at = 0;
};

// A stale replacement the mount merged, or could not (locking.md): `version` is
// what the agent's save made (the merged content, or its own on a conflict),
// `theirs` the version it replaced, `base` the read it was merged against (0: none).
struct StaleSave {
  std::string key;
  std::uint64_t version = 0, theirs = 0, base = 0;
  Micros at = 0;
  MadeBy by;
  bool merged = false;   // else a conflict: the agent's content was installed as is
  std::string reason;    // of a conflict
  std::string mine;      // blob id of what the agent wrote (kept as it was)
};

class HistoryStore {
 public:
  // Creates <dir> and its index as needed; fails when they cannot be used.
  static Result<std::unique_ptr<HistoryStore>> open(HistoryOptions options);
  // Ends the writer thread after it wrote everything queued.
  ~HistoryStore();

  // Starts the writer thread (after any fork: threads do not survive one).
  void start();
  // Returns once everything queued before the call is in the index.
  void flush();

  // Keeps the content of `key` at `version`, read from `fd` (an open descriptor of
  // the file, not moved), unless that version is kept already.
  Status keep(const std::string& key, std::uint64_t version, int fd, Micros now);
  // Records that `version` of `key` was made at `now` by `by`, through `event`.
  Status made(const std::string& key, std::uint64_t version, Micros now, const MadeBy& by,
              const std::string& event);

  // Versions of `key`, oldest first.
  Result<std::vector<HistoryEntry>> versions(const std::string& key);
  // Changes across the tree made since `since` (and by `agent` when not empty),
  // newest first.
  Result<std::vector<HistoryEntry>> changes(Micros since, const std::string& agent);
  // A kept content; nullopt when it is not there (never kept, or evicted).
  std::optional<std::string> content(const std::string& blob);
  // The kept content of `version` of `key`; nullopt when not kept (or evicted).
  std::optional<std::string> content_of(const std::string& key, std::uint64_t version);
  // Keeps `data` (as is, whatever its size) and answers its blob id.
  Result<std::string> keep_data(const std::string& data, Micros now);
  // Records a merged or conflicting stale replacement.
  Status record_stale(const StaleSave& s);
  // Those recorded since `since` (for `key` when not empty; conflicts only unless
  // `merged_too`), newest first.
  Result<std::vector<StaleSave>> stale_saves(Micros since, const std::string& key, bool merged_too);
  std::uint64_t total_bytes();
  const HistoryOptions& options() const { return options_; }

 private:
  explicit HistoryStore(HistoryOptions options);
  void prepare();
  Status evict_locked();  // m_ held

  struct Pending {
    bool kept = false;  // a kept content (else a made version)
    std::string key;
    std::uint64_t version = 0;
    Micros at = 0;
    std::string blob;
    std::int64_t size = 0;
    std::optional<std::string> data;
    MadeBy by;
    std::string event;
  };
  void enqueue(Pending p);
  void writer_main();
  // Takes the queue and writes it (q_m_ held on entry and exit, not while writing).
  void write_queued(std::unique_lock<std::mutex>& lock);
  // Writes a batch in one transaction (takes m_); a failure is logged.
  void write_batch(std::deque<Pending>& batch);
  // Whether the disk has room for `size` more bytes above the floor (statvfs at
  // most once a second).
  bool room_for(std::uint64_t size, std::uint64_t* free_bytes);
  // Files the content under its id; the id in *blob. Small files are read into
  // *inline_data (*blob left empty: the writer hashes them, off the save's path),
  // larger ones cloned (or copied) and hashed from the copy.
  Status store_content(int fd, std::uint64_t size, std::string* blob,
                       std::optional<std::string>* inline_data);
  std::string blob_path(const std::string& blob) const;  // of a large content

  HistoryOptions options_;
  std::mutex m_;
  std::unique_ptr<SQLite::Database> db_;
  std::unique_ptr<SQLite::Statement> put_blob_, put_kept_, put_made_;
  std::int64_t total_ = 0;  // bytes in blobs (m_)
  // The queue (q_m_): what is not written yet, and how far the writer got.
  std::mutex q_m_;
  std::condition_variable q_cv_;
  std::deque<Pending> pending_;
  std::set<std::pair<std::string, std::uint64_t>> recently_kept_;
  std::size_t pending_bytes_ = 0;
  std::uint64_t queued_ = 0, written_ = 0;
  bool flush_now_ = false, stopping_ = false, running_ = false;
  std::thread writer_;

  std::mutex vfs_m_;
  Micros vfs_checked_ = 0;
  std::uint64_t vfs_free_ = 0;
};

}  // namespace gate::mount
