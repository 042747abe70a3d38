// Helper for bench/mount_bench.sh: the file-level loops, timed in-process so that
// process start-up does not drown what is measured.
//   mount_bench files DIR N BYTES   create+write+close N files, then open+read+close
//   mount_bench small DIR N BYTES   the same, printing "CREATE READ" in files/s only
//   mount_bench tree DIR D F        mkdir D directories of F small files each: files/s
//   mount_bench seq FILE MIB        write MIB MiB in 1 MiB blocks and fsync, then read
//                                   it back through a new open: "WRITE READ" in MiB/s
//   mount_bench rewrite DIR N BYTES create N files, then rewrite each twice (O_TRUNC,
//                                   new content) as agents save: what history costs
//   mount_bench rewrite-ab A B N BYTES  the same saves in A and B, interleaved (4 passes):
//                                   the cost of B over A with the machine's noise shared
//   mount_bench openclose FILE N    open+close of one existing file, N times: per second
//   mount_bench hold DIR N          open N files read-only, print "held", wait for stdin EOF
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct SmallFiles {
  double create_per_s = 0, read_per_s = 0;
};

// Creates n files of `bytes` in dir, then reads each back: files per second of each.
bool small_files(const std::string& dir, int n, std::size_t bytes, SmallFiles* out) {
  std::string data(bytes, 'x');
  auto t0 = Clock::now();
  for (int i = 0; i < n; ++i) {
    std::string path = dir + "/f" + std::to_string(i);
    int fd = ::open(path.c_str(), O_CREAT | O_WRONLY | O_TRUNC, 0644);
    if (fd < 0 || ::write(fd, data.data(), bytes) != static_cast<ssize_t>(bytes)) {
      std::perror(path.c_str());
      return false;
    }
    ::close(fd);
  }
  double create = since(t0);
  std::vector<char> buf(bytes);
  t0 = Clock::now();
  for (int i = 0; i < n; ++i) {
    std::string path = dir + "/f" + std::to_string(i);
    int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0 || ::read(fd, buf.data(), bytes) != static_cast<ssize_t>(bytes)) {
      std::perror(path.c_str());
      return false;
    }
    ::close(fd);
  }
  out->create_per_s = n / create;
  out->read_per_s = n / since(t0);
  return true;
}

int files(const std::string& dir, int n, std::size_t bytes, bool numbers_only) {
  SmallFiles f;
  if (!small_files(dir, n, bytes, &f)) return 1;
  if (numbers_only)
    std::printf("%.0f %.0f\n", f.create_per_s, f.read_per_s);
  else
    std::printf("create+write+close %d x %zu B: %.0f files/s; open+read+close: %.0f files/s\n", n,
                bytes, f.create_per_s, f.read_per_s);
  return 0;
}

// A source tree as a checkout makes it: d directories of f small files each.
int tree(const std::string& dir, int d, int f) {
  auto t0 = Clock::now();
  for (int i = 0; i < d; ++i) {
    const std::string sub = dir + "/d" + std::to_string(i);
    if (::mkdir(sub.c_str(), 0755) != 0) {
      std::perror(sub.c_str());
      return 1;
    }
    for (int j = 0; j < f; ++j) {
      const std::string path = sub + "/f" + std::to_string(j) + ".c";
      const std::string data = "int f" + std::to_string(i) + "_" + std::to_string(j) + ";\n";
      int fd = ::open(path.c_str(), O_CREAT | O_WRONLY | O_TRUNC, 0644);
      if (fd < 0 || ::write(fd, data.data(), data.size()) != static_cast<ssize_t>(data.size())) {
        std::perror(path.c_str());
        return 1;
      }
      ::close(fd);
    }
  }
  std::printf("%.0f\n", d * f / since(t0));
  return 0;
}

// Sequential write (1 MiB blocks, fsync included) and read through a new open.
int seq(const std::string& file, int mib) {
  std::vector<char> block(1 << 20, 'q');
  int fd = ::open(file.c_str(), O_CREAT | O_WRONLY | O_TRUNC, 0644);
  if (fd < 0) return std::perror(file.c_str()), 1;
  auto t0 = Clock::now();
  for (int i = 0; i < mib; ++i)
    if (::write(fd, block.data(), block.size()) != static_cast<ssize_t>(block.size()))
      return std::perror(file.c_str()), 1;
  if (::fsync(fd) != 0) return std::perror(file.c_str()), 1;
  ::close(fd);
  const double write_s = since(t0);
  fd = ::open(file.c_str(), O_RDONLY);
  if (fd < 0) return std::perror(file.c_str()), 1;
  t0 = Clock::now();
  long long total = 0;
  for (ssize_t n; (n = ::read(fd, block.data(), block.size())) > 0;) total += n;
  ::close(fd);
  if (total != static_cast<long long>(mib) << 20) {
    std::fprintf(stderr, "%s: read %lld bytes back, wrote %d MiB\n", file.c_str(), total, mib);
    return 1;
  }
  std::printf("%.0f %.0f\n", mib / write_s, mib / since(t0));
  return 0;
}

// One save as editors and agents make it: O_TRUNC, write, close.
bool save_file(const std::string& path, const std::string& data) {
  int fd = ::open(path.c_str(), O_CREAT | O_WRONLY | O_TRUNC, 0644);
  bool ok = fd >= 0 && ::write(fd, data.data(), data.size()) == static_cast<ssize_t>(data.size());
  if (fd >= 0) ::close(fd);
  if (!ok) std::perror(path.c_str());
  return ok;
}

int rewrite(const std::string& dir, int n, std::size_t bytes) {
  auto save = [&](int i, char fill) {
    return save_file(dir + "/r" + std::to_string(i), std::string(bytes, fill));
  };
  for (int i = 0; i < n; ++i)
    if (!save(i, 'a')) return 1;
  auto t0 = Clock::now();
  for (char fill : {'b', 'c'})
    for (int i = 0; i < n; ++i)
      if (!save(i, fill)) return 1;
  double t = since(t0);
  std::printf("rewrite (O_TRUNC+write+close) %d x %zu B: %.3f s (%.0f saves/s)\n", 2 * n, bytes, t,
              2 * n / t);
  return 0;
}

// The same saves in two directories (the two sides of a comparison, e.g. a mount
// with history and one without), interleaved in chunks of 50 and in alternating
// order, so that the machine's slow moments fall on both sides alike. Each save
// writes a content of its own (nothing for a store to deduplicate).
int rewrite_ab(const std::string& dir_a, const std::string& dir_b, int n, std::size_t bytes) {
  auto save = [&](const std::string& dir, int i, int pass) {
    std::string data(bytes, static_cast<char>('a' + pass % 26));
    const std::string head = "pass " + std::to_string(pass) + " file " + std::to_string(i) + "\n";
    data.replace(0, std::min(head.size(), bytes), head, 0, std::min(head.size(), bytes));
    return save_file(dir + "/r" + std::to_string(i), data);
  };
  for (int i = 0; i < n; ++i)
    if (!save(dir_a, i, 0) || !save(dir_b, i, 0)) return 1;
  constexpr int kPasses = 4, kChunk = 50;
  double t[2] = {0, 0};
  const std::string* dirs[2] = {&dir_a, &dir_b};
  int turn = 0;
  for (int pass = 1; pass <= kPasses; ++pass)
    for (int from = 0; from < n; from += kChunk, ++turn)
      for (int k = 0; k < 2; ++k) {
        const int side = (turn + k) % 2;
        auto t0 = Clock::now();
        for (int i = from; i < std::min(n, from + kChunk); ++i)
          if (!save(*dirs[side], i, pass)) return 1;
        t[side] += since(t0);
      }
  const double saves = static_cast<double>(kPasses) * n;
  std::printf("rewrite A %s: %.0f saves/s; B %s: %.0f saves/s; B takes %+.1f%% of A's time\n",
              dir_a.c_str(), saves / t[0], dir_b.c_str(), saves / t[1], 100.0 * (t[1] - t[0]) / t[0]);
  return 0;
}

int openclose(const std::string& file, int n) {
  auto t0 = Clock::now();
  for (int i = 0; i < n; ++i) {
    int fd = ::open(file.c_str(), O_RDONLY);
    if (fd < 0) {
      std::perror(file.c_str());
      return 1;
    }
    ::close(fd);
  }
  double s = since(t0);
  std::printf("%.0f\n", n / s);
  return 0;
}

int hold(const std::string& dir, int n) {
  std::vector<int> fds;
  for (int i = 0; i < n; ++i) {
    std::string path = dir + "/h" + std::to_string(i);
    int fd = ::open(path.c_str(), O_CREAT | O_RDONLY, 0644);
    if (fd < 0) {
      std::perror(path.c_str());
      return 1;
    }
    fds.push_back(fd);
  }
  std::printf("held\n");
  std::fflush(stdout);
  char c;
  while (::read(0, &c, 1) > 0) {
  }
  for (int fd : fds) ::close(fd);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string cmd = argc > 1 ? argv[1] : "";
  if ((cmd == "files" || cmd == "small") && argc == 5)
    return files(argv[2], std::atoi(argv[3]), std::strtoul(argv[4], nullptr, 10), cmd == "small");
  if (cmd == "tree" && argc == 5) return tree(argv[2], std::atoi(argv[3]), std::atoi(argv[4]));
  if (cmd == "seq" && argc == 4) return seq(argv[2], std::atoi(argv[3]));
  if (cmd == "rewrite" && argc == 5) return rewrite(argv[2], std::atoi(argv[3]), std::strtoul(argv[4], nullptr, 10));
  if (cmd == "rewrite-ab" && argc == 6)
    return rewrite_ab(argv[2], argv[3], std::atoi(argv[4]), std::strtoul(argv[5], nullptr, 10));
  if (cmd == "openclose" && argc == 4) return openclose(argv[2], std::atoi(argv[3]));
  if (cmd == "hold" && argc == 4) return hold(argv[2], std::atoi(argv[3]));
  std::fprintf(stderr,
               "usage: mount_bench files|small|rewrite DIR N BYTES | rewrite-ab DIR_A DIR_B N BYTES |\n"
               "       tree DIR D F | seq FILE MIB | openclose FILE N | hold DIR N\n");
  return 2;
}
