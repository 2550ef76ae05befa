#!/usr/bin/env bash
# One entry point for set-up on a fresh Debian 12 machine (run as root, or with sudo available).
#   ./dev.sh run [ARGS]   install what is needed, then `vmscope run --gdb 1234` (or `vmscope run ARGS`)
#   ./dev.sh test [ARGS]  install what is needed, then run the test suite (ARGS go to pytest)
#   ./dev.sh setup        only install
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"

APT_PACKAGES=(
  python3 python3-venv python3-dev gcc binutils
  gdb gdb-multiarch lldb gdbserver
  qemu-system-x86 qemu-system-arm qemu-utils
  busybox-static binutils-aarch64-linux-gnu
  cpio xz-utils zstd kmod device-tree-compiler
)
VENV=.venv

say() { printf '\033[1mdev.sh:\033[0m %s\n' "$*" >&2; }

install_apt() {
  local missing=() sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  # arm64 guests and the arm64 nested lab take Debian's arm64 packages (apt-get download only)
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    say "adding Debian's arm64 architecture (for arm64 guest images)"
    $sudo dpkg --add-architecture arm64
    $sudo apt-get update -q
  fi
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
}

install_python() {
  # Debian's python3.11 (what the nested lab runs too); a venv keeps pip away from the system.
  local py=/usr/bin/python3.11; [ -x "$py" ] || py=python3
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $py"
    "$py" -m venv "$VENV"
  fi
  if [ ! -f "$VENV/.installed" ] || [ pyproject.toml -nt "$VENV/.installed" ]; then
    say "installing vmscope and its Python dependencies into $VENV"
    # build-backend warnings go to a log; shown only when the install fails
    if ! { "$VENV/bin/python" -m pip install -q --upgrade pip &&
           "$VENV/bin/python" -m pip install -q -e '.[test]'; } >"$VENV/pip.log" 2>&1; then
      cat "$VENV/pip.log" >&2
      say "pip install failed (log: $VENV/pip.log)"
      exit 1
    fi
    touch "$VENV/.installed"
  fi
}

setup() { install_apt; install_python; }

cmd=${1:-}
shift || true
case "$cmd" in
  setup) setup ;;
  run)
    setup
    if (($#)); then exec "$VENV/bin/vmscope" run "$@"; else exec "$VENV/bin/vmscope" run --gdb 1234; fi ;;
  test)
    setup
    exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: ./dev.sh run [ARGS] | test [PYTEST ARGS] | setup" >&2; exit 2 ;;
esac
