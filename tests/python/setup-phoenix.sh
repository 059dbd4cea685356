#!/usr/bin/env bash
# Creates <workspace>/.venv-phoenix with Arize Phoenix, the trace backend the
# end-to-end tracing test exports to. Idempotent: pip runs only when
# requirements-phoenix.txt changed since the last successful install.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
workspace="$(cd "$here/../.." && pwd)"
venv="${TENTACLE_PHOENIX_VENV:-$workspace/.venv-phoenix}"
requirements="$here/requirements-phoenix.txt"
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

echo "installing $(basename "$requirements") into $venv (a minute or two)" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --requirement "$requirements"
rm -f "$venv"/.tentacle-requirements-*
touch "$marker"
