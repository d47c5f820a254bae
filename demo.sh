#!/bin/bash
# The main job on this one machine: a master and three nodes on a LAN of
# network namespaces, throwaway certificates, a sample tree pushed with live
# progress and verified on every node. Run as root on Debian 12 (./demo.sh:
# a minimal Debian has no sudo).
set -euo pipefail
cd "$(dirname "$0")"
# iproute2 and procps (sysctl) build the LAN of namespaces (mrsyncd.testing.lan).
packages=(python3-twisted python3-openssl python3-service-identity python3-cryptography iproute2 procps
    # The data path's C module (setup.py); without it the pure-Python path runs.
    gcc python3-dev libssl-dev python3-setuptools)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
/usr/bin/python3 setup.py -q build_ext --inplace >/dev/null 2>&1 ||
    echo "demo.sh: the C module did not build; using the pure-Python data path" >&2
exec env PYTHONPATH="$PWD" /usr/bin/python3 demo/run.py
