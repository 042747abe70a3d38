// Random tokens (lock ids, request ids): a pool per thread, never shared with a fork.
#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <set>
#include <string>

#include "core/token.h"

using namespace gate;

TEST_CASE("tokens are 32 hex digits and do not repeat", "[unit][token]") {
  std::set<std::string> seen;
  for (int i = 0; i < 2000; ++i) {  // several refills of the pool
    const std::string t = random_token();
    REQUIRE(t.size() == 32);
    REQUIRE(t.find_first_not_of("0123456789abcdef") == std::string::npos);
    REQUIRE(seen.insert(t).second);
  }
}

TEST_CASE("a forked child draws other tokens than its parent", "[unit][token]") {
  random_token();  // the pool is filled before the fork
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    const std::string t = random_token();
    const bool ok = ::write(fds[1], t.data(), t.size()) == static_cast<ssize_t>(t.size());
    ::_exit(ok ? 0 : 1);
  }
  ::close(fds[1]);
  const std::string mine = random_token();
  std::string theirs(32, '\0');
  std::size_t got = 0;
  while (got < theirs.size()) {
    const ssize_t n = ::read(fds[0], theirs.data() + got, theirs.size() - got);
    if (n <= 0) break;
    got += static_cast<std::size_t>(n);
  }
  ::close(fds[0]);
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  REQUIRE(got == theirs.size());
  CHECK(theirs != mine);
}
