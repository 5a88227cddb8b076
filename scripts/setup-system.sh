#!/usr/bin/env bash
# Installs the system packages and Rust components longhaul needs, once. Idempotent: packages
# already present are not touched, and apt is only called when something is missing.
set -euo pipefail
# chromium: the dashboard test drives a real headless browser; prometheus: its promtool checks
# the exposition of /metrics.
packages=(build-essential pkg-config ca-certificates python3-venv iproute2 procps docker-compose chromium prometheus)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if command -v rustup >/dev/null; then
  for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c" >&2
  done
fi
