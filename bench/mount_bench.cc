// Helper for bench/mount_bench.sh: the file-level loops, timed in-process so that
// process start-up does not drown what is measured.
//   mount_bench files DIR N BYTES   create+write+close N files, then open+read+close
//   mount_bench rewrite DIR N BYTES create N files, then rewrite each twice (O_TRUNC,
//                                   new content) as agents save: what history costs
//   mount_bench openclose FILE N    open+close of one existing file, N times
//   mount_bench hold DIR N          open N files read-only, print "held", wait for stdin EOF
#include <fcntl.h>
#include <unistd.h>

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

int files(const std::string& dir, int n, std::size_t bytes) {
  std::string data(bytes, 'x');
  auto t0 = Clock::now();
  for (int i = 0; i < n; ++i) {
    std::string path = dir + "/f" + std::to_string(i);
    int fd = ::open(path.c_str(), O_CREAT | O_WRONLY | O_TRUNC, 0644);
    if (fd < 0 || ::write(fd, data.data(), bytes) != static_cast<ssize_t>(bytes)) {
      std::perror(path.c_str());
      return 1;
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
      return 1;
    }
    ::close(fd);
  }
  double read = since(t0);
  std::printf("create+write+close %d x %zu B: %.3f s (%.0f files/s); open+read+close: %.3f s (%.0f files/s)\n",
              n, bytes, create, n / create, read, n / read);
  return 0;
}

int rewrite(const std::string& dir, int n, std::size_t bytes) {
  auto save = [&](int i, char fill) {
    std::string path = dir + "/r" + std::to_string(i);
    std::string data(bytes, fill);
    int fd = ::open(path.c_str(), O_CREAT | O_WRONLY | O_TRUNC, 0644);
    bool ok = fd >= 0 && ::write(fd, data.data(), bytes) == static_cast<ssize_t>(bytes);
    if (fd >= 0) ::close(fd);
    if (!ok) std::perror(path.c_str());
    return ok;
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
  std::printf("open+close of one file: %d in %.3f s = %.0f per second\n", n, s, n / s);
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
  if (cmd == "files" && argc == 5) return files(argv[2], std::atoi(argv[3]), std::strtoul(argv[4], nullptr, 10));
  if (cmd == "rewrite" && argc == 5) return rewrite(argv[2], std::atoi(argv[3]), std::strtoul(argv[4], nullptr, 10));
  if (cmd == "openclose" && argc == 4) return openclose(argv[2], std::atoi(argv[3]));
  if (cmd == "hold" && argc == 4) return hold(argv[2], std::atoi(argv[3]));
  std::fprintf(stderr, "usage: mount_bench files|rewrite DIR N BYTES | openclose FILE N | hold DIR N\n");
  return 2;
}
