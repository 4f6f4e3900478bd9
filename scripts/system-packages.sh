#!/usr/bin/env bash
# Install the missing Debian packages of a list file (default system-packages.txt: one
# package a line, # comments), or of the names given after --packages.
# As root: apt-get update + apt-get install. Otherwise: print the exact command and exit 1.
# SKIP_SYSTEM_PACKAGES=1 skips the check (tests that need a missing tool then fail or skip).
set -euo pipefail
[ "${SKIP_SYSTEM_PACKAGES:-0}" = 1 ] && exit 0
if [ "${1:-}" = --packages ]; then
  shift
  wanted=("$@")
else
  mapfile -t wanted < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "${1:-system-packages.txt}" | grep -v '^$')
fi
[ ${#wanted[@]} -eq 0 ] && exit 0

if ! command -v dpkg-query >/dev/null || ! command -v apt-get >/dev/null; then
  echo "system packages: not a Debian-like system (no dpkg/apt-get)." >&2
  echo "  Install the equivalents of: ${wanted[*]}" >&2
  echo "  then rerun with SKIP_SYSTEM_PACKAGES=1." >&2
  exit 1
fi

missing=()
for p in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  echo "system packages: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "system packages missing: ${missing[*]}" >&2
  echo "  run once:  sudo sh -c 'apt-get update && apt-get install -y ${missing[*]}'" >&2
  echo "  (or SKIP_SYSTEM_PACKAGES=1 to go on without them)" >&2
  exit 1
fi
