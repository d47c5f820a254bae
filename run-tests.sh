#!/bin/bash
# Install what the tests need, build the data path's C module, and run the
# whole suite twice: on Debian 12's own libraries (python3-twisted 22.4,
# pyOpenSSL 23.0, cryptography 38) and on the current PyPI releases in a
# virtualenv, after ruff and mypy; then the engine's tests once more on the
# pure-Python data path.
# Run as root on Debian 12: the LAN tests build network namespaces.
set -euo pipefail
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive

debian_packages=(
    python3-twisted python3-openssl python3-service-identity python3-cryptography
    python3-hypothesis python3-pytest python3-pytest-xdist python3-venv python3-pip
    # Readiness (Type=notify): python3-systemd, and what builds the
    # virtualenv's systemd-python from source.
    python3-systemd libsystemd-dev pkg-config
    # The master's optional Prometheus endpoint.
    python3-prometheus-client
    iproute2 iptables procps
    # The power-loss test: ext4 on a loop device.
    e2fsprogs
    # The data path's C module (setup.py): a compiler, Python's and OpenSSL's headers.
    gcc python3-dev libssl-dev
    # tests/system/test_package.py: build the Debian package, check it, install it.
    build-essential dpkg-dev debhelper dh-python pybuild-plugin-pyproject
    python3-all-dev python3-setuptools python3-wheel lintian systemd man-db adduser
)
missing=()
for p in "${debian_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

venv=${MRSYNCD_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
    /usr/bin/python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --upgrade \
    'twisted[tls]' pyopenssl cryptography service_identity systemd-python prometheus_client hypothesis pytest \
    pytest-xdist ruff mypy mypy-zope

export PYTHONPATH=$PWD
echo "== the data path's C modules"
# In place, for both runs below (the virtualenv is made from /usr/bin/python3,
# so one build serves both); a failed build fails the run.
MRSYNCD_REQUIRE_NATIVE=1 /usr/bin/python3 setup.py -q build_ext --inplace
/usr/bin/python3 -c 'from mrsyncd.wire import datagram, erasure; assert datagram.native() and erasure.native(), "a C module did not load"'
echo "== ruff and mypy"
"$venv/bin/ruff" check mrsyncd tests bench demo
"$venv/bin/ruff" format --check mrsyncd
"$venv/bin/mypy" mrsyncd bench demo

# The suite under one interpreter ($1): with arguments, as they say; else
# the tiers that build no LAN on every core (pytest-xdist: their multicast
# groups and ports are drawn at random, their files are their own), then
# the LAN tier alone, whose capped links, timings and memory trends want
# the machine to themselves.
suite() {
    local python=$1
    shift
    if (($#)); then
        "$python" -m pytest -p no:cacheprovider -q "$@"
    else
        "$python" -m pytest -p no:cacheprovider -q -m "not lan" -n auto
        "$python" -m pytest -p no:cacheprovider -q -m lan
    fi
}

echo "== Debian 12 libraries: $(/usr/bin/python3 -c 'import twisted, OpenSSL; print("Twisted", twisted.__version__, "pyOpenSSL", OpenSSL.__version__)')"
suite /usr/bin/python3 "$@"

echo "== current PyPI releases: $("$venv/bin/python" -c 'import twisted, OpenSSL; print("Twisted", twisted.__version__, "pyOpenSSL", OpenSSL.__version__)')"
suite "$venv/bin/python" "$@"

if (($# == 0)); then
    # The pure-Python data path, for hosts without the C module: the same
    # contract (tests/unit/test_datagram.py runs both paths side by side anyway).
    echo "== pure-Python data path (MRSYNCD_PURE_PYTHON=1)"
    MRSYNCD_PURE_PYTHON=1 /usr/bin/python3 -m pytest -p no:cacheprovider -q -n auto \
        tests/integration/test_receiver.py tests/integration/test_transfer.py \
        tests/integration/test_intake.py tests/unit/test_erasure.py
fi
