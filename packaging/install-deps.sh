#!/usr/bin/env bash
# Install the podsnap node stack on a Debian 12 (bookworm) x86_64 machine, idempotently.
#
#   containerd 2.x     from Debian sid (bookworm/trixie ship 1.x; the shim speaks task API v3)
#   runc 1.1.5         from bookworm, without recommends (it recommends bookworm's broken criu),
#                      as /usr/sbin/runc
#   runc 1.3           from Debian sid, side by side in /usr/local/lib/podsnap/runc-1.3/ (runc, and
#                      sid's libc, loader and libseccomp in lib/, which the binary names as its
#                      interpreter and library path through bookworm's patchelf): what nodes with
#                      containerd 2.x run; the integration suite runs on it by default
#   CRIU 4.x           built from Debian sid's source package (bookworm's 3.17 fails on Linux 6.x)
#   CNI plugins        from Debian sid (containernetworking-plugins), into /opt/cni/bin
#   iptables, iproute2, protoc, busybox-static, build tools, openssl (the registry tests make
#   keys with it), zstd (the compression bench compares with the command)
#   docker-registry    from bookworm: a local OCI distribution registry for the `podsnap push`/`pull`
#                      integration tests (not started here; the tests run their own instance)
#   checkpointctl      from Debian sid (with sid's libc beside it when the system's is older):
#                      reads KEP-2008 container checkpoint archives, for the interop test
#   kubectl 1.36       from Debian sid, side by side in /usr/local/lib/podsnap/kubectl (not on
#                      PATH: another kubectl may be there): renders packaging/deploy offline
#   umoci, skopeo      from bookworm: build and push the node image (packaging/node-image.sh)
#
# Apt sources for sid are derived from this machine's own /etc/apt/sources.list.d/debian.sources
# (same mirror, same keyring), kept in a private directory so the system's apt setup is untouched.
# A second run checks versions and returns in seconds.
#
# Environment:
#   PODSNAP_DEPS_DIR   work directory for downloads and the CRIU build (default /var/cache/podsnap-deps)
set -euo pipefail

DEPS_DIR=${PODSNAP_DEPS_DIR:-/var/cache/podsnap-deps}
SYSTEM_SOURCES=/etc/apt/sources.list.d/debian.sources
CRIU_MIN_MAJOR=4
export DEBIAN_FRONTEND=noninteractive

log() { printf 'install-deps: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
[ "$(uname -m)" = x86_64 ] || die "only x86_64 is supported (found $(uname -m))"
[ -r "$SYSTEM_SOURCES" ] || die "$SYSTEM_SOURCES not found: cannot derive apt sources"

mkdir -p "$DEPS_DIR"

# ---------------------------------------------------------------------------------------------
# bookworm packages
# ---------------------------------------------------------------------------------------------
BOOKWORM_PKGS=(
  runc iptables iproute2 protobuf-compiler busybox-static ca-certificates xz-utils dpkg-dev
  build-essential pkgconf libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler python3-protobuf
  libnl-3-dev libnet1-dev libcap-dev uuid-dev libbsd-dev libgnutls28-dev libnftables-dev
  docker-registry openssl zstd umoci skopeo patchelf
)
missing=()
for p in "${BOOKWORM_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing from bookworm: ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# docker-registry's maintainer script starts a system instance on :5000 where an init system
# runs; the tests start their own on a free port and need only the binary.
[ -x /usr/bin/docker-registry ] || die "docker-registry is not installed"

# ---------------------------------------------------------------------------------------------
# A private apt configuration for sid, derived from the system's sources (no host names here)
# ---------------------------------------------------------------------------------------------
SID_DIR="$DEPS_DIR/apt-sid"
sid_apt() {
  apt-get -o Dir::Etc::sourcelist=/dev/null \
          -o Dir::Etc::sourceparts="$SID_DIR/sources.list.d" \
          -o Dir::State::Lists="$SID_DIR/lists" \
          -o Dir::Cache::archives="$SID_DIR/archives" \
          -o APT::Sandbox::User=root -o Debug::NoLocking=1 "$@"
}
# Refreshes the private sid lists unless they are less than a day old.
sid_prepare() {
  if [ -f "$SID_DIR/lists/.fresh" ] && [ -z "$(find "$SID_DIR/lists/.fresh" -mmin +1440)" ]; then
    return 0
  fi
  mkdir -p "$SID_DIR/sources.list.d" "$SID_DIR/lists/partial" "$SID_DIR/archives/partial"
  # Keep only the first stanza (the main archive), switch it to sid with deb-src.
  awk 'BEGIN{RS=""; ORS="\n\n"} NR==1' "$SYSTEM_SOURCES" |
    sed -e 's/^Types:.*/Types: deb deb-src/' -e 's/^Suites:.*/Suites: sid/' \
    >"$SID_DIR/sources.list.d/sid.sources"
  log "refreshing the private sid package lists"
  sid_apt update -qq
  touch "$SID_DIR/lists/.fresh"
}

# Download a binary package from sid and unpack it into a staging directory; print that directory.
# (`pkg/sid` selects sid's version even when the system has a higher one of that name installed.)
sid_unpack() {
  local pkg=$1 stage="$DEPS_DIR/stage-$1"
  sid_prepare
  rm -rf "$stage" && mkdir -p "$stage"
  (cd "$DEPS_DIR" && rm -f "${pkg}"_*.deb && sid_apt download -qq "$pkg/sid" >/dev/null)
  dpkg-deb -x "$DEPS_DIR/${pkg}"_*.deb "$stage"
  printf '%s\n' "$stage"
}

# ---------------------------------------------------------------------------------------------
# containerd 2.x
# ---------------------------------------------------------------------------------------------
containerd_major() {
  command -v containerd >/dev/null 2>&1 || { echo 0; return; }
  containerd --version 2>/dev/null | sed -nE 's/.* v?([0-9]+)\.[0-9]+\.[0-9]+.*/\1/p' | head -n1
}
if [ "$(containerd_major)" -lt 2 ] 2>/dev/null || [ -z "$(containerd_major)" ]; then
  log "installing containerd 2.x from sid"
  stage=$(sid_unpack containerd)
  for b in containerd ctr containerd-shim-runc-v2 containerd-stress; do
    [ -x "$stage/usr/bin/$b" ] && install -m 0755 "$stage/usr/bin/$b" "/usr/local/bin/$b"
  done
fi
containerd --version >/dev/null || die "containerd did not install"
[ "$(containerd_major)" -ge 2 ] || die "containerd is older than 2.0: $(containerd --version)"
command -v containerd-shim-runc-v2 >/dev/null || die "containerd-shim-runc-v2 missing"

# ---------------------------------------------------------------------------------------------
# runc 1.3 from sid, beside bookworm's runc (never replacing /usr/sbin/runc). sid's build needs
# glibc 2.38: the binary gets sid's loader as its interpreter and a library path holding sid's
# libc and libseccomp (no wrapper script: runc re-executes /proc/self/exe for `runc init`).
# ---------------------------------------------------------------------------------------------
RUNC13_DIR=/usr/local/lib/podsnap/runc-1.3
# (The output is read whole: `grep -q` on a pipe would end it early, and pipefail would fail.)
runc13_ok() { case "$("$RUNC13_DIR/runc" --version 2>/dev/null)" in "runc version 1.3."*) ;; *) return 1 ;; esac; }
if ! runc13_ok; then
  log "installing runc 1.3 from sid into $RUNC13_DIR"
  new="$RUNC13_DIR.new"
  rm -rf "$new" && mkdir -p "$new/lib"
  stage=$(sid_unpack runc)
  install -m 0755 "$stage/usr/sbin/runc" "$new/runc"
  sid_version=$(dpkg-deb -f "$DEPS_DIR"/runc_*.deb Version)
  case "$sid_version" in
    1.3.*) ;;
    *) die "sid's runc is $sid_version, not 1.3.x: update the runc 1.3 step of install-deps.sh" ;;
  esac
  for pkg in libc6 libseccomp2; do
    stage=$(sid_unpack "$pkg")
    for lib in libc.so.6 ld-linux-x86-64.so.2 libseccomp.so.2; do
      [ -e "$stage/usr/lib/x86_64-linux-gnu/$lib" ] &&
        cp -L "$stage/usr/lib/x86_64-linux-gnu/$lib" "$new/lib/$lib"
    done
  done
  for lib in libc.so.6 ld-linux-x86-64.so.2 libseccomp.so.2; do
    [ -f "$new/lib/$lib" ] || die "sid's $lib is missing from the unpacked packages"
  done
  patchelf --set-interpreter "$RUNC13_DIR/lib/ld-linux-x86-64.so.2" --set-rpath "$RUNC13_DIR/lib" "$new/runc"
  rm -rf "$RUNC13_DIR" && mkdir -p "$(dirname "$RUNC13_DIR")" && mv "$new" "$RUNC13_DIR"
fi
runc13_ok || die "runc 1.3 in $RUNC13_DIR does not run: $("$RUNC13_DIR/runc" --version 2>&1 | head -n1)"

# ---------------------------------------------------------------------------------------------
# CNI plugins
# ---------------------------------------------------------------------------------------------
CNI_BIN=/opt/cni/bin
if ! [ -x "$CNI_BIN/bridge" ] || ! [ -x "$CNI_BIN/host-local" ] || ! [ -x "$CNI_BIN/loopback" ] ||
   ! [ -x "$CNI_BIN/portmap" ]; then
  log "installing CNI plugins from sid"
  stage=$(sid_unpack containernetworking-plugins)
  mkdir -p "$CNI_BIN"
  src="$stage/usr/lib/cni"
  [ -d "$src" ] || src=$(dirname "$(find "$stage" -type f -name bridge | head -n1)")
  for f in "$src"/*; do install -m 0755 "$f" "$CNI_BIN/$(basename "$f")"; done
fi
[ -x "$CNI_BIN/bridge" ] || die "CNI bridge plugin missing in $CNI_BIN"

# ---------------------------------------------------------------------------------------------
# CRIU 4.x built from Debian's source package
# ---------------------------------------------------------------------------------------------
criu_major() {
  local v
  v=$(/usr/local/sbin/criu --version 2>/dev/null | sed -nE 's/^Version: ([0-9]+)\..*/\1/p')
  echo "${v:-0}"
}
if [ "$(criu_major)" -lt "$CRIU_MIN_MAJOR" ]; then
  log "building CRIU from sid's source package (about a minute)"
  sid_prepare
  src_dir="$DEPS_DIR/criu-src"
  rm -rf "$src_dir" && mkdir -p "$src_dir"
  (cd "$src_dir" && sid_apt source --download-only -qq criu >/dev/null 2>&1 || true)
  orig=$(ls "$src_dir"/criu_*.orig.tar.* 2>/dev/null | head -n1)
  [ -n "$orig" ] || die "could not download criu's orig tarball from sid"
  tar -C "$src_dir" -xf "$orig"
  build=$(find "$src_dir" -maxdepth 1 -mindepth 1 -type d -name 'criu-*' | head -n1)
  [ -n "$build" ] || die "unexpected layout of $orig"
  make -C "$build" -j"$(nproc)" criu >"$DEPS_DIR/criu-build.log" 2>&1 ||
    { tail -n 30 "$DEPS_DIR/criu-build.log" >&2; die "CRIU build failed (log: $DEPS_DIR/criu-build.log)"; }
  make -C "$build" install-criu PREFIX=/usr/local >>"$DEPS_DIR/criu-build.log" 2>&1 ||
    die "CRIU install failed (log: $DEPS_DIR/criu-build.log)"
fi
[ "$(criu_major)" -ge "$CRIU_MIN_MAJOR" ] || die "CRIU $CRIU_MIN_MAJOR.x is not installed"
# runc looks criu up on PATH; make sure no older criu shadows ours.
if [ "$(command -v criu)" != /usr/local/sbin/criu ]; then
  ln -sf /usr/local/sbin/criu /usr/local/bin/criu
fi
/usr/local/sbin/criu check >/dev/null 2>&1 || log "warning: 'criu check' is not clean on this kernel"

# ---------------------------------------------------------------------------------------------
# checkpointctl from sid (the tests check that a container part of a pod checkpoint is a KEP-2008
# container checkpoint archive it reads). sid's build needs glibc 2.38; on an older system it
# runs with sid's own libc and loader, kept beside it (nothing of the system's libc changes).
# ---------------------------------------------------------------------------------------------
CPCTL_DIR=/usr/local/lib/podsnap-checkpointctl
if ! checkpointctl --help >/dev/null 2>&1; then
  log "installing checkpointctl from sid"
  stage=$(sid_unpack checkpointctl)
  rm -rf "$CPCTL_DIR" && mkdir -p "$CPCTL_DIR"
  install -m 0755 "$stage/usr/bin/checkpointctl" "$CPCTL_DIR/checkpointctl"
  if "$CPCTL_DIR/checkpointctl" --help >/dev/null 2>&1; then
    ln -sf "$CPCTL_DIR/checkpointctl" /usr/local/bin/checkpointctl
  else
    libc=$(sid_unpack libc6)
    cp -a "$libc/usr/lib/x86_64-linux-gnu" "$CPCTL_DIR/lib"
    cat >/usr/local/bin/checkpointctl <<WRAPPER
#!/bin/sh
# checkpointctl from Debian sid with sid's libc (installed by podsnap's install-deps.sh)
exec $CPCTL_DIR/lib/ld-linux-x86-64.so.2 --library-path $CPCTL_DIR/lib $CPCTL_DIR/checkpointctl "\$@"
WRAPPER
    chmod 0755 /usr/local/bin/checkpointctl
  fi
fi
checkpointctl --help >/dev/null 2>&1 || die "checkpointctl does not run"

# ---------------------------------------------------------------------------------------------
# kubectl from sid (kustomize 5.8 inside), beside whatever kubectl the machine has: the manifest
# test renders packaging/deploy with it. A Go binary that needs only libc.
# ---------------------------------------------------------------------------------------------
KUBECTL_DIR=/usr/local/lib/podsnap/kubectl
KUBECTL_MIN_MINOR=36
kubectl_minor() {
  "$KUBECTL_DIR/kubectl" version --client 2>/dev/null | sed -nE 's/^Client Version: v1\.([0-9]+)\..*/\1/p'
}
if [ "$(kubectl_minor)" = "" ] || [ "$(kubectl_minor)" -lt "$KUBECTL_MIN_MINOR" ]; then
  log "installing kubectl from sid into $KUBECTL_DIR"
  stage=$(sid_unpack kubectl)
  mkdir -p "$KUBECTL_DIR"
  install -m 0755 "$stage/usr/bin/kubectl" "$KUBECTL_DIR/kubectl"
fi
[ "$(kubectl_minor)" -ge "$KUBECTL_MIN_MINOR" ] 2>/dev/null || die "kubectl 1.$KUBECTL_MIN_MINOR+ did not install in $KUBECTL_DIR"
command -v umoci >/dev/null && command -v skopeo >/dev/null || die "umoci or skopeo is not installed"

# ---------------------------------------------------------------------------------------------
# Live migration: CRIU's page server sizes its pipes to 4 MiB, above the kernel's default
# fs.pipe-max-size (1 MiB); without CAP_SYS_RESOURCE (withheld in some VMs) it then fails at the
# first page. Raised now and at every boot (never lowered).
# ---------------------------------------------------------------------------------------------
PIPE_MAX=4194304
if [ "$(cat /proc/sys/fs/pipe-max-size)" -lt "$PIPE_MAX" ]; then
  log "raising fs.pipe-max-size to $PIPE_MAX (CRIU's page server, live migration)"
  sysctl -qw fs.pipe-max-size=$PIPE_MAX
fi
if [ -d /etc/sysctl.d ] && [ ! -f /etc/sysctl.d/60-podsnap.conf ]; then
  printf '# podsnap: CRIU page server pipes (live migration)\nfs.pipe-max-size = %s\n' "$PIPE_MAX" > /etc/sysctl.d/60-podsnap.conf
fi
[ "$(cat /proc/sys/fs/pipe-max-size)" -ge "$PIPE_MAX" ] || die "fs.pipe-max-size stays below $PIPE_MAX"

log "ready: $(containerd --version | awk '{print $1, $3}'), runc $(runc --version | sed -n 's/^runc version //p') and $("$RUNC13_DIR/runc" --version | sed -n 's/^runc version //p'), criu $(/usr/local/sbin/criu --version | sed -n 's/^Version: //p'), $(protoc --version)"
