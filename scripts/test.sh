#!/usr/bin/env bash
# The README's test command: installs what is missing, builds every binary
# (the integration tests start them as real processes), runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --workspace --bins
cargo test --workspace
