#!/usr/bin/env bash
# Installs what a fresh Debian machine with the Rust toolchain lacks (C/C++
# build tools, cmake and libclang for llama.cpp) and fetches the default model
# into the cache. Idempotent: does nothing when everything is present.
set -euo pipefail
need=()
command -v cc >/dev/null || need+=(build-essential)
command -v c++ >/dev/null || need+=(g++)
command -v cmake >/dev/null || need+=(cmake)
command -v clang >/dev/null || need+=(clang)
command -v pkg-config >/dev/null || need+=(pkg-config)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1 || need+=(libclang-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The OpenAI API tests use the official Python client; the chart checks use
# PyYAML and jsonschema.
python3 -c "import openai" 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check openai==3.57.0
python3 -c "import yaml, jsonschema" 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check pyyaml==6.0.3 jsonschema==4.26.0
# The tiny per-architecture test models (scripts/make-test-models.py) are
# written with the gguf package (llama.cpp's gguf-py, published on PyPI).
python3 -c "import importlib.metadata as m; assert m.version('gguf') == '0.19.0'" 2>/dev/null \
  || python3 -m pip install --quiet --disable-pip-version-check gguf==0.19.0 numpy==2.4.6
bash "$(dirname "$0")/tools.sh"
bash "$(dirname "$0")/fetch-model.sh" >/dev/null
