# Tests of the man pages, bash completion and the Debian package. Included from
# test/CMakeLists.txt:  include(packaging/packaging.cmake)
#
#   ctest --preset default -L docs      # man pages vs --help, gate help, completion (seconds)
#   ctest --preset default -L package   # the .deb in a clean Debian 12 root and under systemd in a
#                                       # booted guest (minutes; root, network, qemu)
find_program(GATE_BASH bash REQUIRED)
set(GATE_PACKAGING_TESTS ${CMAKE_CURRENT_LIST_DIR})

add_test(NAME docs.man_pages_match_help
  COMMAND ${GATE_BASH} ${GATE_PACKAGING_TESTS}/check_man_pages.sh
          $<TARGET_FILE:gate> ${PROJECT_SOURCE_DIR}/man ${PROJECT_BINARY_DIR}/man)
set_tests_properties(docs.man_pages_match_help PROPERTIES LABELS docs TIMEOUT 120)

add_test(NAME docs.bash_completion
  COMMAND ${GATE_BASH} ${GATE_PACKAGING_TESTS}/check_completion.sh
          $<TARGET_FILE:gate> ${PROJECT_SOURCE_DIR}/packaging/gate.bash-completion)
set_tests_properties(docs.bash_completion PROPERTIES LABELS docs TIMEOUT 120)

# Slow: builds the .deb, makes (first time) and unpacks a bookworm root, installs
# the package there from the Debian mirror and runs it. Skipped (77) without root
# or mmdebstrap. The base root is cached in ${PROJECT_BINARY_DIR}/packaging-cache.
add_test(NAME package.deb_installs_in_debian12
  COMMAND ${GATE_BASH} ${GATE_PACKAGING_TESTS}/deb_install_test.sh
          ${PROJECT_BINARY_DIR} ${PROJECT_BINARY_DIR}/packaging-cache)
set_tests_properties(package.deb_installs_in_debian12 PROPERTIES
  LABELS "package;slow" TIMEOUT 900 SKIP_RETURN_CODE 77 RUN_SERIAL TRUE)

# Slower: the .deb installed in a bookworm guest that boots under QEMU (software
# emulation), where systemd runs gate-broker.service and a check unit reports on
# the serial console. Skipped (77) without root, mmdebstrap, qemu or a kernel in
# /boot. The base root is cached beside the other.
add_test(NAME package.unit_runs_under_systemd
  COMMAND ${GATE_BASH} ${GATE_PACKAGING_TESTS}/deb_systemd_test.sh
          ${PROJECT_BINARY_DIR} ${PROJECT_BINARY_DIR}/packaging-cache)
set_tests_properties(package.unit_runs_under_systemd PROPERTIES
  LABELS "package;vm;slow" TIMEOUT 1200 SKIP_RETURN_CODE 77 RUN_SERIAL TRUE)
