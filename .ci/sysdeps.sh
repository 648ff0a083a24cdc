#!/usr/bin/env bash
# Install Debian packages the project needs, by their package names (e.g. bubblewrap git).
# As root this runs apt-get; otherwise it stops and prints the exact command to run.
set -euo pipefail
declare -A BIN=([bubblewrap]=bwrap [docker.io]=dockerd [git]=git [debootstrap]=debootstrap
                [python3-pytest]=pytest-3 [btrfs-progs]=mkfs.btrfs)
missing=()
for pkg in "$@"; do
  command -v "${BIN[$pkg]:-$pkg}" >/dev/null 2>&1 || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ]; then
  echo "installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "missing system packages: ${missing[*]}" >&2
  echo "run:  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
