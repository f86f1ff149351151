#!/usr/bin/env bash
# The README's run command. On a fresh Debian/Ubuntu machine it installs python3-venv
# (apt-get) when missing, installs dicomrouter into .venv (again only when
# pyproject.toml changed), and runs `dicomrouter ARGS`, by default `serve`: the router
# on ./dicomrouter.yaml when there is one (`dicomrouter init` writes it), else on its
# embedded defaults. Examples:
#   bash scripts/run.sh                                  # serve
#   bash scripts/run.sh init                             # first admin user
#   bash scripts/run.sh check --config router.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
ensure_venv ""
[ $# -gt 0 ] || set -- serve
exec "$VENV/bin/dicomrouter" "$@"
