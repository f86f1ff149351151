# Sourced by scripts/run.sh and scripts/test.sh (the README's two commands): make sure
# the project is installed in a virtual environment, .venv in this folder, and set
# VENV_PYTHON to its interpreter.
#
# Debian 12 and Ubuntu 23.04+ mark their Python "externally managed" (PEP 668): a bare
# `pip install` there fails. So the project always goes into a virtual environment,
# created with Debian's python3-venv (installed with apt-get when missing). The base
# interpreter is /usr/bin/python3 when there is one (what a fresh Debian/Ubuntu has),
# whatever else is first on PATH; set PYTHON to use another (3.11 or newer).
#
# ensure_venv EXTRAS   e.g. ensure_venv "" or ensure_venv "[test]"

VENV=${VENV:-.venv}

_venv_sudo() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_venv() {
  local extras=$1
  local base=${PYTHON:-}
  if [ -z "$base" ]; then
    if [ -x /usr/bin/python3 ]; then base=/usr/bin/python3; else base=python3; fi
  fi
  if ! "$base" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: dicomrouter needs Python 3.11 or newer; $base is $("$base" -V 2>&1 || echo missing)." >&2
    echo "       Debian 12 and Ubuntu 24.04 have it; elsewhere set PYTHON=/path/to/python3.11." >&2
    return 1
  fi
  # A usable venv has a python that runs and a pip: one left half-made by a failed
  # `python3 -m venv` (no ensurepip) has neither, and is made again.
  if [ -d "$VENV" ] && ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    echo "== $VENV is incomplete: making it again"
    rm -rf "$VENV"
  fi
  if [ ! -d "$VENV" ]; then
    # Debian's Python has the venv module but not ensurepip without python3-venv.
    if ! "$base" -c 'import ensurepip, venv' >/dev/null 2>&1; then
      if [ "$base" = /usr/bin/python3 ] && command -v apt-get >/dev/null; then
        echo "== installing python3-venv (apt-get)"
        _venv_sudo apt-get update -qq
        _venv_sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      else
        echo "error: $base cannot create a virtual environment (no ensurepip)." >&2
        return 1
      fi
    fi
    echo "== creating the virtual environment $VENV ($("$base" -V 2>&1) at $base)"
    "$base" -m venv "$VENV"
  fi
  VENV_PYTHON="$VENV/bin/python"
  # (Re)install when pyproject.toml changed since the last install of these extras.
  local stamp="$VENV/.installed${extras}"
  local want
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "== installing dicomrouter${extras} into $VENV (pip)"
    "$VENV_PYTHON" -m pip install -q --disable-pip-version-check -e ".${extras}"
    echo "$want" >"$stamp"
  fi
}
