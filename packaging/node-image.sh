#!/usr/bin/env bash
# Builds podsnap's node image (the DaemonSet's, packaging/deploy) from the built binaries, with
# umoci (no container daemon), and pushes it to a registry with skopeo.
#
#   packaging/node-image.sh [--binaries DIR] [--insecure] REF
#
#   --binaries DIR  where podsnap, containerd-shim-podsnap-v1 and podsnap-cni-ipam are
#                   (default: target/release of this repository; build with
#                   `cargo build --release --workspace --bins`)
#   --insecure      the registry speaks plain HTTP (a local test registry)
#   REF             e.g. registry.example.com/podsnap/node:0.1.0 (then set it in
#                   packaging/deploy/kustomization.yaml, `images:`)
#
# The image holds the three binaries in /usr/local/bin (debug sections stripped) and the shared
# libraries `podsnap` needs (copied from this machine as ldd lists them): `podsnap node install`
# runs in it and copies the shim and the CNI plugin onto the host, where they run with the
# host's libraries (glibc 2.36 or newer, as on the Debian 12 machine that built them).
set -euo pipefail

die() { printf 'node-image: error: %s\n' "$*" >&2; exit 1; }
log() { printf 'node-image: %s\n' "$*" >&2; }

repo=$(cd "$(dirname "$0")/.." && pwd)
binaries="$repo/target/release"
insecure=false
while [ $# -gt 0 ]; do
  case "$1" in
    --binaries) binaries=$2; shift 2 ;;
    --insecure) insecure=true; shift ;;
    -*) die "unknown option $1" ;;
    *) break ;;
  esac
done
[ $# -eq 1 ] || die "usage: $0 [--binaries DIR] [--insecure] REF"
ref=$1
for tool in umoci skopeo ldd strip; do
  command -v "$tool" >/dev/null || die "$tool is missing (packaging/install-deps.sh installs umoci and skopeo)"
done
programs=(podsnap containerd-shim-podsnap-v1 podsnap-cni-ipam)
for p in "${programs[@]}"; do
  [ -x "$binaries/$p" ] || die "$binaries/$p is missing: build the binaries first"
done
version=$(sed -nE 's/^version = "(.*)"/\1/p' "$repo/Cargo.toml" | head -n1)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umoci init --layout "$work/oci"
umoci new --image "$work/oci:node"
umoci unpack --image "$work/oci:node" "$work/bundle" >/dev/null
root="$work/bundle/rootfs"
install -d -m 0755 "$root/usr/local/bin" "$root/tmp"
for p in "${programs[@]}"; do
  install -m 0755 "$binaries/$p" "$root/usr/local/bin/$p"
  strip --strip-debug "$root/usr/local/bin/$p"
done
# The libraries of the program that runs in the image, and the loader.
ldd "$root/usr/local/bin/podsnap" |
  awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' |
  while read -r lib; do cp -L --parents "$lib" "$root"; done
umoci repack --image "$work/oci:node" "$work/bundle"
umoci config --image "$work/oci:node" \
  --os linux --architecture amd64 \
  --config.entrypoint /usr/local/bin/podsnap --config.cmd node --config.cmd status \
  --config.env PATH=/usr/local/bin:/usr/bin:/bin \
  --config.label "org.opencontainers.image.title=podsnap-node" \
  --config.label "org.opencontainers.image.version=$version"
umoci gc --layout "$work/oci"
tls=()
$insecure && tls=(--dest-tls-verify=false)
log "pushing $ref"
skopeo copy --quiet "${tls[@]}" "oci:$work/oci:node" "docker://$ref"
log "pushed $ref ($(du -sh "$work/oci" | cut -f1) as an OCI layout)"
