#pragma once
// Command-line flags and GATE_* environment variables: a flag beats the variable,
// which beats the default in core/config.h. Subcommands declare their flags with
// add_*_options() and read them back with the matching *_from() call.
#include <boost/program_options.hpp>

#include <optional>
#include <string>

#include "core/config.h"

namespace gate {

namespace po = boost::program_options;

// Flags shared by everything that talks to a broker:
// --broker-host (GATE_BROKER_HOST), --broker-port (GATE_BROKER_PORT),
// --broker-socket (GATE_BROKER_SOCKET).
void add_broker_endpoint_options(po::options_description& desc);
BrokerEndpoint broker_endpoint_from(const po::variables_map& args);

// Parses argv for one subcommand: command line first, then GATE_* variables for the
// options that have one (see env_name_for), so a flag beats the environment.
// Throws po::error on bad input; callers turn it into a usage message.
po::variables_map parse_command(int argc, char** argv, const po::options_description& desc,
                                const po::positional_options_description* positional = nullptr);

// "8M" -> 8388608: a byte count with an optional K, M, G or T (powers of 1024);
// nullopt for anything else.
std::optional<std::uint64_t> parse_size(const std::string& text);

// Where a mount of `root` keeps its history unless told otherwise:
// $XDG_STATE_HOME/gate/history/<root with '/' as '_'>. `gate history` finds it
// from the mount's root the same way.
std::string default_history_dir(const std::string& root);

// "state-dir" -> "GATE_STATE_DIR". Only options listed in the table have a variable.
std::optional<std::string> env_name_for(const std::string& option);

}  // namespace gate
