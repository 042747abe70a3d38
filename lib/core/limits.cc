#include "core/limits.h"

#include <sys/resource.h>
#include <unistd.h>

#include <fstream>

namespace gate {

void raise_fd_limit(bool beyond_hard_limit) {
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
  rlim_t most = rl.rlim_max;
  if (beyond_hard_limit && ::geteuid() == 0) {
    std::ifstream nr_open("/proc/sys/fs/nr_open");
    rlim_t n = 0;
    if (nr_open >> n && n > most) most = n;
  }
  rlimit want{most, most};
  if (::setrlimit(RLIMIT_NOFILE, &want) != 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &rl);
  }
}

}  // namespace gate
