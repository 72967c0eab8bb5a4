#!/usr/bin/env bash
# The README's test command: installs what is missing, builds every binary
# (the integration tests start them as real processes), runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --workspace --bins
mkdir -p target
set +e
cargo test --workspace --no-fail-fast 2>&1 | tee target/test-output.log
rc=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' target/test-output.log
exit "$rc"
