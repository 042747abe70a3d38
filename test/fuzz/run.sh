#!/usr/bin/env bash
# Runs gate's libFuzzer targets (build them first: cmake --preset fuzz && cmake
# --build --preset fuzz; needs clang-15 and libfuzzer-15-dev).
#
#   test/fuzz/run.sh [TARGET...]      RUNS=N (executions per target), MAX_LEN=N
#
# Each target starts from its seed corpus (test/fuzz/corpus/TARGET) and grows a
# working corpus in build/fuzz/corpus/TARGET (kept between runs, not in the repo).
# An input that crashes a target is written to test/fuzz/crashes/TARGET/: add it to
# the repo once fixed, and ctest replays it from then on. Prints libFuzzer's final
# figures (executions, speed, coverage) for each target.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(fuzz_http fuzz_json fuzz_store fuzz_lock_engine)
for t in "${targets[@]}"; do
  exe=$root/build/fuzz/test/$t
  [[ -x $exe ]] || { echo "run.sh: $exe is missing; cmake --preset fuzz && cmake --build --preset fuzz" >&2; exit 2; }
  runs=${RUNS:-1000000}
  work=$root/build/fuzz/corpus/$t
  crashes=$root/test/fuzz/crashes/$t
  mkdir -p "$work" "$crashes"
  echo "== $t: $runs runs"
  set +e
  "$exe" "$work" "$root/test/fuzz/corpus/$t" -runs="$runs" -max_len="${MAX_LEN:-65536}" \
    -artifact_prefix="$crashes/" -print_final_stats=1 -close_fd_mask=3 >"$work.log" 2>&1
  rc=$?
  set -e
  grep -E 'DONE|stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)' "$work.log" || true
  if [[ $rc != 0 ]]; then
    echo "$t FAILED (exit $rc); see $work.log and $crashes/"
    grep -E '^SUMMARY|ERROR' "$work.log" | head -5 || true
  fi
done
