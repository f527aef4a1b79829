#!/usr/bin/env bash
# Installs the Debian packages the project needs, only when they are missing.
#   install-system-deps.sh          everything the test suite needs
#   install-system-deps.sh sandbox  only what a harness run needs (bubblewrap), for `make demo`
set -euo pipefail
mode="${1:-all}"
case "$mode" in all|sandbox) ;; *) echo "install-system-deps: unknown mode '$mode' (all or sandbox)" >&2; exit 2;; esac
need=()
# Case runs in a bubblewrap sandbox (harness/sandbox.py): the harness blocks without it.
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
if [ "$mode" = all ]; then
  command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
  command -v promtool >/dev/null 2>&1 || need+=(prometheus)
  command -v git >/dev/null 2>&1 || need+=(git)
  # The TLS backend test makes a throwaway certificate with the openssl command.
  command -v openssl >/dev/null 2>&1 || need+=(openssl)
  # The log rotation test runs the real logrotate against a running proxy.
  command -v logrotate >/dev/null 2>&1 || need+=(logrotate)
  # systemd-analyze checks deploy/case-proxy.service (the systemd package; no running
  # systemd is needed).
  command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
  # pip builds llama.cpp from source for the engine tier (cmake comes from PyPI).
  command -v c++ >/dev/null 2>&1 || need+=(g++ make)
fi
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install-system-deps: need root or sudo to install: ${need[*]}" >&2; exit 2; }
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
command -v bwrap >/dev/null
if [ "$mode" = all ]; then
  command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v git >/dev/null \
    && command -v c++ >/dev/null && command -v openssl >/dev/null && command -v logrotate >/dev/null \
    && command -v systemd-analyze >/dev/null
fi
