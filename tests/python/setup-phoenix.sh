#!/usr/bin/env bash
# Creates <workspace>/.venv-phoenix with Arize Phoenix, the trace backend the
# end-to-end tracing test exports to (a minute or two the first time).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
workspace="$(cd "$here/../.." && pwd)"
exec "$here/setup-venv.sh" "$here/requirements-phoenix.txt" "${TENTACLE_PHOENIX_VENV:-$workspace/.venv-phoenix}"
