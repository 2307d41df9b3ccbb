#!/usr/bin/env bash
# The whole test suite: unit tests and end-to-end tests against real Envoy.
# Installs what it needs (Envoy) first. Extra arguments go to `cargo test`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
PILOTFISH_ENVOY="$(scripts/install-envoy.sh)"
export PILOTFISH_ENVOY
cargo build --workspace --bins
cargo test --workspace "$@"
