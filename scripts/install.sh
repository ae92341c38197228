#!/usr/bin/env bash
# Install banger on this machine, then run its main job.
#   1. system packages (apt): QEMU, e2fsprogs, iproute2, iptables, git, zstd, openssh-client, python3-venv,
#      mmdebstrap (the default image), a C toolchain + bc/bison/flex/libelf-dev (the
#      optional microvm-6.1 kernel), docker-registry/umoci/skopeo (the OCI tests),
#      dnsperf/dnsmasq-base (the DNS benchmark)
#   2. a virtual environment in .venv with banger's core and every first-party plugin
#      (editable: pip with local path installs), plus the test tools
#   3. `banger` and `bangerd` on PATH (/usr/local/bin as root, else ~/.local/bin)
#   4. the main job: `banger doctor`, then boot a real VM and show what it printed
#      (scripts/first_vm.py: the default image debian-bookworm and its kernel, built
#      here from Debian's packages the first time)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

APT_PACKAGES=(
  python3 python3-venv
  qemu-system-x86 qemu-utils
  e2fsprogs iproute2 iptables git zstd openssh-client
  kmod mmdebstrap
  make gcc bc bison flex libelf-dev
  docker-registry umoci skopeo
  dnsperf dnsmasq-base
)

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> apt: installing ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "==> apt: all system packages present"
fi

# The system's python3 by default, not one under a home directory (pyenv's in /root):
# banger is for every user of the machine, and a user cannot run an interpreter that
# lies in a directory only root may enter.
if [ -z "${PYTHON:-}" ] && [ -x /usr/bin/python3 ]; then PY=/usr/bin/python3; else PY=${PYTHON:-python3}; fi
py_home=$(dirname "$(readlink -f "$(command -v "$PY")")")
if [ -f .venv/pyvenv.cfg ] && ! grep -qx "home = $py_home" .venv/pyvenv.cfg; then
  echo "==> .venv was made with another python ($(sed -n 's/^home = //p' .venv/pyvenv.cfg)): making it anew with $PY"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
echo "==> pip: installing banger and its plugins into .venv"
plugin_args=(-e guest)  # the guest package first: the agent plugin depends on it
for d in plugins/*/; do plugin_args+=(-e "$d"); done
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" "${plugin_args[@]}" 2>&1 \
  | { grep -v "^WARNING: Location .* is ignored" || true; }

if [ -w /usr/local/bin ]; then BIN=/usr/local/bin; else BIN=$HOME/.local/bin; mkdir -p "$BIN"; fi
for exe in banger bangerd; do ln -sf "$ROOT/.venv/bin/$exe" "$BIN/$exe"; done
echo "==> linked banger and bangerd into $BIN"

echo "==> banger doctor"
"$BIN/banger" doctor
echo "==> booting a first VM"
.venv/bin/python scripts/first_vm.py
