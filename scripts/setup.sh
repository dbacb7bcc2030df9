#!/usr/bin/env bash
# Prepare this machine for ebpfdiag: Debian packages the lab and the tests use, the
# controller in a venv, tracefs, and kernel headers that BCC can find. Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(python3-bpfcc bpfcc-tools bpftool linux-headers-amd64 openssh-server openssh-client
  sudo nftables iproute2 iperf3 conntrack python3-pyroute2 python3-venv tcpdump tshark clustershell pssh prometheus)

say() { echo "setup: $*" >&2; }

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    say "missing Debian packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}"
    exit 1
  fi
  say "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The distribution's python3 when it is 3.10 or newer: built with PGO and LTO, it starts the
# controller about a quarter faster than a source build such as pyenv's (ebpfdiag hosts:
# 0.11 s against 0.15 s, medians of 25 interleaved runs). $PYTHON chooses another one.
new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; }
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif new_enough /usr/bin/python3; then
  PY=/usr/bin/python3
else
  PY=python3
fi
if ! new_enough "$PY"; then
  say "no Python 3.10 or newer ($PY); set PYTHON to one" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $PY"
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
  say "installing ebpfdiag into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# An editable install has no byte code, and PYTHONDONTWRITEBYTECODE (set on some machines)
# keeps Python from writing it: every command would compile the controller's sources at
# start-up (about 50 ms). Compile them as an installed wheel would be; a source edited later
# is recompiled in memory as usual.
.venv/bin/python -m compileall -q src/ebpfdiag >/dev/null

if [ "$(id -u)" -eq 0 ]; then
  # BCC needs tracefs and headers; Debian ships none for custom kernels, so point BCC at the
  # nearest installed ones (the lab's --link-headers does the same, reversibly).
  mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing || true
  .venv/bin/ebpfdiag lab headers --link >&2 || true
fi
say "ready: .venv/bin/ebpfdiag"
