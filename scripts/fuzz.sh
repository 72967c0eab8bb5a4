#!/usr/bin/env bash
# Runs the cargo-fuzz (libFuzzer) targets of fuzz/ for a fixed number of runs
# each, on nightly, and reports per target: runs, coverage, corpus size,
# crashes. Seeds come from fuzz/seeds/<target>/ and the kept regression
# inputs from fuzz/regressions/<target>/; new corpus entries go to
# fuzz/corpus/<target>/ and crash inputs to fuzz/artifacts/<target>/ (both
# ignored by git: copy a crash into regressions/ once it is fixed, where
# tests/tests/fuzz_regressions.rs replays it on stable).
#
# usage: bash scripts/fuzz.sh [-runs=N] [TARGET…]   (default: 1000000 runs, every target)
# Needs a nightly toolchain; installs cargo-fuzz when it is missing.
set -uo pipefail
cd "$(dirname "$0")/../fuzz"
runs=1000000
targets=()
for a in "$@"; do
  case "$a" in
    -runs=*) runs="${a#-runs=}" ;;
    *) targets+=("$a") ;;
  esac
done
command -v cargo-fuzz >/dev/null || nice -n 10 cargo install cargo-fuzz
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
# Debug assertions on: an arithmetic overflow is a crash. No sanitizer: the
# targets are safe Rust over the decoders (and ggml's C reader, which is
# not instrumented).
flags=(-s none --debug-assertions)
nice -n 10 cargo +nightly fuzz build "${flags[@]}" || exit 1
mkdir -p logs
failed=0
printf '%-18s %10s %8s %8s %10s %8s  %s\n' target runs cov corpus runs/s secs result
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "regressions/$t"
  log="logs/$t.log"
  start=$(date +%s.%N)
  nice -n 10 cargo +nightly fuzz run "${flags[@]}" "$t" "corpus/$t" "seeds/$t" "regressions/$t" -- \
    -runs="$runs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1
  rc=$?
  secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  done_line=$(grep -E '^#[0-9]+' "$log" | tail -1)
  n=$(sed -nE 's/^#([0-9]+).*/\1/p' <<<"$done_line")
  cov=$(sed -nE 's/.*cov: ([0-9]+).*/\1/p' <<<"$done_line")
  corp=$(sed -nE 's/.*corp: ([0-9]+).*/\1/p' <<<"$done_line")
  eps=$(awk -v n="${n:-0}" -v s="$secs" 'BEGIN { if (s > 0) printf "%d", n / s; else print "?" }')
  if [ $rc -eq 0 ]; then
    result=ok
  else
    failed=1
    crash=$(ls -t "artifacts/$t"/* 2>/dev/null | head -1)
    result="CRASH (exit $rc) ${crash:-see fuzz/$log}"
  fi
  printf '%-18s %10s %8s %8s %10s %8s  %s\n' "$t" "${n:-?}" "${cov:-?}" "${corp:-?}" "${eps:-?}" "$secs" "$result"
done
exit $failed
