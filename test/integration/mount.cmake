# The locked mount, end to end: a real broker, a real FUSE mount, real processes.
# Included from test/CMakeLists.txt (needs root or a user allowed to mount FUSE).
if(TARGET gate_mount)
  add_executable(mount_test integration/mount_test.cc)
  target_link_libraries(mount_test PRIVATE gate_test_support gate_client gate_core Boost::json)
  catch_discover_tests(mount_test EXTRA_ARGS -w NoTests PROPERTIES LABELS "mount")
  # Calls the kernel makes under inode/directory locks, against holders that need them.
  add_executable(kernel_locks_test integration/kernel_locks_test.cc)
  target_link_libraries(kernel_locks_test PRIVATE gate_test_support gate_client gate_core Boost::json)
  catch_discover_tests(kernel_locks_test EXTRA_ARGS -w NoTests PROPERTIES LABELS "mount" TIMEOUT 300)
  # Agents: who each lock is for, through real processes and `gate run`.
  add_executable(agents_test integration/agents_test.cc)
  target_link_libraries(agents_test PRIVATE gate_test_support gate_client gate_core Boost::json)
  catch_discover_tests(agents_test EXTRA_ARGS -w NoTests PROPERTIES LABELS "mount")
  # The history of replaced versions, through real agents' saves.
  add_executable(history_test integration/history_test.cc)
  target_link_libraries(history_test PRIVATE gate_test_support gate_client gate_core Boost::json)
  catch_discover_tests(history_test EXTRA_ARGS -w NoTests PROPERTIES LABELS "mount")
  # Stale replacements: saves over files another agent changed since this one read them.
  add_executable(stale_test integration/stale_test.cc)
  target_link_libraries(stale_test PRIVATE gate_test_support gate_client gate_core Boost::json)
  catch_discover_tests(stale_test EXTRA_ARGS -w NoTests PROPERTIES LABELS "mount")
  # Stale replacements merged: agents' lost updates, and real conflicts.
  add_executable(merge_test integration/merge_test.cc)
  target_link_libraries(merge_test PRIVATE gate_test_support gate_client gate_core Boost::json)
  catch_discover_tests(merge_test EXTRA_ARGS -w NoTests PROPERTIES LABELS "mount")
endif()
