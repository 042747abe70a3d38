# The locked mount, end to end: a real broker, a real FUSE mount, real processes.
# Included from test/CMakeLists.txt (needs root or a user allowed to mount FUSE).
if(TARGET gate_mount)
  # One test program, integration/NAME.cc, its Catch tests labelled "mount";
  # further arguments are more test properties.
  function(gate_mount_test name)
    add_executable(${name} integration/${name}.cc)
    target_link_libraries(${name} PRIVATE gate_test_support gate_client gate_core Boost::json)
    catch_discover_tests(${name} EXTRA_ARGS -w NoTests PROPERTIES LABELS "mount" ${ARGN})
  endfunction()

  gate_mount_test(mount_test)
  # Calls the kernel makes under inode/directory locks, against holders that need them.
  gate_mount_test(kernel_locks_test TIMEOUT 300)
  # Agents: who each lock is for, through real processes and `gate run`.
  gate_mount_test(agents_test)
  # The history of replaced versions, through real agents' saves.
  gate_mount_test(history_test)
  # Stale replacements: saves over files another agent changed since this one read
  # them, refused; and an open that waited while a rename took its file's name.
  gate_mount_test(stale_test)
  # Stale replacements merged: agents' lost updates, and real conflicts.
  gate_mount_test(merge_test)
  # Paths longer than the broker takes as a key (sent as a digest, client/wire_key.h).
  gate_mount_test(long_paths_test)
  # The kernel's caches of a view, and changes made beside it.
  gate_mount_test(cache_test)
  # Read-only opens read straight from the files below (FUSE passthrough).
  gate_mount_test(passthrough_test)
  # Two views through two brokers that share one lock space in etcd.
  add_executable(etcd_mount_test integration/etcd_mount_test.cc support/etcd_cluster.cc)
  target_link_libraries(etcd_mount_test PRIVATE gate_test_support gate_client gate_core gate_etcd gate_vm Boost::json)
  catch_discover_tests(etcd_mount_test EXTRA_ARGS -w NoTests PROPERTIES LABELS "mount;etcd" TIMEOUT 300)
endif()
