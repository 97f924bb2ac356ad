#!/usr/bin/env bash
# Builds CRIU 4.1.1 from its release source and installs it as /usr/local/sbin/criu, with the
# CUDA plugin in /usr/local/lib/criu. Tessera's transparent checkpoints need CRIU 4.x: Debian
# 12's CRIU 3.17 fails on current kernels (vDSO). Idempotent: does nothing when it is there.
# Needs root (apt, /usr/local) and deb.debian.org, where Debian keeps the upstream tarball.
set -euo pipefail
VERSION=4.1.1
SHA256=f80a66cb3726bb2116266d4759ce3bcbfab7abdb6b6d430bf20dd41911717afe
URL=http://deb.debian.org/debian/pool/main/c/criu/criu_${VERSION}.orig.tar.xz
PREFIX=${CRIU_PREFIX:-/usr/local}

if "$PREFIX/sbin/criu" --version 2>/dev/null | grep -q "Version: $VERSION" \
    && [ -f "$PREFIX/lib/criu/cuda_plugin.so" ]; then
    exit 0
fi
echo "building CRIU $VERSION (about a minute on 2 cores)" >&2
apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    build-essential pkg-config curl xz-utils ca-certificates \
    libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler python3-protobuf \
    libnl-3-dev libnet1-dev libcap-dev libbsd-dev libgnutls28-dev libaio-dev libnftables-dev \
    uuid-dev >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
curl -fsSL -o "$work/criu.tar.xz" "$URL"
echo "$SHA256  $work/criu.tar.xz" | sha256sum -c --quiet
tar -C "$work" -xf "$work/criu.tar.xz"
make -C "$work/criu-$VERSION" -j"$(nproc)" criu cuda_plugin >"$work/build.log" 2>&1 \
    || { tail -30 "$work/build.log" >&2; exit 1; }
install -D -m 0755 "$work/criu-$VERSION/criu/criu" "$PREFIX/sbin/criu"
install -D -m 0644 "$work/criu-$VERSION/plugins/cuda/cuda_plugin.so" "$PREFIX/lib/criu/cuda_plugin.so"
"$PREFIX/sbin/criu" --version >&2
