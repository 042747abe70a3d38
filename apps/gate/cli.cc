#include "cli.h"

namespace gate::cli {

std::optional<po::variables_map> parse(int argc, char** argv, po::options_description& desc,
                                       const std::string& synopsis, const std::string& about,
                                       int* exit_code,
                                       const po::positional_options_description* positional) {
  desc.add_options()("help,h", "show this help and exit");
  const std::string name = argv[0];
  try {
    auto args = parse_command(argc, argv, desc, positional);
    if (args.count("help")) {
      std::cout << "Usage: " << synopsis << "\n\n" << about << "\n\n" << desc << "\n";
      *exit_code = 0;
      return std::nullopt;
    }
    return args;
  } catch (const po::error& e) {
    std::cerr << name << ": " << e.what() << "\nTry '" << name << " --help'.\n";
    *exit_code = 2;
    return std::nullopt;
  }
}

void print_table(const std::vector<std::vector<std::string>>& rows, std::ostream& out) {
  std::vector<std::size_t> width;
  for (const auto& r : rows)
    for (std::size_t i = 0; i < r.size(); ++i) {
      if (width.size() <= i) width.push_back(0);
      width[i] = std::max(width[i], r[i].size());
    }
  for (const auto& r : rows) {
    for (std::size_t i = 0; i < r.size(); ++i) {
      out << r[i];
      if (i + 1 < r.size()) out << std::string(width[i] - r[i].size() + 2, ' ');
    }
    out << "\n";
  }
}

int fail(const std::string& command, const std::string& message) {
  std::cerr << command << ": " << message << "\n";
  return 1;
}

}  // namespace gate::cli
