#include "options.h"

#include <map>
#include <stdexcept>

namespace gate {

namespace {

const std::map<std::string, std::string>& env_table() {
  static const std::map<std::string, std::string> table = {
      {"state-dir", "GATE_STATE_DIR"},
      {"broker-host", "GATE_BROKER_HOST"},
      {"broker-port", "GATE_BROKER_PORT"},
      {"broker-socket", "GATE_BROKER_SOCKET"},
      {"host", "GATE_BROKER_HOST"},
      {"port", "GATE_BROKER_PORT"},
      {"unix-socket", "GATE_BROKER_SOCKET"},
      {"lease-ms", "GATE_LEASE_MS"},
      {"max-hold-ms", "GATE_MAX_HOLD_MS"},
      {"acquire-timeout-ms", "GATE_ACQUIRE_TIMEOUT_MS"},
      {"meta-wait-ms", "GATE_META_WAIT_MS"},
      {"stale-writes", "GATE_STALE_WRITES"},
      {"log-level", "GATE_LOG_LEVEL"},
      {"store", "GATE_STORE"},
      {"etcd-lend", "GATE_ETCD_LEND"},
      {"image-mirror", "GATE_IMAGE_MIRROR"},
  };
  return table;
}

}  // namespace

std::optional<std::uint64_t> parse_size(const std::string& text) {
  if (text.empty()) return std::nullopt;
  std::size_t used = 0;
  unsigned long long n = 0;
  try {
    n = std::stoull(text, &used, 10);
  } catch (const std::exception&) {
    return std::nullopt;
  }
  if (text[0] == '-') return std::nullopt;
  const std::string unit = text.substr(used);
  int shift = 0;
  if (unit == "K" || unit == "k" || unit == "KiB") shift = 10;
  else if (unit == "M" || unit == "MiB") shift = 20;
  else if (unit == "G" || unit == "GiB") shift = 30;
  else if (unit == "T" || unit == "TiB") shift = 40;
  else if (!unit.empty()) return std::nullopt;
  if (shift && n > (~0ull >> shift)) return std::nullopt;
  return static_cast<std::uint64_t>(n) << shift;
}

std::string default_history_dir(const std::string& root) {
  std::string name;
  for (char c : root) name.push_back(c == '/' ? '_' : c);
  while (!name.empty() && name.front() == '_') name.erase(0, 1);
  return user_state_root() + "/history/" + (name.empty() ? "root" : name);
}

std::optional<std::string> env_name_for(const std::string& option) {
  auto it = env_table().find(option);
  if (it == env_table().end()) return std::nullopt;
  return it->second;
}

void add_broker_endpoint_options(po::options_description& desc) {
  desc.add_options()
      ("broker-host", po::value<std::string>()->default_value(defaults::kBrokerHost),
       "broker address (env GATE_BROKER_HOST)")
      ("broker-port", po::value<std::uint16_t>()->default_value(defaults::kBrokerPort),
       "broker TCP port (env GATE_BROKER_PORT)")
      ("broker-socket", po::value<std::string>()->default_value(""),
       "broker Unix socket; used instead of host and port when set (env GATE_BROKER_SOCKET)");
}

BrokerEndpoint broker_endpoint_from(const po::variables_map& args) {
  BrokerEndpoint ep;
  ep.host = args["broker-host"].as<std::string>();
  ep.port = args["broker-port"].as<std::uint16_t>();
  ep.unix_socket = args["broker-socket"].as<std::string>();
  return ep;
}

po::variables_map parse_command(int argc, char** argv, const po::options_description& desc,
                                const po::positional_options_description* positional) {
  po::variables_map args;
  po::command_line_parser parser(argc, argv);
  parser.options(desc);
  if (positional) parser.positional(*positional);
  po::store(parser.run(), args);
  // store() never overwrites a value already stored, so the command line wins.
  po::store(po::parse_environment(desc,
                                  [&desc](const std::string& var) -> std::string {
                                    for (const auto& [option, env] : env_table()) {
                                      if (env == var && desc.find_nothrow(option, false))
                                        return option;
                                    }
                                    return "";
                                  }),
            args);
  po::notify(args);
  return args;
}

}  // namespace gate
