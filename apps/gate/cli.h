#pragma once
// Argument handling shared by the subcommands: --help, usage errors (exit 2) and
// the one-line error style ("gate broker: what happened; what to try").
#include <boost/program_options.hpp>

#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "options.h"

namespace gate::cli {

namespace po = boost::program_options;

// Parses argv. On --help prints the help and sets *exit_code = 0; on a usage error
// prints it with a hint and sets *exit_code = 2; both return nullopt.
std::optional<po::variables_map> parse(int argc, char** argv, po::options_description& desc,
                                       const std::string& synopsis, const std::string& about,
                                       int* exit_code,
                                       const po::positional_options_description* positional = nullptr);

// Prints rows as columns separated by two spaces (the first row is the header).
void print_table(const std::vector<std::vector<std::string>>& rows, std::ostream& out);

// Prints "gate <cmd>: message" to stderr and returns 1.
int fail(const std::string& command, const std::string& message);

}  // namespace gate::cli
