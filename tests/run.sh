#!/usr/bin/env bash
# Runs every test: unit tests beside the code, and the end-to-end tests in
# tests/ that drive the real binaries. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# A real HTTP CONNECT proxy for the polling-through-a-proxy tests.
if ! command -v tinyproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/tinyproxy ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "tests/run.sh: tinyproxy is missing; install it with 'sudo apt-get install tinyproxy'" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tinyproxy >/dev/null
fi
# Stock (non-Rust) gRPC tooling for the interoperability tests.
tests/python/setup-venv.sh
# A real trace backend (Arize Phoenix) for the tracing test.
tests/python/setup-phoenix.sh
# The end-to-end tests start target/debug/tentacle, tentacle-hub and tentacle-sim.
cargo build --workspace --bins
cargo test --workspace "$@"
