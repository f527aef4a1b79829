#!/usr/bin/env bash
# Installs unmodified third-party agent CLIs from PyPI, each into its own virtual
# environment under .cache/agents/<name> (never the project's .venv: their pins must not
# decide the project's), and renders each agent's run profile from config/agents/<name>.toml
# into .cache/agents/<name>.toml with this checkout's absolute paths (a profile's
# [case.sandbox].ro_paths must be absolute). Idempotent: a stamp naming the pinned version
# is written only after the CLI ran (`--help`); the profile is re-rendered every time.
#
# Usage: scripts/install-agents.sh [mini-swe-agent ...]   (default: every agent below)
# Facts this relies on (measured here): mini-swe-agent 2.4.6 pulls LiteLLM 1.110.2 (about
# 100 s); aider-chat 0.86.2 pins LiteLLM 1.81.10 (about 60 s); both on Python 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

declare -A PIN=( [mini-swe-agent]="mini-swe-agent==2.4.6" [aider]="aider-chat==0.86.2" )
declare -A PROBE=( [mini-swe-agent]="bin/mini --help" [aider]="bin/aider --version" )

# The agents' venvs are made from the interpreter the project's .venv was made from: the
# harness exposes that interpreter's prefix to Case's sandbox read-only anyway.
PY=${AGENTS_PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then
    PY=$(.venv/bin/python -c 'import sys; print(sys._base_executable)')
  else
    PY=python3.11
  fi
fi
command -v "$PY" >/dev/null 2>&1 || { echo "install-agents: $PY not found" >&2; exit 2; }

agents=("$@")
[ ${#agents[@]} -gt 0 ] || agents=("${!PIN[@]}")
mkdir -p .cache/agents
for name in "${agents[@]}"; do
  spec=${PIN[$name]:-}
  [ -n "$spec" ] || { echo "install-agents: unknown agent '$name' (known: ${!PIN[*]})" >&2; exit 2; }
  venv=".cache/agents/$name"
  stamp="$venv/.stamp-${spec//==/-}"
  if ! { [ -f "$stamp" ] && [ -x "$venv/bin/python" ]; }; then
    start=$(date +%s)
    rm -f "$venv"/.stamp-*
    [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
    # pip warns once per package about the machine's local index directories; drop that noise.
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$spec" \
      2> >(grep -v "^WARNING: Location '" >&2)
    probe_home=$(mktemp -d)
    # shellcheck disable=SC2086
    MSWEA_SILENT_STARTUP=1 MSWEA_CONFIGURED=1 HOME="$probe_home" "$venv"/${PROBE[$name]} >/dev/null \
      || { rm -rf "$probe_home"; echo "install-agents: $name does not run from $venv" >&2; exit 1; }
    rm -rf "$probe_home"
    touch "$stamp"
    echo "install-agents: $spec in $venv ($(( $(date +%s) - start )) s)"
  fi
  # The profile, with this checkout's paths: the agent's venv and the Python it was made from.
  prefix=$("$venv/bin/python" -c 'import sys; print(sys.base_prefix)')
  sed -e "s#@AGENT_VENV@#$ROOT/$venv#g" -e "s#@AGENT_PYTHON_PREFIX@#$prefix#g" \
    "config/agents/$name.toml" > ".cache/agents/$name.toml.tmp"
  mv ".cache/agents/$name.toml.tmp" ".cache/agents/$name.toml"
done
