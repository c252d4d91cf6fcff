#!/usr/bin/env bash
# TorchServe 0.12 needs Java 17 or newer. Install it with apt when running as root; otherwise say what to install.
set -euo pipefail
version=$(java -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print v[1]; exit}' || true)
if [[ -n "${version}" && "${version}" -ge 17 ]]; then
  exit 0
fi
if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null; then
  echo "Java 17 not found: installing openjdk-17-jre-headless with apt-get" >&2
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openjdk-17-jre-headless
else
  echo "TorchServe needs Java 17 or newer (found: ${version:-none})." >&2
  echo "Install it, e.g. 'sudo apt-get install openjdk-17-jre-headless' or 'brew install openjdk@17', then retry." >&2
  exit 1
fi
