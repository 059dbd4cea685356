#!/usr/bin/env bash
# Creates <workspace>/.venv-k8s with kubernetes-validate (and PyYAML), which
# tests/tests/e2e/kubernetes.rs runs on the manifests that `kubectl
# kustomize` renders from deploy/kubernetes. Idempotent: pip runs only when
# requirements-k8s.txt changed since the last successful install.
#
#   setup-k8s-validate.sh              .venv-k8s in the workspace
#   TENTACLE_K8S_VENV=DIR setup-k8s-validate.sh   another place (the test reads it too)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
workspace="$(cd "$here/../.." && pwd)"
venv="${TENTACLE_K8S_VENV:-$workspace/.venv-k8s}"
"$here/setup-venv.sh" "$here/requirements-k8s.txt" "$venv"
# The schemas are bundled; check that the versions the test names are.
"$venv/bin/python" - <<'PY'
import pathlib, sys
import kubernetes_validate
schemas = pathlib.Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
missing = [v for v in ("1.30.0", "1.37.0") if not (schemas / f"v{v}-local-strict").is_dir()]
if missing:
    sys.exit(f"kubernetes-validate lacks the strict schemas for {', '.join(missing)} in {schemas}")
PY
