#!/usr/bin/env bash
# Creates a virtualenv and installs a requirements file into it. Idempotent:
# pip runs only when the requirements changed since the last successful
# install.
#
#   setup-venv.sh                      .venv with requirements.txt (grpcio,
#                                      for tests/tests/e2e/stock_grpc_tools.rs)
#   setup-venv.sh REQUIREMENTS VENV    any other pair
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
workspace="$(cd "$here/../.." && pwd)"
requirements="${1:-$here/requirements.txt}"
venv="${2:-${TENTACLE_VENV:-$workspace/.venv}}"
python="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
    echo "creating $venv" >&2
    "$python" -m venv "$venv"
fi

hash="$(sha256sum "$requirements" | cut -d' ' -f1)"
marker="$venv/.tentacle-requirements-$hash"
if [[ -f "$marker" ]]; then
    exit 0
fi

echo "installing $(basename "$requirements") into $venv" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --requirement "$requirements"
rm -f "$venv"/.tentacle-requirements-*
touch "$marker"
