#!/usr/bin/env bash
# Runs every test: unit tests beside the code, and the end-to-end tests in
# tests/ that drive the real binaries, in processes and in containers.
# As root it first installs the Debian packages those tests drive and are
# missing (tinyproxy, systemd, OpenSSH, kubectl, etcd-server and
# etcd-client; the list is below), then the Python venvs.
#
#   tests/run.sh [--full] [cargo test arguments...]
#
# --full runs every cell of the fault matrix (192 cells, about 15 minutes
# more) instead of the quick tier CI runs (24 cells: every fault in every
# mode at both stages). Other arguments go to `cargo test`.
#
# The binaries are linked statically (glibc included), so the container
# images are built from the very binaries these tests run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "${1:-}" = "--full" ]; then
    shift
    export TENTACLE_FULL_MATRIX=1
fi

started=$SECONDS
phase_started=$SECONDS
phase() {
    local now=$SECONDS
    if [ -n "${phase_name:-}" ]; then
        echo "tests/run.sh: ${phase_name} took $((now - phase_started)) s" >&2
    fi
    phase_name=$1
    phase_started=$now
    echo "== ${phase_name}" >&2
}

is_root() { [ "$(id -u)" -eq 0 ]; }

# Debian packages the tests drive: a real HTTP CONNECT proxy (tinyproxy),
# `systemd-analyze` for the unit files, OpenSSH (the peer `tentacle-sim bench`
# measures against), `kubectl kustomize` for the manifests, and etcd
# (etcd-server's /usr/bin/etcd, etcd-client's etcdctl) for the clusters the
# tests of the hub that spans several nodes start (tests/src/etcd.rs). The
# image build downloads bash-static, busybox-static and tinyproxy itself
# with `apt-get download`.
phase "system packages"
missing=()
command -v tinyproxy >/dev/null 2>&1 || [ -x /usr/sbin/tinyproxy ] || missing+=(tinyproxy)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh >/dev/null 2>&1 || missing+=(openssh-client)
command -v kubectl >/dev/null 2>&1 || missing+=(kubectl)
[ -x /usr/bin/etcd ] || missing+=(etcd-server)
[ -x /usr/bin/etcdctl ] || missing+=(etcd-client)
if [ ${#missing[@]} -gt 0 ]; then
    if is_root; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    elif [[ " ${missing[*]} " == *" tinyproxy "* ]]; then
        echo "tests/run.sh: tinyproxy is missing; install it with 'sudo apt-get install tinyproxy'" >&2
        exit 1
    else
        echo "tests/run.sh: not installing ${missing[*]} without root; the tests that need them say so and are skipped" >&2
    fi
fi

# The container tests need the Docker engine. In CI its absence is a
# failure, not a reason to skip.
if ! docker info >/dev/null 2>&1; then
    if [ "${CI:-}" = "true" ]; then
        echo "tests/run.sh: the Docker engine cannot be reached (docker info failed) and CI=true: the container tests must run" >&2
        exit 1
    fi
    echo "tests/run.sh: the Docker engine cannot be reached; the container tests will say they are skipped" >&2
fi

phase "python tools"
# Stock (non-Rust) gRPC tooling for the interoperability tests.
tests/python/setup-venv.sh
# A real trace backend (Arize Phoenix) for the tracing test.
tests/python/setup-phoenix.sh
# Offline validation of the Kubernetes manifests.
tests/python/setup-k8s-validate.sh

# Static binaries: only the x86_64 glibc target exists here, so glibc is
# linked statically (crt-static) with that target named explicitly; build
# scripts and proc macros still build for the host as usual.
export CARGO_BUILD_TARGET=x86_64-unknown-linux-gnu
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static"

phase "build"
# The end-to-end tests start target/x86_64-unknown-linux-gnu/debug/tentacle,
# tentacle-hub and tentacle-sim, and build the images from them.
cargo build --workspace --bins

phase "tests"
# The fault matrix appends its summary here; it is printed after the suite.
export TENTACLE_FAULT_MATRIX_SUMMARY="$PWD/target/fault-matrix-summary.txt"
rm -f "$TENTACLE_FAULT_MATRIX_SUMMARY"
cargo test --workspace "$@"
if [ -f "$TENTACLE_FAULT_MATRIX_SUMMARY" ]; then
    grep '^fault matrix' "$TENTACLE_FAULT_MATRIX_SUMMARY" >&2 || true
fi

phase "done"
echo "tests/run.sh: everything took $((SECONDS - started)) s" >&2
