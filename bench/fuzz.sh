#!/bin/bash
# Runs every cargo-fuzz target under fuzz/ for a bounded time, one after the
# other at the lowest CPU priority, and prints per target: executions, corpus
# size and crashes. Not a test and not part of CI: run it by hand.
#   bash bench/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
# Defaults: 60 s per target, every target (`cargo fuzz list`).
# FUZZ_SANITIZER=none trades AddressSanitizer for speed (default: address).
#
# cargo-fuzz passes unstable compiler flags (-Z sanitizer, sanitizer coverage).
# RUSTC_BOOTSTRAP=1 lets the stable compiler accept them, so no nightly
# toolchain is needed; stable ships the sanitizer runtimes.
#
# The committed seeds in fuzz/corpus/<target>/ are only read. What a run
# learns goes to fuzz/grown/<target>/ (kept between runs, not committed), and
# crashing inputs to fuzz/artifacts/<target>/. A crash stops that target's run
# (libFuzzer's default) and makes the script exit non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${1:-60}
shift || true
SANITIZER=${FUZZ_SANITIZER:-address}
export RUSTC_BOOTSTRAP=1

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "installing cargo-fuzz (once)..." >&2
  nice -n 19 cargo install --locked cargo-fuzz
fi

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cd fuzz && cargo fuzz list)
fi

echo "building ${#targets[@]} targets (sanitizer: $SANITIZER)..." >&2
(cd fuzz && nice -n 19 cargo fuzz build --sanitizer "$SANITIZER" >&2)

logs=fuzz/target/logs
mkdir -p "$logs"
count() { find "$1" -maxdepth 1 -type f 2>/dev/null | wc -l; }
failed=0
rows=()
for t in "${targets[@]}"; do
  grown=fuzz/grown/$t artifacts=fuzz/artifacts/$t seeds=fuzz/corpus/$t
  mkdir -p "$grown" "$artifacts" "$seeds"
  before=$(count "$artifacts")
  echo "fuzzing $t for ${SECS}s..." >&2
  status=0
  (cd fuzz && nice -n 19 cargo fuzz run --sanitizer "$SANITIZER" "$t" \
     "../$grown" "../$seeds" -- \
     -max_total_time="$SECS" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
     -artifact_prefix="../$artifacts/") >"$logs/$t.log" 2>&1 || status=$?
  # A crash while loading the corpus leaves some of these lines unwritten.
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log" | tail -n1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logs/$t.log" | tail -n1)
  cov=$({ grep -Eo 'cov: [0-9]+' "$logs/$t.log" || true; } | tail -n1 | cut -d' ' -f2)
  crashes=$(( $(count "$artifacts") - before ))
  if [ "$status" -ne 0 ] || [ "$crashes" -ne 0 ]; then
    failed=1
    echo "  $t: exit $status, $crashes new artifact(s) in $artifacts; log: $logs/$t.log" >&2
  fi
  rows+=("$(printf '%-18s %6s %12s %8s %6s %6s %6s %7s' "$t" "${SECS}s" "${execs:-?}" \
    "${rate:-?}" "${cov:-?}" "$(count "$seeds")" "$(count "$grown")" "$crashes")")
done

printf '%-18s %6s %12s %8s %6s %6s %6s %7s\n' target time executions exec/s cov seeds grown crashes
printf '%s\n' "${rows[@]}"
exit "$failed"
