// Settings: a flag beats the environment, which beats the default.
#include <catch2/catch.hpp>

#include <cstdlib>
#include <filesystem>

#include "options.h"

using namespace gate;

namespace {
struct EnvVar {
  EnvVar(const char* name, const char* value) : name(name) { ::setenv(name, value, 1); }
  ~EnvVar() { ::unsetenv(name); }
  const char* name;
};

po::variables_map parse(std::vector<std::string> args) {
  po::options_description desc;
  add_broker_endpoint_options(desc);
  desc.add_options()("max-hold-ms", po::value<std::int64_t>()->default_value(3'600'000), "");
  std::vector<char*> argv{const_cast<char*>("gate test")};
  for (auto& a : args) argv.push_back(a.data());
  return parse_command(static_cast<int>(argv.size()), argv.data(), desc);
}
}  // namespace

TEST_CASE("defaults apply when neither flag nor environment is set", "[config]") {
  auto vm = parse({});
  auto ep = broker_endpoint_from(vm);
  CHECK(ep.host == "127.0.0.1");
  CHECK(ep.port == 8787);
  CHECK(vm["max-hold-ms"].as<std::int64_t>() == 3'600'000);
}

TEST_CASE("the environment overrides a default", "[config]") {
  EnvVar port("GATE_BROKER_PORT", "9999");
  EnvVar cap("GATE_MAX_HOLD_MS", "1234");
  auto vm = parse({});
  CHECK(broker_endpoint_from(vm).port == 9999);
  CHECK(vm["max-hold-ms"].as<std::int64_t>() == 1234);
  CHECK_FALSE(vm["max-hold-ms"].defaulted());
}

TEST_CASE("a flag overrides the environment", "[config]") {
  EnvVar port("GATE_BROKER_PORT", "9999");
  auto vm = parse({"--broker-port", "7000"});
  CHECK(broker_endpoint_from(vm).port == 7000);
}

TEST_CASE("variables of options a command does not have are ignored", "[config]") {
  EnvVar dir("GATE_STATE_DIR", "/nowhere");
  CHECK_NOTHROW(parse({}));
}

TEST_CASE("a bad environment value is a usage error", "[config]") {
  EnvVar port("GATE_BROKER_PORT", "not-a-port");
  CHECK_THROWS_AS(parse({}), po::error);
}

TEST_CASE("an unwritable state dir falls back to the user's state dir unless chosen", "[config]") {
  EnvVar xdg("XDG_STATE_HOME", "/tmp/gate-config-test-xdg");
  // A path below a regular file can never be created.
  const std::string bad = "/proc/version/gate";
  auto chosen = resolve_state_dir(bad, true);
  CHECK_FALSE(chosen.ok());
  CHECK(chosen.message().find("--state-dir") != std::string::npos);
  auto fallback = resolve_state_dir(bad, false);
  REQUIRE(fallback.ok());
  CHECK(fallback->path == "/tmp/gate-config-test-xdg/gate/broker");
  CHECK(fallback->note.find(bad) != std::string::npos);
  std::filesystem::remove_all("/tmp/gate-config-test-xdg");
}
