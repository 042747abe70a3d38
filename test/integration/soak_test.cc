// Crash loops (label "soak"): the broker killed (SIGKILL) again and again under
// clients that keep taking write locks, checked as Jepsen checks a store: no two
// clients are ever inside one key's write lock at once, the fences a key's holders
// see only grow, and every acquire ends (nobody waits forever).
#include <catch2/catch.hpp>

#include <atomic>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>

#include "client/broker_client.h"
#include "support/mount_fixture.h"

using namespace gate;
using gate::test::BrokerProcess;
using namespace std::chrono_literals;

namespace {

struct KeyCheck {
  std::mutex m;
  int inside = 0;
  std::uint64_t last_fence = 0;
};

struct Findings {
  std::atomic<long> grants{0};
  std::atomic<int> overlaps{0}, fences_back{0}, stuck{0}, refused{0};
  std::mutex m;
  std::string first;  // the first problem, for the report
  void note(std::atomic<int>& what, const std::string& text) {
    ++what;
    std::lock_guard g(m);
    if (first.empty()) first = text;
  }
};

// One client: take a random key's write lock, check the invariants inside, release;
// every call retried across broker restarts (an acquire with its request_id, which
// re-attaches to its queue place or claims a grant made while it was away).
void client(int id, const BrokerEndpoint& ep, KeyCheck* keys, int nkeys, std::atomic<bool>& stop,
            Findings& f) {
  std::mt19937 rng(static_cast<unsigned>(id));
  const std::string owner = "client-" + std::to_string(id);
  for (long n = 0; !stop; ++n) {
    const int k = static_cast<int>(rng() % static_cast<unsigned>(nkeys));
    AcquireRequest req{.key = "soak/" + std::to_string(k), .owner = owner, .lease_ms = 3000};
    req.request_id = owner + "-" + std::to_string(n);
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    CallResult r;
    for (;;) {
      BrokerClient c(ep, 5s);
      r = c.acquire(req);
      if (r.status != CallStatus::Unavailable || stop) break;
      if (std::chrono::steady_clock::now() > deadline) break;
      std::this_thread::sleep_for(10ms);  // the broker is restarting: ask again
    }
    if (r.status == CallStatus::Unavailable) {
      if (stop) break;
      f.note(f.stuck, owner + " waited over 60 s for soak/" + std::to_string(k));
      continue;
    }
    if (r.status != CallStatus::Ok) {
      f.note(f.refused, owner + ": " + r.error);
      continue;
    }
    ++f.grants;
    {
      std::lock_guard g(keys[k].m);
      if (++keys[k].inside > 1) f.note(f.overlaps, "two holders of soak/" + std::to_string(k));
      if (r.lock.fence <= keys[k].last_fence)
        f.note(f.fences_back, "soak/" + std::to_string(k) + ": fence " + std::to_string(r.lock.fence) +
                                  " after " + std::to_string(keys[k].last_fence));
      keys[k].last_fence = std::max(keys[k].last_fence, r.lock.fence);
    }
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 2000));  // the work
    {
      std::lock_guard g(keys[k].m);
      --keys[k].inside;
    }
    // A grant made while the client was away and claimed again counts twice
    // (hold_count 2): give back every hold.
    for (std::int64_t holds = r.lock.hold_count; holds > 0;) {
      BrokerClient c(ep, 5s);
      const CallStatus s = c.release(r.lock.lock_id, owner).status;
      if (s == CallStatus::Unavailable) {
        if (stop) break;
        std::this_thread::sleep_for(10ms);
        continue;
      }
      if (s != CallStatus::Ok) break;  // gone already (its lease ended)
      --holds;
    }
  }
}

}  // namespace

TEST_CASE("soak: the broker killed 100 times under 12 clients: no two holders of a write lock, "
          "fences only grow, every acquire ends",
          "[soak]") {
  BrokerProcess broker;
  const BrokerEndpoint ep = broker.endpoint();
  constexpr int kClients = 12, kKeys = 3, kKills = 100;
  KeyCheck keys[kKeys];
  Findings f;
  std::atomic<bool> stop{false};
  std::vector<std::thread> clients;
  for (int i = 0; i < kClients; ++i)
    clients.emplace_back(client, i, std::cref(ep), keys, kKeys, std::ref(stop), std::ref(f));
  struct Join {
    std::atomic<bool>& stop;
    std::vector<std::thread>& threads;
    ~Join() {
      stop = true;
      for (auto& t : threads) t.join();
    }
  } join{stop, clients};

  for (int kill = 0; kill < kKills; ++kill) {
    // Between kills the clients make progress: a few grants, awaited as they come.
    const long before = f.grants;
    const auto limit = std::chrono::steady_clock::now() + 90s;
    while (f.grants < before + 5 && std::chrono::steady_clock::now() < limit)
      std::this_thread::sleep_for(1ms);
    INFO("kill " << kill << ": " << f.first);
    REQUIRE(f.grants >= before + 5);
    broker.kill9();
    broker.start();
  }
  const long before = f.grants;
  const auto limit = std::chrono::steady_clock::now() + 90s;
  while (f.grants < before + 20 && std::chrono::steady_clock::now() < limit)
    std::this_thread::sleep_for(1ms);
  CHECK(f.grants >= before + 20);  // still serving after the last restart
  stop = true;
  for (auto& t : clients) t.join();
  clients.clear();
  INFO("grants " << f.grants << "; first problem: " << f.first << "\nbroker log:\n" << broker.log());
  CHECK(f.overlaps == 0);
  CHECK(f.fences_back == 0);
  CHECK(f.stuck == 0);
  CHECK(f.refused == 0);
  std::printf("soak: %d broker kills, %ld grants, %d overlaps, %d fences back, %d stuck\n", kKills,
              f.grants.load(), f.overlaps.load(), f.fences_back.load(), f.stuck.load());
}

TEST_CASE("soak: the mount killed 20 times under writers: no lock outlives its lease, the next mount "
          "works, nothing written and fsynced before is lost",
          "[soak][mount]") {
  BrokerProcess broker;
  test::TempDir keep("gate-soak");
  const std::string root = keep.path() + "/root", done = keep.path() + "/done";
  ::mkdir(root.c_str(), 0755);
  constexpr int kKills = 20, kWriters = 3;
  std::chrono::steady_clock::duration longest{};
  for (int round = 0; round < kKills; ++round) {
    test::Mount m(broker.endpoint(), {"--lease-ms", "2000"}, root);
    // Writers: each file written, fsynced and closed (dd conv=fsync), and listed in
    // `done` (outside the mount) only when all of that succeeded; they stop at the
    // first failure, which the kill brings.
    std::vector<test::Child> writers;
    for (int w = 0; w < kWriters; ++w)
      writers.push_back(test::Child::spawn(
          {"sh", "-c",
           "i=0; while :; do i=$((i+1)); f=r$2-w$3-$i; printf 'round %s writer %s file %s\\n' $2 $3 $i | "
           "dd of=\"$1/$f\" conv=fsync status=none || exit 0; echo \"$f\" >> \"$4\"; done",
           "sh", m.mnt(), std::to_string(round), std::to_string(w), done},
          keep.path() + "/writer-" + std::to_string(w) + ".log"));
    const auto lines = [&] {
      const std::string text = test::read_file(done);
      return std::count(text.begin(), text.end(), '\n');
    };
    const auto before = lines();
    REQUIRE(test::eventually([&] { return lines() >= before + 10; }, 30s));
    m.kill9();
    const auto killed = std::chrono::steady_clock::now();
    for (auto& w : writers) CHECK(w.wait(30s) >= 0);  // they end: nobody hangs on a dead mount
    // The dead mount's locks end with their lease (2 s), not later (a second of slack
    // for the broker's timer and this poll).
    REQUIRE(test::eventually([&] { return test::total_locks(broker.endpoint()) == 0; }, 10s));
    const auto gone = std::chrono::steady_clock::now() - killed;
    longest = std::max(longest, gone);
    CHECK(gone < 3s);
  }
  // Every file a writer saw written, fsynced and closed is there, whole.
  std::istringstream listed(test::read_file(done));
  std::size_t files = 0, whole = 0;
  for (std::string f; std::getline(listed, f); ++files) {
    unsigned r = 0, w = 0, i = 0;
    std::sscanf(f.c_str(), "r%u-w%u-%u", &r, &w, &i);
    whole += test::read_file(root + "/" + f) ==
             "round " + std::to_string(r) + " writer " + std::to_string(w) + " file " + std::to_string(i) + "\n";
  }
  std::printf("soak: %d mount kills, %zu files fsynced, %zu whole after; locks gone at most %lld ms after a kill\n",
              kKills, files, whole,
              static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(longest).count()));
  CHECK(files >= kKills * 10);
  CHECK(whole == files);
}
