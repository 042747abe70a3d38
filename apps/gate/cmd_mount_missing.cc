// Built only while lib/mount is absent from the tree.
#include "cli.h"
#include "commands.h"

namespace gate::cmd {
int mount(int, char** argv) { return cli::fail(argv[0], "this build of gate has no FUSE support"); }
}  // namespace gate::cmd
