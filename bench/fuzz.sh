#!/usr/bin/env bash
# The long fuzz run: every cargo-fuzz target in fuzz/ (or those named as arguments), one
# after another, for RUNS executions each (default 1,000,000), starting from the checked-in
# seeds (fuzz/seeds/<target>/). The corpus each run grows goes to fuzz/corpus/<target>/ and
# any crashing input to fuzz/artifacts/<target>/, both git-ignored; the corpus is started
# afresh unless KEEP_CORPUS=1.
#
# Prints per target: executions, executions per second, final corpus size, crashes found.
# The harnesses (src/fuzzing/) panic on any property violation, so a "crash" is a panic or
# a differential mismatch, not only a memory error.
#
# FUZZ_ARGS adds libFuzzer flags (e.g. -max_len=65536).
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). On a stable toolchain RUSTC_BOOTSTRAP=1
# lets it pass its -Z flags; SANITIZER (default none: no sanitizer runtime is needed, and
# previewd's code is safe Rust) may be set to address where its runtime is installed.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

RUNS=${RUNS:-1000000}
SANITIZER=${SANITIZER:-none}
export RUSTC_BOOTSTRAP=1

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "cargo-fuzz not found: cargo install cargo-fuzz" >&2
  exit 1
fi

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

cargo fuzz build --sanitizer "$SANITIZER"
bin_dir=target/x86_64-unknown-linux-gnu/release

results=()
failed=0
for t in "${targets[@]}"; do
  corpus=corpus/$t
  artifacts=artifacts/$t
  if [ "${KEEP_CORPUS:-0}" != 1 ]; then
    rm -rf "$corpus"
  fi
  mkdir -p "$corpus" "$artifacts"
  log=$(mktemp)
  stamp=$(mktemp)
  echo "== $t: $RUNS runs from $(ls "seeds/$t" | wc -l) seeds" >&2
  set +e
  "$bin_dir/$t" "$corpus" "seeds/$t" -runs="$RUNS" -print_final_stats=1 -timeout=10 \
    -artifact_prefix="$artifacts/" ${FUZZ_ARGS:-} >"$log" 2>&1
  rc=$?
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  per_sec=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
  corp=$(grep -o 'corp: [0-9]*/[0-9]*[a-zA-Z]*' "$log" | tail -1 | cut -d' ' -f2)
  crashes=$(find "$artifacts" -type f -newer "$stamp" | wc -l)
  if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then
    failed=1
    echo "$t FAILED (exit $rc):" >&2
    # The panic's message (a harness says which property failed, with the input), then
    # where libFuzzer wrote the input.
    grep -A6 'panicked at' "$log" | head -12 >&2 || true
    grep -E '^SUMMARY|Test unit written' "$log" >&2 || true
  fi
  results+=("$(printf '%-12s %10s %10s %14s %8s' "$t" "${execs:-?}" "${per_sec:-?}" "${corp:-?}" "$crashes")")
  rm -f "$log" "$stamp"
done

printf '%-12s %10s %10s %14s %8s\n' target executions exec/s "corpus (n/size)" crashes
printf '%s\n' "${results[@]}"
exit "$failed"
