#!/usr/bin/env bash
# Runs every test: unit tests beside the code, and the end-to-end tests in
# tests/ that drive the real binaries. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Stock (non-Rust) gRPC tooling for the interoperability tests.
tests/python/setup-venv.sh
# The end-to-end tests start target/debug/tentacle and tentacle-sim.
cargo build --workspace --bins
cargo test --workspace "$@"
