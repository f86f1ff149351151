#!/usr/bin/env bash
# The README's test command. On a fresh Debian machine it installs what the tests
# need (dcmtk and Orthanc as real DICOM peers, Debian's chromium for the dashboard's
# browser test, python3-venv), installs the project with its test dependencies into
# the virtual environment .venv (scripts/venv.sh, shared with scripts/run.sh: Debian's
# Python refuses a bare pip install, PEP 668), lints, and runs the whole suite, interop
# and browser tests included. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"

missing=()
[ -x /usr/bin/storescu ] || missing+=(dcmtk)
[ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
# Orthanc's DICOMweb plugin: the STOW-RS peer of tests/test_dicomweb_e2e.py and bench/stow_bench.py.
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
# dciodvfy validates the de-identified test corpus (tests/transforms/test_deidentify_corpus.py).
[ -x /usr/bin/dciodvfy ] || missing+=(dicom3tools)
# Playwright drives Debian's chromium (executable_path); it never downloads its own.
[ -x /usr/bin/chromium ] || missing+=(chromium)
# tests/test_packaging.py checks the systemd unit with systemd-analyze verify.
command -v systemd-analyze >/dev/null || missing+=(systemd)
# The index's second database: the suite starts a throwaway PostgreSQL cluster of its
# own with Debian's initdb/pg_ctl (tests/support/postgres.py), unless
# DICOMROUTER_TEST_POSTGRES_URL names a server; the packaged service is not started.
compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]} (apt-get)"
  $SUDO apt-get update -qq
  # The packaged Orthanc and PostgreSQL services must not start (the tests start their
  # own instances on free ports, and 4242 stays free for the quick start): invoke-rc.d
  # honours RUNLEVEL=1, deb-systemd-invoke only a policy-rc.d that says no.
  policy_added=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    policy_added=1
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  $SUDO env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq "${missing[@]}" >/dev/null
  if [ -n "$policy_added" ]; then
    $SUDO rm -f /usr/sbin/policy-rc.d
    trap - EXIT
  fi
  if [ -d /run/systemd/system ] && [ -e /lib/systemd/system/orthanc.service ]; then
    $SUDO systemctl disable --now orthanc.service >/dev/null 2>&1 || true
  fi
fi

# The S3 destination's tests start their own local S3 server (moto's server mode, a
# [test] dependency installed below): tests/support/s3.py. Nothing to start here.
. scripts/venv.sh
ensure_venv "[test]"
PYTHON=$VENV_PYTHON

echo "== lint"
"$PYTHON" -m ruff check src tests bench
"$PYTHON" -m ruff format --check src tests bench
"$PYTHON" -m mypy src/dicomrouter
# The layers of docs/architecture.md (also part of the suite; here it fails first).
"$PYTHON" -m pytest -p no:cacheprovider -q tests/test_layers.py

echo "== tests"
"$PYTHON" -m pytest -p no:cacheprovider -ra "$@"
