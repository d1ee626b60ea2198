#!/usr/bin/env bash
# Host packages the benchmarks need beyond scripts/install-deps.sh: fio and
# iperf3 for bench/io.sh (copied into the lab with their libraries, and from
# there into the guest). Debian packages, installed with apt.
#
#   bench/deps.sh
set -euo pipefail
PKGS=(fio iperf3)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} = 0 ]; then
  echo "bench/deps.sh: ${PKGS[*]} already installed"
  exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
# iperf3 asks (debconf) whether to start a daemon: no questions, no daemon.
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" ||
  { $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"; }
