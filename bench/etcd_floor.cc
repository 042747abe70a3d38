// etcd_floor: what one call to etcd costs through its JSON gateway on this machine,
// the floor under every figure of the etcd store (bench/run_etcd_bench.sh).
//
//   etcd_floor ENDPOINTS [N] [CLIENTS]
//
// ENDPOINTS is the --store value (etcd://HOST:PORT,...); the leader is asked first, as
// a broker does. Runs N plain puts, then N transactions shaped like a broker's grant
// (a compare of a whole prefix's mod revisions and of one key, a put), then the same
// transactions 8 to a call (nested, as a broker's TxnBatcher sends them), then N
// linearizable ranges, each by CLIENTS threads at once with a client each, and prints
// ops/s (transactions, not calls) and p50/p99 latency (of a call).
#include <boost/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "etcd/etcd_client.h"

using namespace gate::etcd;
using Clock = std::chrono::steady_clock;

namespace {

double pct(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<std::size_t>(p / 100 * static_cast<double>(v.size())))];
}

// `per_call`: transactions in each call (ops/s counts them).
template <typename Op>
void run(const char* name, const std::vector<Endpoint>& eps, int n, int clients, Op op, int per_call = 1) {
  std::vector<double> ms;
  std::mutex mu;
  int failures = 0;
  const auto t0 = Clock::now();
  std::vector<std::thread> threads;
  for (int c = 0; c < clients; ++c)
    threads.emplace_back([&, c] {
      EtcdClient client(eps);
      std::vector<double> mine;
      int bad = 0;
      for (int i = c; i < n / per_call; i += clients) {
        const auto a = Clock::now();
        if (!op(client, c, i)) ++bad;
        mine.push_back(std::chrono::duration<double, std::milli>(Clock::now() - a).count());
      }
      std::lock_guard lock(mu);
      ms.insert(ms.end(), mine.begin(), mine.end());
      failures += bad;
    });
  for (auto& t : threads) t.join();
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  const int done = n / per_call * per_call;
  std::printf("  %-6s %6d ops by %2d clients: %7.0f ops/s  p50 %6.3f ms  p99 %6.3f ms%s\n", name, done, clients,
              done / secs, pct(ms, 50), pct(ms, 99), failures ? "  (FAILURES)" : "");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: etcd_floor etcd://HOST:PORT[,...] [N] [CLIENTS]\n");
    return 2;
  }
  auto eps = parse_store(argv[1]);
  if (eps.ok()) *eps = leader_first(*eps, std::chrono::milliseconds(500));
  if (!eps.ok()) {
    std::fprintf(stderr, "etcd_floor: %s\n", eps.message().c_str());
    return 2;
  }
  const int n = argc > 2 ? std::atoi(argv[2]) : 2000;
  const int clients = argc > 3 ? std::atoi(argv[3]) : 1;
  const std::string prefix = "/gate-floor/q/";
  run("put", *eps, n, clients, [](EtcdClient& c, int, int i) {
    return c.put("/gate-floor/p/" + std::to_string(i % 64), "value").ok();
  });
  run("txn", *eps, n, clients, [&](EtcdClient& c, int who, int i) {
    const std::string own = prefix + std::to_string(who) + "/";
    const std::string key = own + std::to_string(i % 2);
    auto r = c.txn({compare_range(own, prefix_end(own), "MOD", "LESS", std::int64_t{1} << 60),
                    compare(key, "VERSION", "LESS", std::int64_t{1} << 60)},
                   {txn_put(key, "entry")}, {txn_range(own, prefix_end(own))}, Retry::Idempotent);
    return r.ok() && r->succeeded;
  });
  constexpr int kBatch = 8;
  run(
      "txn*8", *eps, n, clients,
      [&](EtcdClient& c, int who, int i) {
        boost::json::array nested;
        for (int k = 0; k < kBatch; ++k) {
          const std::string own = prefix + std::to_string(who) + "-" + std::to_string(k) + "/";
          const std::string key = own + std::to_string(i % 2);
          nested.push_back(boost::json::object{
              {"request_txn",
               txn_request({compare_range(own, prefix_end(own), "MOD", "LESS", std::int64_t{1} << 60),
                            compare(key, "VERSION", "LESS", std::int64_t{1} << 60)},
                           {txn_put(key, "entry")}, {txn_range(own, prefix_end(own))})}});
        }
        auto r = c.txn({}, nested, {}, Retry::Idempotent);
        return r.ok() && r->succeeded;
      },
      kBatch);
  run("range", *eps, n, clients, [](EtcdClient& c, int, int i) {
    return c.range(range_request("/gate-floor/p/" + std::to_string(i % 64))).ok();
  });
  if (!EtcdClient(*eps).delete_range("/gate-floor/", prefix_end("/gate-floor/")).ok())
    std::fprintf(stderr, "etcd_floor: could not delete /gate-floor/\n");
  return 0;
}
