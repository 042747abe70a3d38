#pragma once
// Which broker a command such as `gate locks` talks to, so that after `gate up` a
// plain `gate locks` finds it:
//   1. --broker-host/--broker-port/--broker-socket (or their GATE_BROKER_*
//      variables) when any is given;
//   2. else the setup named by --vm-name;
//   3. else the one setup that `gate vm-list` shows as running;
//   4. with several running, an error that lists them and asks for --vm-name;
//   5. with none, the default address (127.0.0.1:8787).
#include <string>

#include "core/config.h"
#include "core/status.h"
#include "options.h"

namespace gate {

// The broker flags (add_broker_endpoint_options) and --vm-name.
void add_setup_broker_options(po::options_description& desc);

struct ChosenBroker {
  BrokerEndpoint endpoint;
  std::string setup;  // the setup it belongs to; empty when given by flags or default
};

// A failure says what to do (name a setup, start one).
Result<ChosenBroker> broker_for(const po::variables_map& args);

}  // namespace gate
