#include "mount/history_store.h"

#include <fcntl.h>
#include <git2.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <SQLiteCpp/SQLiteCpp.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "core/files.h"
#include "core/log.h"
#include "core/token.h"

namespace gate::mount {

namespace fs = std::filesystem;

namespace {

constexpr int kSchemaVersion = 2;
// Contents up to this size live in the index (a file each would cost an inode,
// which is most of what keeping a small version costs).
constexpr std::uint64_t kInlineBytes = 256 << 10;
// How many (key, version) pairs keep() remembers as kept before it starts afresh.
constexpr std::size_t kRecentlyKept = 100'000;
// Queued contents past this make keep() wait for the writer.
constexpr std::size_t kMaxPendingBytes = 32 << 20;

// Copies all of `in` into `out`: a reflink when the file system can, else
// copy_file_range, else read/write.
bool copy_content(int in, int out) {
  if (::ioctl(out, FICLONE, in) == 0) return true;
  off_t off_in = 0;
  for (;;) {
    ssize_t n = ::copy_file_range(in, &off_in, out, nullptr, 1 << 30, 0);
    if (n == 0) return true;
    if (n > 0) continue;
    if (errno == EINTR) continue;
    if (errno != EXDEV && errno != EINVAL && errno != ENOSYS && errno != EOPNOTSUPP) return false;
    break;
  }
  // Where copy_file_range cannot (some file systems, across devices): plain copies.
  if (::ftruncate(out, 0) != 0) return false;
  char buf[65536];
  for (off_t off = 0;;) {
    ssize_t n = ::pread(in, buf, sizeof buf, off);
    if (n == 0) return true;
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    if (!write_all_at(out, std::string_view(buf, static_cast<std::size_t>(n)), off)) return false;
    off += n;
  }
}

std::string errno_text(const std::string& what) { return what + ": " + std::strerror(errno); }

// The git blob id of a content ("" when libgit2 cannot hash it).
std::string blob_id(const std::string& data) {
  git_oid oid;
  if (git_odb_hash(&oid, data.data(), data.size(), GIT_OBJECT_BLOB) != 0) return "";
  char hex[GIT_OID_HEXSZ + 1];
  git_oid_tostr(hex, sizeof hex, &oid);
  return hex;
}

}  // namespace

// libgit2's init is counted: each one is matched by the destructor's shutdown.
HistoryStore::HistoryStore(HistoryOptions options) : options_(std::move(options)) {
  git_libgit2_init();
}
HistoryStore::~HistoryStore() {
  {
    std::lock_guard guard(q_m_);
    stopping_ = true;
  }
  q_cv_.notify_all();
  if (writer_.joinable()) writer_.join();
  git_libgit2_shutdown();
}

void HistoryStore::start() {
  std::lock_guard guard(q_m_);
  if (running_) return;
  running_ = true;
  writer_ = std::thread([this] { writer_main(); });
}

void HistoryStore::enqueue(Pending p) {
  std::unique_lock lock(q_m_);
  pending_bytes_ += p.data ? p.data->size() : 0;
  const bool first = pending_.empty();
  pending_.push_back(std::move(p));
  const std::uint64_t mine = ++queued_;
  if (!running_) {
    write_queued(lock);  // no writer (yet): at once, on this thread
    return;
  }
  if (first) q_cv_.notify_all();  // an idle writer sleeps until something is queued
  if (pending_bytes_ > kMaxPendingBytes) {
    // Bounded memory: wait for the writer, as flush() does.
    flush_now_ = true;
    q_cv_.notify_all();
    q_cv_.wait(lock, [&] { return written_ >= mine || stopping_; });
  }
}

void HistoryStore::flush() {
  std::unique_lock lock(q_m_);
  if (!running_) return;  // nothing is ever left queued without a writer
  const std::uint64_t target = queued_;
  flush_now_ = true;
  q_cv_.notify_all();
  q_cv_.wait(lock, [&] { return written_ >= target || stopping_; });
}

void HistoryStore::writer_main() {
  // Below the threads that answer the kernel: on a busy machine the index waits a
  // little (the queue is bounded), the saves do not.
  if (::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), 10) != 0)
    log(LogLevel::Debug, "mount", "history: could not lower the writer's priority: ", std::strerror(errno));
  std::unique_lock lock(q_m_);
  for (;;) {
    q_cv_.wait(lock, [&] { return stopping_ || flush_now_ || !pending_.empty(); });
    // Batches: wait a little for more, unless someone waits for the write.
    q_cv_.wait_for(lock, std::chrono::milliseconds(20), [&] { return stopping_ || flush_now_; });
    flush_now_ = false;
    if (pending_.empty()) {
      if (stopping_) break;
      continue;
    }
    write_queued(lock);
    q_cv_.notify_all();
  }
}

void HistoryStore::write_queued(std::unique_lock<std::mutex>& lock) {
  std::deque<Pending> batch;
  batch.swap(pending_);
  pending_bytes_ = 0;
  lock.unlock();
  write_batch(batch);
  lock.lock();
  written_ += batch.size();
}

void HistoryStore::write_batch(std::deque<Pending>& batch) {
  std::lock_guard guard(m_);
  try {
    SQLite::Transaction tx(*db_);
    std::int64_t added = 0;
    for (Pending& p : batch) {
      if (p.kept) {
        if (p.blob.empty()) p.blob = blob_id(*p.data);
        if (p.blob.empty()) continue;  // libgit2 could not hash it: not kept
        put_blob_->bind(1, p.blob);
        put_blob_->bind(2, static_cast<int64_t>(p.size));
        put_blob_->bind(3, static_cast<int64_t>(p.at));
        if (p.data) put_blob_->bind(4, p.data->data(), static_cast<int>(p.data->size()));
        else put_blob_->bind(4);
        if (put_blob_->exec() > 0) added += p.size;
        put_blob_->reset();
        put_kept_->bind(1, p.key);
        put_kept_->bind(2, static_cast<int64_t>(p.version));
        put_kept_->bind(3, p.blob);
        put_kept_->bind(4, static_cast<int64_t>(p.size));
        put_kept_->bind(5, static_cast<int64_t>(p.at));
        put_kept_->exec();
        put_kept_->reset();
      } else {
        auto& v = *put_made_;
        v.bind(1, p.key);
        v.bind(2, static_cast<int64_t>(p.version));
        v.bind(3, static_cast<int64_t>(p.at));
        v.bind(4, p.by.agent);
        v.bind(5, static_cast<int64_t>(p.by.pid));
        v.bind(6, p.by.command);
        v.bind(7, p.event);
        v.exec();
        v.reset();
      }
    }
    tx.commit();
    total_ += added;
    if (Status st = evict_locked(); !st.ok()) log(LogLevel::Warn, "mount", "history: ", st.message());
  } catch (const std::exception& e) {
    // tryReset: reset() throws the failed step's error again (as LockStore::apply).
    for (auto* st : {put_blob_.get(), put_kept_.get(), put_made_.get()}) st->tryReset();
    log(LogLevel::Warn, "mount", "history: could not write ", batch.size(),
        " entries to the index: ", e.what(), " (files are served as usual)");
  }
}

Result<std::unique_ptr<HistoryStore>> HistoryStore::open(HistoryOptions options) {
  std::error_code ec;
  fs::create_directories(options.dir + "/objects", ec);
  if (ec) return Status::failure("cannot create " + options.dir + "/objects: " + ec.message());
  // objects/00 .. objects/ff made once, so filing a content is one rename.
  for (int i = 0; i < 256; ++i) {
    const unsigned char byte = static_cast<unsigned char>(i);
    const std::string sub = options.dir + "/objects/" + hex_of(&byte, 1);
    if (::mkdir(sub.c_str(), 0700) != 0 && errno != EEXIST)
      return Status::failure(errno_text("cannot create " + sub));
  }
  const std::string path = options.dir + "/history.db";
  std::unique_ptr<HistoryStore> store(new HistoryStore(std::move(options)));
  try {
    store->db_ = std::make_unique<SQLite::Database>(
        path, SQLite::OPEN_READWRITE | SQLite::OPEN_CREATE | SQLite::OPEN_FULLMUTEX);
    store->db_->setBusyTimeout(2000);
    const int version = store->db_->execAndGet("PRAGMA user_version").getInt();
    if (version > kSchemaVersion)
      return Status::failure(path + " was written by a newer gate (history schema " +
                             std::to_string(version) + ")");
    store->db_->exec("PRAGMA journal_mode=WAL");
    // No fsync: a checkpoint's fsync in the middle of a save cost a quarter of
    // its time. A kill loses nothing (the OS has it); a power loss may lose recent
    // history or leave an index the next mount refuses (it then runs without one).
    store->db_->exec("PRAGMA synchronous=OFF");
    store->db_->exec(
        "CREATE TABLE IF NOT EXISTS versions ("
        " key TEXT NOT NULL, version INTEGER NOT NULL,"
        " made_at INTEGER NOT NULL DEFAULT 0, agent TEXT, pid INTEGER, command TEXT, event TEXT,"
        " blob TEXT, size INTEGER, kept_at INTEGER NOT NULL DEFAULT 0,"
        " PRIMARY KEY (key, version)) WITHOUT ROWID;"
        "CREATE INDEX IF NOT EXISTS versions_made ON versions (made_at);"
        "CREATE TABLE IF NOT EXISTS blobs ("
        " blob TEXT PRIMARY KEY, size INTEGER NOT NULL, kept_at INTEGER NOT NULL,"
        " data BLOB);"  // small contents in place, larger ones in objects/
        "CREATE INDEX IF NOT EXISTS blobs_age ON blobs (kept_at);"
        // Since schema 2: stale replacements merged, or installed as conflicts.
        "CREATE TABLE IF NOT EXISTS stale_saves ("
        " key TEXT NOT NULL, version INTEGER NOT NULL, theirs INTEGER NOT NULL,"
        " base INTEGER NOT NULL, at INTEGER NOT NULL, agent TEXT, pid INTEGER, command TEXT,"
        " merged INTEGER NOT NULL, reason TEXT, mine TEXT,"
        " PRIMARY KEY (key, version)) WITHOUT ROWID;"
        "CREATE INDEX IF NOT EXISTS stale_saves_at ON stale_saves (at);"
        "PRAGMA user_version = 2;");
    store->prepare();
    store->total_ = store->db_->execAndGet("SELECT coalesce(sum(size), 0) FROM blobs").getInt64();
  } catch (const std::exception& e) {
    return Status::failure("cannot use the history index " + path + ": " + e.what() +
                           " (move it aside to start a new history)");
  }
  return store;
}

void HistoryStore::prepare() {
  // Inserted only when new: `changes()` then says whether it added bytes.
  put_blob_ = std::make_unique<SQLite::Statement>(
      *db_, "INSERT OR IGNORE INTO blobs (blob, size, kept_at, data) VALUES (?,?,?,?)");
  put_kept_ = std::make_unique<SQLite::Statement>(
      *db_,
      "INSERT INTO versions (key, version, blob, size, kept_at) VALUES (?,?,?,?,?)"
      " ON CONFLICT(key, version) DO UPDATE SET blob=coalesce(blob, excluded.blob),"
      " size=coalesce(size, excluded.size),"
      " kept_at=CASE WHEN blob IS NULL THEN excluded.kept_at ELSE kept_at END");
  put_made_ = std::make_unique<SQLite::Statement>(
      *db_,
      "INSERT INTO versions (key, version, made_at, agent, pid, command, event)"
      " VALUES (?,?,?,?,?,?,?) ON CONFLICT(key, version) DO UPDATE SET"
      " made_at=excluded.made_at, agent=excluded.agent, pid=excluded.pid,"
      " command=excluded.command, event=excluded.event");
}

std::string HistoryStore::blob_path(const std::string& blob) const {
  if (blob.size() < 3) return "";
  return options_.dir + "/objects/" + blob.substr(0, 2) + "/" + blob.substr(2);
}

bool HistoryStore::room_for(std::uint64_t size, std::uint64_t* free_bytes) {
  std::lock_guard guard(vfs_m_);
  const Micros now = wall_clock_micros();
  if (now - vfs_checked_ > 1'000'000) {
    struct statvfs vfs {};
    vfs_free_ = ::statvfs(options_.dir.c_str(), &vfs) == 0
                    ? static_cast<std::uint64_t>(vfs.f_bavail) * vfs.f_frsize
                    : ~std::uint64_t{0};
    vfs_checked_ = now;
  }
  *free_bytes = vfs_free_;
  if (vfs_free_ < options_.min_free_bytes + size) return false;
  vfs_free_ -= std::min(vfs_free_, size);  // until the next look
  return true;
}

Status HistoryStore::store_content(int fd, std::uint64_t size, std::string* blob,
                                   std::optional<std::string>* inline_data) {
  git_oid oid;
  char hex[GIT_OID_HEXSZ + 1];
  if (size <= kInlineBytes) {
    // Small: read, and kept in the index itself (no inode per version).
    std::string data(size, '\0');
    std::size_t got = 0;
    while (got < size) {
      ssize_t n = ::pread(fd, data.data() + got, size - got, static_cast<off_t>(got));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return Status::failure(errno_text("cannot read"));
      if (n == 0) break;  // it shrank meanwhile: keep what is there
      got += static_cast<std::size_t>(n);
    }
    data.resize(got);
    // Hashed by the writer (blob_id()), off the path of the save.
    blob->clear();
    *inline_data = std::move(data);
    return {};
  }
  // Large: a reflink (or a copy) in objects/, hashed from the copy.
  const std::string tmp = options_.dir + "/objects/tmp-" + random_token();
  int out = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (out < 0) return Status::failure(errno_text("cannot create " + tmp));
  const bool copied = copy_content(fd, out);
  const int copy_errno = errno;
  ::close(out);
  if (!copied || git_odb_hashfile(&oid, tmp.c_str(), GIT_OBJECT_BLOB) != 0) {
    ::unlink(tmp.c_str());
    errno = copy_errno;
    return Status::failure(errno_text("cannot copy"));
  }
  git_oid_tostr(hex, sizeof hex, &oid);
  *blob = hex;
  const std::string path = blob_path(*blob);
  if (::access(path.c_str(), F_OK) == 0) {  // the same content is there already
    ::unlink(tmp.c_str());
    return {};
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    ::unlink(tmp.c_str());
    return Status::failure(errno_text("cannot store " + path));
  }
  return {};
}

std::optional<std::string> HistoryStore::content(const std::string& blob) {
  flush();
  {
    std::lock_guard guard(m_);
    try {
      SQLite::Statement q(*db_, "SELECT data FROM blobs WHERE blob=?");
      q.bind(1, blob);
      if (!q.executeStep()) return std::nullopt;  // never kept, or evicted
      if (!q.getColumn(0).isNull()) {
        const SQLite::Column c = q.getColumn(0);
        return std::string(static_cast<const char*>(c.getBlob()), static_cast<std::size_t>(c.getBytes()));
      }
    } catch (const std::exception&) {
      return std::nullopt;
    }
  }
  return read_file(blob_path(blob));
}

Status HistoryStore::keep(const std::string& key, std::uint64_t version, int fd, Micros now) {
  const std::string what = "version " + std::to_string(version) + " of " + key;
  {
    // Kept by this mount already (queued or written)? Without asking the index:
    // a read transaction costs more than the rest of a small keep. A version kept
    // before a restart may be copied again; the index keeps the first copy.
    std::lock_guard guard(q_m_);
    if (!recently_kept_.emplace(key, version).second) return {};
    if (recently_kept_.size() > kRecentlyKept) recently_kept_.clear();
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) return Status::failure(errno_text("cannot stat " + key));
  if (!S_ISREG(st.st_mode)) return {};
  const auto size = static_cast<std::uint64_t>(st.st_size);
  if (size > options_.max_file_bytes)
    return Status::failure(key + " is " + std::to_string(size) + " bytes, over --history-max-file (" +
                           std::to_string(options_.max_file_bytes) + "): its " + what +
                           " is not kept");
  std::uint64_t free_bytes = 0;
  if (!room_for(size, &free_bytes))
    return Status::failure("only " + std::to_string(free_bytes >> 20) + " MiB free in " +
                           options_.dir + ": " + what + " is not kept (history stops below " +
                           std::to_string(options_.min_free_bytes >> 20) + " MiB free)");
  // The content is filed outside the lock; only the index is under it.
  std::string blob;
  std::optional<std::string> data;
  if (Status filed = store_content(fd, size, &blob, &data); !filed.ok())
    return Status::failure(filed.message() + ": " + what + " is not kept");
  Pending p;
  p.kept = true;
  p.key = key;
  p.version = version;
  p.at = now;
  p.blob = std::move(blob);
  p.size = static_cast<std::int64_t>(size);
  p.data = std::move(data);
  enqueue(std::move(p));
  return {};
}

Status HistoryStore::evict_locked() try {
  while (total_ > static_cast<std::int64_t>(options_.max_total_bytes)) {
    SQLite::Statement oldest(*db_, "SELECT blob, size FROM blobs ORDER BY kept_at LIMIT 1");
    if (!oldest.executeStep()) break;
    const std::string blob = oldest.getColumn(0).getString();
    const std::int64_t size = oldest.getColumn(1).getInt64();
    ::unlink(blob_path(blob).c_str());
    SQLite::Statement del(*db_, "DELETE FROM blobs WHERE blob=?");
    del.bind(1, blob);
    del.exec();
    SQLite::Statement forget(*db_, "UPDATE versions SET blob=NULL WHERE blob=?");
    forget.bind(1, blob);
    forget.exec();
    total_ -= size;
  }
  return {};
} catch (const std::exception& e) {
  return Status::failure("history index (evicting): " + std::string(e.what()));
}

Status HistoryStore::made(const std::string& key, std::uint64_t version, Micros now,
                          const MadeBy& by, const std::string& event) {
  Pending p;
  p.key = key;
  p.version = version;
  p.at = now;
  p.by = by;
  p.event = event;
  enqueue(std::move(p));
  return {};
}

namespace {

HistoryEntry entry_of(SQLite::Statement& q) {
  HistoryEntry e;
  e.key = q.getColumn(0).getString();
  e.version = static_cast<std::uint64_t>(q.getColumn(1).getInt64());
  e.made_at = q.getColumn(2).getInt64();
  e.by.agent = q.getColumn(3).isNull() ? "" : q.getColumn(3).getString();
  e.by.pid = q.getColumn(4).isNull() ? 0 : q.getColumn(4).getInt64();
  e.by.command = q.getColumn(5).isNull() ? "" : q.getColumn(5).getString();
  e.event = q.getColumn(6).isNull() ? "" : q.getColumn(6).getString();
  e.blob = q.getColumn(7).isNull() ? "" : q.getColumn(7).getString();
  e.size = q.getColumn(8).isNull() ? -1 : q.getColumn(8).getInt64();
  e.kept_at = q.getColumn(9).getInt64();
  return e;
}

constexpr const char* kColumns =
    "SELECT key, version, made_at, agent, pid, command, event, blob, size, kept_at FROM versions";

}  // namespace

Result<std::vector<HistoryEntry>> HistoryStore::versions(const std::string& key) {
  flush();
  try {
    std::lock_guard guard(m_);
    SQLite::Statement q(*db_, std::string(kColumns) + " WHERE key=? ORDER BY version");
    q.bind(1, key);
    std::vector<HistoryEntry> out;
    while (q.executeStep()) out.push_back(entry_of(q));
    return out;
  } catch (const std::exception& e) {
    return Status::failure("history index: " + std::string(e.what()));
  }
}

Result<std::vector<HistoryEntry>> HistoryStore::changes(Micros since, const std::string& agent) {
  flush();
  try {
    std::lock_guard guard(m_);
    SQLite::Statement q(*db_, std::string(kColumns) +
                                  " WHERE made_at > 0 AND made_at >= ? AND (? = '' OR agent = ?)"
                                  " ORDER BY made_at DESC, version DESC");
    q.bind(1, static_cast<int64_t>(since));
    q.bind(2, agent);
    q.bind(3, agent);
    std::vector<HistoryEntry> out;
    while (q.executeStep()) out.push_back(entry_of(q));
    return out;
  } catch (const std::exception& e) {
    return Status::failure("history index: " + std::string(e.what()));
  }
}

std::optional<std::string> HistoryStore::content_of(const std::string& key, std::uint64_t version) {
  flush();
  std::string blob;
  try {
    std::lock_guard guard(m_);
    SQLite::Statement q(*db_, "SELECT blob FROM versions WHERE key=? AND version=?");
    q.bind(1, key);
    q.bind(2, static_cast<int64_t>(version));
    if (!q.executeStep() || q.getColumn(0).isNull()) return std::nullopt;
    blob = q.getColumn(0).getString();
  } catch (const std::exception&) {
    return std::nullopt;
  }
  return content(blob);
}

Result<std::string> HistoryStore::keep_data(const std::string& data, Micros now) {
  const std::string blob = blob_id(data);
  if (blob.empty()) return Status::failure("cannot hash");
  std::uint64_t free_bytes = 0;
  if (!room_for(data.size(), &free_bytes))
    return Status::failure("only " + std::to_string(free_bytes >> 20) + " MiB free in " + options_.dir);
  std::lock_guard guard(m_);
  try {
    put_blob_->bind(1, blob);
    put_blob_->bind(2, static_cast<int64_t>(data.size()));
    put_blob_->bind(3, static_cast<int64_t>(now));
    put_blob_->bind(4, data.data(), static_cast<int>(data.size()));
    if (put_blob_->exec() > 0) total_ += static_cast<std::int64_t>(data.size());
    put_blob_->reset();
  } catch (const std::exception& e) {
    put_blob_->tryReset();  // under the lock, and without throwing again
    return Status::failure("history index: " + std::string(e.what()));
  }
  return blob;
}

Status HistoryStore::record_stale(const StaleSave& s) {
  // No flush: readers of stale_saves (and of the versions it names) flush first,
  // and this runs while the saving agent's lock is still held.
  try {
    std::lock_guard guard(m_);
    SQLite::Statement q(*db_,
                        "INSERT OR REPLACE INTO stale_saves (key, version, theirs, base, at, agent,"
                        " pid, command, merged, reason, mine) VALUES (?,?,?,?,?,?,?,?,?,?,?)");
    q.bind(1, s.key);
    q.bind(2, static_cast<int64_t>(s.version));
    q.bind(3, static_cast<int64_t>(s.theirs));
    q.bind(4, static_cast<int64_t>(s.base));
    q.bind(5, static_cast<int64_t>(s.at));
    q.bind(6, s.by.agent);
    q.bind(7, static_cast<int64_t>(s.by.pid));
    q.bind(8, s.by.command);
    q.bind(9, s.merged ? 1 : 0);
    q.bind(10, s.reason);
    q.bind(11, s.mine);
    q.exec();
    return {};
  } catch (const std::exception& e) {
    return Status::failure("history index: " + std::string(e.what()));
  }
}

Result<std::vector<StaleSave>> HistoryStore::stale_saves(Micros since, const std::string& key,
                                                         bool merged_too) {
  flush();
  try {
    std::lock_guard guard(m_);
    SQLite::Statement q(*db_,
                        "SELECT key, version, theirs, base, at, agent, pid, command, merged, reason,"
                        " mine FROM stale_saves WHERE at >= ? AND (? = '' OR key = ?)"
                        " AND (? OR merged = 0) ORDER BY at DESC, version DESC");
    q.bind(1, static_cast<int64_t>(since));
    q.bind(2, key);
    q.bind(3, key);
    q.bind(4, merged_too ? 1 : 0);
    std::vector<StaleSave> out;
    while (q.executeStep()) {
      StaleSave s;
      s.key = q.getColumn(0).getString();
      s.version = static_cast<std::uint64_t>(q.getColumn(1).getInt64());
      s.theirs = static_cast<std::uint64_t>(q.getColumn(2).getInt64());
      s.base = static_cast<std::uint64_t>(q.getColumn(3).getInt64());
      s.at = q.getColumn(4).getInt64();
      s.by.agent = q.getColumn(5).getString();
      s.by.pid = q.getColumn(6).getInt64();
      s.by.command = q.getColumn(7).getString();
      s.merged = q.getColumn(8).getInt() != 0;
      s.reason = q.getColumn(9).getString();
      s.mine = q.getColumn(10).getString();
      out.push_back(std::move(s));
    }
    return out;
  } catch (const std::exception& e) {
    return Status::failure("history index: " + std::string(e.what()));
  }
}

std::uint64_t HistoryStore::total_bytes() {
  flush();
  std::lock_guard guard(m_);
  return static_cast<std::uint64_t>(total_);
}

}  // namespace gate::mount
