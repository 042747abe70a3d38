#pragma once
// Process limits the daemons raise at start.

namespace gate {

// Raises the soft limit on open files to the hard limit; with beyond_hard_limit and
// root, up to the kernel's nr_open. Best effort: a limit that cannot be raised stays.
void raise_fd_limit(bool beyond_hard_limit);

}  // namespace gate
