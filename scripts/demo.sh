#!/usr/bin/env bash
# The README's main command: builds and runs the local cluster demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --workspace --bins
exec ./target/debug/llama-coordinator demo "$@"
