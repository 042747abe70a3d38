// The kernel's caches of a view: names and attributes kept until the mount learns of
// a change (SourceWatch), and file contents kept across opens while the file is as
// it was when the kernel read or wrote it.
#include <fcntl.h>
#include <sys/inotify.h>
#include <sys/stat.h>

#include <unordered_set>

#include "core/log.h"
#include "mount/gate_fs_impl.h"

namespace gate::mount {

namespace {

Inode::Stamp stamp_of(const struct stat& st, std::uint64_t version) {
  return {.valid = true, .size = st.st_size, .mtime = st.st_mtim, .ctime = st.st_ctim, .version = version};
}

bool same(const timespec& a, const timespec& b) { return a.tv_sec == b.tv_sec && a.tv_nsec == b.tv_nsec; }

bool same(const Inode::Stamp& a, const Inode::Stamp& b) {
  return a.valid && b.valid && a.size == b.size && same(a.mtime, b.mtime) && same(a.ctime, b.ctime) &&
         a.version == b.version;
}

constexpr std::uint32_t kNameEvents = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO;
constexpr std::uint32_t kAttrEvents = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE;

}  // namespace

bool GateFs::Impl::keep_cache_at_open(Inode& in, int fd, std::uint64_t version, const struct stat* known) {
  struct stat st {};
  if (known) st = *known;
  else if (::fstat(fd, &st) != 0) return false;
  const Inode::Stamp now = stamp_of(st, version);
  bool keep = false, changed = false;
  {
    std::lock_guard lock(in.cache_m);
    keep = same(in.stamp, now);
    changed = in.stamp.valid && !keep;
    in.stamp = now;
  }
  // Changed since the kernel last saw it: its attributes (the size a read stops at)
  // may be older than the watch's news of the change, so they go too.
  if (changed && se) fuse_lowlevel_notify_inval_inode(se, inodes->id(in), -1, 0);
  return keep;
}

void GateFs::Impl::note_cached_content(Inode& in, int fd, std::uint64_t version, bool changed_behind) {
  struct stat st {};
  const bool known = !changed_behind && ::fstat(fd, &st) == 0;
  std::lock_guard lock(in.cache_m);
  in.stamp = known ? stamp_of(st, version) : Inode::Stamp{};
}

void GateFs::Impl::choose_io(Opening& o, Inode& kin) {
  FileHandle* h = o.h;
  const bool reads_only = (o.f.flags & O_ACCMODE) == O_RDONLY && !(o.f.flags & O_TRUNC);
  // What the kernel may cache or read from below: the file its inode is (not one that
  // took the name meanwhile), without O_DIRECT.
  const bool plain = !o.redirected && !(o.f.flags & O_DIRECT);
  // With --passthrough-writes, also a writer whose file the open made or emptied: the
  // history has nothing (more) to keep of it, and its release changes the version
  // anyway. Not a stale replacement, which is merged at release.
  const bool fresh_writer = opts.passthrough_writes && !reads_only && (o.created || (o.f.flags & O_TRUNC)) &&
                            h->stale_reads.empty();
  const bool straight = plain && (reads_only || fresh_writer);
  bool joined = false;  // a writer beside handles that go straight (below)
  {
    std::lock_guard lock(kin.io_m);
    // The kernel opens the file below anew for every open that goes straight, with
    // that open's flags: the registration only names the file, and stays for the next
    // open until the inode leaves the table.
    if (kin.backing_id == 0 && kin.cached == 0 && straight && passthrough.on())
      kin.backing_id = passthrough.open_backing(kin.fd, kin.src_dev);
    if (kin.backing_id > 0 && (kin.through > 0 || (straight && kin.cached == 0 && passthrough.on()))) {
      // Every open of an inode open straight must be too (with its backing id), or
      // the kernel fails it with EIO.
      ++kin.through;
      h->io = FileHandle::Io::Through;
      h->io_ino = inodes->id(kin);
      o.backing_id = kin.backing_id;
      if (straight && (reads_only || kin.through == 1)) {
        passthrough.count_open();
      } else {
        // Not to go straight (a writer, while others read straight; possible only
        // without locks, with GATE_RELEASE_ON_FLUSH=1 or after a lost lock): its reads
        // and writes go through the daemon (direct), but the kernel maps the file
        // below for it.
        o.f.direct_io = 1;
        joined = !reads_only;
      }
    } else if (!plain) {
      h->io = FileHandle::Io::Direct;  // neither counts nor minds the others
    } else {
      ++kin.cached;
      h->io = FileHandle::Io::Cached;
      h->io_ino = inodes->id(kin);
    }
  }
  // Outside the inode's lock, which every open and release of the file takes: the
  // history may copy the whole file.
  if (h->io == FileHandle::Io::Through && !reads_only && !o.f.direct_io) {
    keep_first_change(h);  // a new file's first version, as a write would
  } else if (joined) {
    // A shared mapping of it writes past the daemon: what that replaces is kept now,
    // and the release compares the file with how it is now (see changed_below).
    keep_first_change(h);
    struct stat st {};
    if (::fstat(h->fd, &st) == 0) h->mapped_from = st;
  }
}

void GateFs::Impl::end_io(FileHandle* h) {
  if (h->io == FileHandle::Io::Direct) return;
  Inode& in = inode(h->io_ino);
  std::lock_guard lock(in.io_m);
  // The kernel let go of its own when the handle closed, before it sent the release;
  // a registered file stays registered for the next open (an ioctl each way saved).
  if (h->io == FileHandle::Io::Cached) --in.cached;
  else --in.through;
}

bool GateFs::Impl::changed_below(const FileHandle* h) {
  if (!h->mapped_from) return false;
  struct stat now {};
  if (::fstat(h->fd, &now) != 0) return true;
  const struct stat& then = *h->mapped_from;
  return now.st_size != then.st_size || !same(now.st_mtim, then.st_mtim) || !same(now.st_ctim, then.st_ctim);
}

void GateFs::Impl::forget_entry(fuse_ino_t parent, const std::string& name) {
  if (!se || !parent) return;
  notifier.post([this, se = se, parent, name] {
    if (notifying) fuse_lowlevel_notify_inval_entry(se, parent, name.c_str(), name.size());
  });
}

void GateFs::Impl::forget_content(fuse_ino_t id) {
  if (!se || !id) return;
  // Dropping pages takes their locks, which a read waiting for this daemon may hold:
  // never on a FUSE worker or act thread.
  notifier.post([this, se = se, id] {
    if (notifying) fuse_lowlevel_notify_inval_inode(se, id, 0, 0);
  });
}

void GateFs::Impl::on_source_changes(const std::vector<SourceWatch::Change>& changes, bool lost) {
  if (!se || !notifying) return;
  // Attributes are dropped at once: that takes no lock of the kernel's. A name, a
  // directory's list and a file's content go through the notifier.
  std::unordered_set<fuse_ino_t> attrs, contents;
  if (lost) {
    log(LogLevel::Warn, "mount", "changes to the source came faster than they could be read; "
        "the kernel forgets every name and attribute of the view");
    inodes->for_each([&](fuse_ino_t parent, const std::string& name, fuse_ino_t id) {
      contents.insert(id);
      if (parent) forget_entry(parent, name);
    });
  }
  for (const SourceWatch::Change& c : changes) {
    const NameSeen seen = inodes->seen(c.dir_ino, c.dir_dev, c.name);
    if (!seen.parent) continue;
    if (c.name.empty()) {
      attrs.insert(seen.parent);
      continue;
    }
    if (c.mask & kNameEvents) {
      // The directory's list (and attributes) go; a name the kernel may hold for an
      // object no longer there is forgotten. (A name it does not hold needs nothing:
      // this daemon never answers a lookup with a cached "no such file".)
      contents.insert(seen.parent);
      if (seen.named && !seen.still_there) forget_entry(seen.parent, c.name);
    }
    if (!seen.named || !(c.mask & (kAttrEvents | kNameEvents))) continue;
    // A file's content goes unless it is what the kernel cached: the mount's own
    // writes, in the cache already (a handle writing now, or one that wrote last).
    // (The stamp's own version: the watch knows none, only what the file looks like.)
    const bool ours = seen.still_there &&
                      (seen.writers > 0 || same(seen.stamp, stamp_of(seen.now, seen.stamp.version)));
    if ((c.mask & (IN_MODIFY | IN_CLOSE_WRITE)) && !ours) contents.insert(seen.named);
    else attrs.insert(seen.named);
  }
  for (fuse_ino_t id : contents) {
    attrs.erase(id);
    forget_content(id);
  }
  for (fuse_ino_t id : attrs) fuse_lowlevel_notify_inval_inode(se, id, -1, 0);
}

}  // namespace gate::mount
