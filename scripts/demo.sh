#!/usr/bin/env bash
# The demo: discovery, three simulated hosts (agent + real Envoy on 127.0.0.2-4), reviews v1
# and v2, traffic through the mesh, then a live TOML edit that moves traffic.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
PILOTFISH_ENVOY="$(scripts/install-envoy.sh)"
export PILOTFISH_ENVOY
cargo build --workspace --bins --quiet
exec target/debug/pilotfish-demo "$@"
