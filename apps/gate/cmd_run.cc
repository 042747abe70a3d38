// gate run --agent NAME -- COMMAND: starts a command as an agent, so that the mount
// attributes its requests (and its children's) to NAME.
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cli.h"
#include "commands.h"
#include "mount/agent_resolver.h"

namespace gate::cmd {

int run(int argc, char** argv) {
  // gate's own flags end at "--" or at the first word that is not one of them, so
  // the command's flags are never read as gate's.
  int split = 1;
  while (split < argc) {
    const std::string a = argv[split];
    if (a == "--") break;
    if (a == "--agent") {
      split += 2;
      continue;
    }
    if (a.rfind("--", 0) == 0 || a == "-h") {
      ++split;
      continue;
    }
    break;
  }
  split = std::min(split, argc);
  po::options_description desc("Options");
  desc.add_options()("agent", po::value<std::string>(),
                     "the agent's name, exported to COMMAND as GATE_AGENT (required)");
  int code = 0;
  auto args = cli::parse(split, argv, desc, "gate run --agent NAME [--] COMMAND [ARGS...]",
                         "Runs COMMAND with GATE_AGENT=NAME, so that a gate mount attributes "
                         "every file it and its children open to NAME (gate locks shows it).",
                         &code);
  if (!args) return code;
  int first = split < argc && std::strcmp(argv[split], "--") == 0 ? split + 1 : split;
  if (!args->count("agent"))
    return std::cerr << argv[0] << ": say which agent with --agent NAME\nTry '" << argv[0]
                     << " --help'.\n",
           2;
  const std::string agent = (*args)["agent"].as<std::string>();
  if (agent.empty() || mount::clean_agent_name(agent) != agent)
    return std::cerr << argv[0] << ": agent name '" << agent
                     << "' must be 1 to 64 printable characters without spaces\n",
           2;
  if (first >= argc)
    return std::cerr << argv[0] << ": no command to run\nTry '" << argv[0] << " --help'.\n", 2;
  if (::setenv("GATE_AGENT", agent.c_str(), 1) != 0)
    return cli::fail(argv[0], std::string("cannot set GATE_AGENT: ") + std::strerror(errno));
  ::execvp(argv[first], argv + first);
  const int err = errno;
  cli::fail(argv[0], std::string("cannot run '") + argv[first] + "': " + std::strerror(err));
  return err == ENOENT ? 127 : 126;
}

}  // namespace gate::cmd
