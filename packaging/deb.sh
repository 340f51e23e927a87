#!/usr/bin/env bash
# Builds podsnap's .deb for Debian/Ubuntu nodes not managed by the DaemonSet, with dpkg-deb from
# a staged tree (no cargo-deb to build on every machine; the package is three binaries and two
# maintainer scripts).
#
#   packaging/deb.sh [--binaries DIR] [--output DIR]
#
#   --binaries DIR  podsnap, containerd-shim-podsnap-v1, podsnap-cni-ipam (default: target/release)
#   --output DIR    where podsnap_<version>_amd64.deb goes (default: target/debian)
#
# The package installs the three programs into /usr/bin (debug sections stripped) and the
# containerd drop-in as an example; `podsnap node install --bin-dir /usr/bin` then registers the
# runtime with containerd (README). Removing the package (`dpkg -r`) first undoes such an install
# (`podsnap node uninstall`, refused while podsnap pods run, which stops the removal).
set -euo pipefail

die() { printf 'deb: error: %s\n' "$*" >&2; exit 1; }

repo=$(cd "$(dirname "$0")/.." && pwd)
binaries="$repo/target/release"
output="$repo/target/debian"
while [ $# -gt 0 ]; do
  case "$1" in
    --binaries) binaries=$2; shift 2 ;;
    --output) output=$2; shift 2 ;;
    *) die "usage: $0 [--binaries DIR] [--output DIR]" ;;
  esac
done
programs=(podsnap containerd-shim-podsnap-v1 podsnap-cni-ipam)
for p in "${programs[@]}"; do
  [ -x "$binaries/$p" ] || die "$binaries/$p is missing: build the binaries first"
done
version=$(sed -nE 's/^version = "(.*)"/\1/p' "$repo/Cargo.toml" | head -n1)

stage=$(mktemp -d)
chmod 0755 "$stage"
trap 'rm -rf "$stage"' EXIT
install -d -m 0755 "$stage/DEBIAN" "$stage/usr/bin" "$stage/usr/share/doc/podsnap"
for p in "${programs[@]}"; do
  install -m 0755 "$binaries/$p" "$stage/usr/bin/$p"
  strip --strip-debug "$stage/usr/bin/$p"
done
install -m 0644 "$repo/packaging/containerd-podsnap.toml" "$stage/usr/share/doc/podsnap/containerd-podsnap.toml"
cat >"$stage/usr/share/doc/podsnap/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: podsnap
Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat >"$stage/DEBIAN/control" <<CONTROL
Package: podsnap
Version: $version
Architecture: amd64
Maintainer: podsnap developers <podsnap@localhost>
Installed-Size: $size
Depends: libc6 (>= 2.36), libssl3
Recommends: containerd (>= 2.0) | containerd.io (>= 2.0), runc, criu (>= 4.0)
Section: admin
Priority: optional
Description: checkpoint and restore whole Kubernetes pods
 podsnap is a containerd runtime shim (containerd-shim-podsnap-v1, CRI handler
 podsnap) and a CLI (podsnap) that checkpoint and restore every container of a
 pod at one instant with runc and CRIU. Register the runtime with containerd
 with: podsnap node install --bin-dir /usr/bin
CONTROL
cat >"$stage/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
# Undo `podsnap node install` before the programs go (refused while podsnap pods run: then the
# removal stops, and the node keeps its runtime).
set -e
if [ "$1" = remove ] && [ -e "${DPKG_ROOT:-}/etc/podsnap/installed.json" ]; then
  podsnap node uninstall --host-root "${DPKG_ROOT:-/}"
fi
exit 0
PRERM
chmod 0755 "$stage/DEBIAN/prerm"
mkdir -p "$output"
deb="$output/podsnap_${version}_amd64.deb"
dpkg-deb --root-owner-group -Zgzip --build "$stage" "$deb" >/dev/null
printf '%s\n' "$deb"
