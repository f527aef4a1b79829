#!/usr/bin/env bash
# Installs what `make bench` needs, only when it is missing (idempotent):
#   - Debian packages: wrk (the load generator) and nginx (the canned-JSON backend);
#   - LiteLLM's proxy in its own virtual environment, .cache/litellm-venv, so its
#     dependencies never touch the project's .venv.
# Set BENCH_SKIP_LITELLM=1 to skip the LiteLLM venv (the bench then reports LiteLLM as
# not measured).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 && SUDO="sudo"
fi

need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  need+=(nginx-light)
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] && [ -z "$SUDO" ]; then
    echo "install-bench-deps: need root or sudo to install: ${need[*]}" >&2
    exit 2
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # nginx-light is gone from newer Debian releases; fall back to nginx.
  if ! $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1; then
    fallback=("${need[@]/nginx-light/nginx}")
    $SUDO apt-get install -y -qq --no-install-recommends "${fallback[@]}" >/dev/null
  fi
  # The Debian package may start a system-wide nginx on :80; the bench runs its own.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet nginx 2>/dev/null; then
    $SUDO systemctl stop nginx || true
  fi
fi
command -v wrk >/dev/null
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]

if [ "${BENCH_SKIP_LITELLM:-0}" != 1 ]; then
  LVENV=.cache/litellm-venv
  if [ ! -x "$LVENV/bin/litellm" ]; then
    PY="${PYTHON:-python3}"
    mkdir -p .cache
    [ -x "$LVENV/bin/python" ] || "$PY" -m venv "$LVENV"
    "$LVENV/bin/python" -m pip install -q --disable-pip-version-check 'litellm[proxy]'
  fi
  # LiteLLM fetches a model price map from the internet on import unless told not to.
  LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_TELEMETRY=False "$LVENV/bin/python" -c 'import litellm' >/dev/null
fi
echo "install-bench-deps: ok"
