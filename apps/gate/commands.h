#pragma once
// gate's subcommands: one row in the table in main.cc and one function each.
// Every function gets argv with argv[0] = "gate <name>" and returns the exit code:
// 0 success, 1 failure, 2 usage error.
namespace gate::cmd {
int broker(int argc, char** argv);
int history(int argc, char** argv);
int locks(int argc, char** argv);
int log_changes(int argc, char** argv);
int conflicts(int argc, char** argv);
int mount(int argc, char** argv);
int restore(int argc, char** argv);
int run(int argc, char** argv);
int show(int argc, char** argv);
int up(int argc, char** argv);
int down(int argc, char** argv);
int vm_list(int argc, char** argv);
int clean(int argc, char** argv);
int status(int argc, char** argv);
int logs(int argc, char** argv);
int image(int argc, char** argv);
}  // namespace gate::cmd
