#pragma once
// SourceWatch: inotify on the directories of the source that the kernel knows (the
// InodeTable's, as its DirWatcher), so that a change made beside the mount -- in the
// source directly, or through another mount of it -- reaches the kernel's caches of
// names and attributes (GateFs::Impl::on_source_changes). Events are gathered until
// the source has been quiet for kSettle (at most kMaxDelay after the first), then
// handed over in one batch with one entry per (directory, name).
#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/files.h"
#include "mount/inode_table.h"

namespace gate::mount {

class SourceWatch final : public DirWatcher {
 public:
  static constexpr std::chrono::milliseconds kSettle{5};
  static constexpr std::chrono::milliseconds kMaxDelay{50};

  struct Change {
    ino_t dir_ino = 0;
    dev_t dir_dev = 0;
    std::string name;   // empty: the directory itself
    std::uint32_t mask = 0;  // IN_* bits seen for it in this batch
  };
  // `lost`: the kernel's queue overflowed, so anything may have changed.
  using Handler = std::function<void(const std::vector<Change>& changes, bool lost)>;

  // Null, and *why, when inotify cannot be had (or the source is a file system that
  // does not report every change to it, such as NFS, FUSE or virtio-fs).
  static std::unique_ptr<SourceWatch> open(int source_fd, std::string* why);
  ~SourceWatch() override;

  // DirWatcher (under the table's mutex). add() answers -1 when the directory cannot
  // be watched; complete() turns false then, for good.
  int add(int dir_fd, ino_t ino, dev_t dev) override;
  void remove(int id) override;
  bool complete() const { return complete_.load(std::memory_order_relaxed); }
  // Directories watched now, and batches handed to the handler (and returned) so far.
  std::size_t dirs() const;
  std::uint64_t batches() const { return batches_.load(std::memory_order_acquire); }

  // Runs `handler` on the watch's own thread for each batch until stop().
  void start(Handler handler);
  void stop();

 private:
  explicit SourceWatch(UniqueFd inotify, UniqueFd wake);
  void main();

  UniqueFd inotify_;
  UniqueFd wake_;  // eventfd: stop()
  Handler handler_;
  std::thread thread_;
  std::atomic<bool> complete_{true};
  std::atomic<std::uint64_t> batches_{0};
  mutable std::mutex m_;
  std::unordered_map<int, std::pair<ino_t, dev_t>> dirs_;  // guarded by m_
};

}  // namespace gate::mount
