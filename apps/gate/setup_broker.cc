#include "setup_broker.h"

#include "vm/stack_state.h"
#include "vm/vm_instance.h"

namespace gate {

void add_setup_broker_options(po::options_description& desc) {
  add_broker_endpoint_options(desc);
  desc.add_options()(
      "vm-name", po::value<std::string>(),
      "the setup ('gate vm-list') whose broker to ask; default: the one that is running");
}

namespace {

bool given(const po::variables_map& args, const char* option) {
  return args.count(option) && !args[option].defaulted();
}

Result<ChosenBroker> broker_of(const StackState& s) {
  if (s.broker_socket.empty())
    return Status::failure("setup '" + s.name + "' has no broker socket on record; " +
                           "'gate status --vm-name " + s.name + "' says what is wrong");
  ChosenBroker b;
  b.endpoint.unix_socket = s.broker_socket;
  b.setup = s.name;
  return b;
}

}  // namespace

Result<ChosenBroker> broker_for(const po::variables_map& args) {
  if (given(args, "broker-host") || given(args, "broker-port") || given(args, "broker-socket"))
    return ChosenBroker{broker_endpoint_from(args), ""};
  if (args.count("vm-name")) {
    const std::string name = args["vm-name"].as<std::string>();
    auto s = load_stack(name);
    if (!s)
      return Status::failure("no setup named '" + name + "'; 'gate vm-list' lists them");
    if (vm::vm_liveness(*s) != "running")
      return Status::failure("setup '" + name + "' is not running; start it with 'gate up' " +
                             "(or 'gate clean --vm-name " + name + "')");
    return broker_of(*s);
  }
  std::vector<StackState> running;
  for (const auto& name : list_stacks())
    if (auto s = load_stack(name); s && vm::vm_liveness(*s) == "running")
      running.push_back(std::move(*s));
  if (running.size() == 1) return broker_of(running.front());
  if (running.size() > 1) {
    std::string names;
    for (const auto& s : running) names += (names.empty() ? "" : ", ") + s.name;
    return Status::failure(std::to_string(running.size()) + " setups are running (" + names +
                           "); say which with --vm-name NAME");
  }
  return ChosenBroker{broker_endpoint_from(args), ""};
}

}  // namespace gate
