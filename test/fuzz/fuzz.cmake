# Fuzz targets (libFuzzer), test/fuzz/NAME.cc, each with LLVMFuzzerTestOneInput.
# In the `fuzz` preset (clang-15, GATE_FUZZ=ON) they are libFuzzer programs: run
# test/fuzz/run.sh. In every other build they are linked with replay_main.cc, and
# ctest replays their seed corpus (test/fuzz/corpus/NAME) and every input that once
# crashed them (test/fuzz/crashes/NAME), as ordinary tests (label "fuzz").
option(GATE_FUZZ "build the fuzz targets for libFuzzer (clang only)" OFF)
function(gate_fuzz_target name)
  add_executable(${name} fuzz/${name}.cc)
  target_link_libraries(${name} PRIVATE ${ARGN})
  if(GATE_FUZZ)
    target_link_options(${name} PRIVATE -fsanitize=fuzzer)
  else()
    target_sources(${name} PRIVATE fuzz/replay_main.cc)
    set(dir ${CMAKE_CURRENT_SOURCE_DIR}/fuzz)
    add_test(NAME "fuzz replay: ${name}" COMMAND ${name} ${dir}/corpus/${name} ${dir}/crashes/${name})
    set_tests_properties("fuzz replay: ${name}" PROPERTIES LABELS "fuzz" TIMEOUT 300)
  endif()
endfunction()

gate_fuzz_target(fuzz_http gate_broker)
gate_fuzz_target(fuzz_json gate_broker)
gate_fuzz_target(fuzz_store gate_store)
gate_fuzz_target(fuzz_lock_engine gate_lock)
