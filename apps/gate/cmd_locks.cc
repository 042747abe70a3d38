// gate locks: who holds what, and who waits, at a running broker.
#include <boost/json.hpp>

#include <cstdio>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "cli.h"
#include "client/broker_client.h"
#include "commands.h"
#include "core/iso_time.h"
#include "setup_broker.h"

namespace gate::cmd {

namespace json = boost::json;

namespace {

std::string str(const json::object& o, const char* k) {
  auto it = o.find(k);
  if (it == o.end()) return "-";
  if (it->value().is_string()) return std::string(it->value().as_string());
  if (it->value().is_null()) return "-";
  return json::serialize(it->value());
}

std::string age(const std::string& iso, Micros now) {
  auto t = parse_iso8601(iso);
  if (!t) return "?";
  double secs = static_cast<double>(now - *t) / 1e6;
  std::ostringstream out;
  out << std::fixed << std::setprecision(secs < 10 ? 1 : 0) << secs << "s";
  return out.str();
}

}  // namespace

int locks(int argc, char** argv) {
  po::options_description desc("Options");
  add_setup_broker_options(desc);
  desc.add_options()
      ("path", po::value<std::string>()->default_value(""), "only this key")
      ("json", po::bool_switch(), "print the broker's JSON answer");
  po::positional_options_description pos;
  pos.add("path", 1);
  int code = 0;
  auto args = cli::parse(argc, argv, desc, "gate locks [options] [PATH]",
                       "Prints the locks held and the requests queued at a running broker: "
                       "what to run when something waits.",
                       &code, &pos);
  if (!args) return code;
  auto broker = broker_for(*args);
  if (!broker.ok()) return cli::fail(argv[0], broker.message());
  BrokerClient client(broker->endpoint, std::chrono::seconds(5));
  HttpReply reply = client.status((*args)["path"].as<std::string>());
  if (reply.status != 200) {
    const std::string hint =
        broker->setup.empty()
            ? " (is 'gate broker' running? no setup of 'gate up' is running either)"
            : " (the broker of setup '" + broker->setup + "'; 'gate status --vm-name " +
                  broker->setup + "' checks it)";
    return cli::fail(argv[0], reply.status == 0 ? reply.error + hint
                                                : "broker answered HTTP " +
                                                      std::to_string(reply.status) + ": " + reply.body);
  }
  if ((*args)["json"].as<bool>()) {
    std::cout << reply.body << "\n";
    return 0;
  }
  json::error_code ec;
  json::value v = json::parse(reply.body, ec);
  if (ec || !v.is_object()) return cli::fail(argv[0], "the broker's answer is not JSON");
  const Micros now = wall_clock_micros();
  const auto& o = v.as_object();
  std::vector<std::vector<std::string>> held{
      {"KEY", "MODE", "AGENT", "PID", "COMMAND", "HELD FOR", "HOLDS", "FENCE", "LEASE ENDS IN", "OWNER"}};
  if (auto it = o.find("locks"); it != o.end() && it->value().is_array())
    for (const auto& l : it->value().as_array()) {
      if (!l.is_object()) continue;
      const auto& lo = l.as_object();
      std::string lease = age(str(lo, "lease_expires_at"), now);
      if (!lease.empty() && lease[0] == '-') lease.erase(0, 1);
      held.push_back({str(lo, "path"), str(lo, "mode"), str(lo, "agent"), str(lo, "pid"),
                      str(lo, "command"), age(str(lo, "acquired_at"), now), str(lo, "hold_count"),
                      str(lo, "fence"), lease, str(lo, "owner")});
    }
  std::vector<std::vector<std::string>> queued{
      {"KEY", "MODE", "AGENT", "PID", "COMMAND", "WAITING FOR", "REQUEST", "OWNER"}};
  if (auto it = o.find("queue"); it != o.end() && it->value().is_array())
    for (const auto& q : it->value().as_array()) {
      if (!q.is_object()) continue;
      const auto& qo = q.as_object();
      queued.push_back({str(qo, "path"), str(qo, "mode"), str(qo, "agent"), str(qo, "pid"),
                        str(qo, "command"), age(str(qo, "requested_at"), now), str(qo, "req_id"),
                        str(qo, "owner")});
    }
  std::cout << "Held (" << held.size() - 1 << "):\n";
  if (held.size() > 1) cli::print_table(held, std::cout);
  std::cout << "\nQueued (" << queued.size() - 1 << "):\n";
  if (queued.size() > 1) cli::print_table(queued, std::cout);
  return 0;
}

}  // namespace gate::cmd
