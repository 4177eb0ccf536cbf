#!/usr/bin/env bash
# Build the stand-in base images: a Debian 12 (bookworm) root file system made by debootstrap
# from Debian's packages, imported into podman, plus the few packages each real base provides.
# They let ops/*.Dockerfile and docker-compose.yml build and run, unchanged, on a host
# without a Docker daemon and without access to Docker Hub (ops/README.md, "Stand-in bases").
#
#   real base                            stand-in tag (localhost/...)          adds to Debian
#   nvidia/cuda:*-base-ubuntu24.04       vq-standin/cuda:bookworm              NVIDIA_* variables only
#   python:3.12-slim                     vq-standin/python:bookworm            python3, venv, `python`
#   nginxinc/nginx-unprivileged:*-alpine vq-standin/nginx-unprivileged:bookworm nginx, envsubst, wget, uid 101
#   redis:7                              vq-standin/redis:bookworm             redis-server, redis-cli
#
# Idempotent: an image that exists is kept (VQ_STANDIN_REBUILD=1 rebuilds them all).
# Needs root, Debian (dpkg, apt-get: podman, buildah, runc, debootstrap are installed when
# missing), and Debian's package mirror (DEBIAN_MIRROR).
set -euo pipefail
cd "$(dirname "$0")/../.."

SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PREFIX=${VQ_STANDIN_PREFIX:-localhost/vq-standin}
WORK=${VQ_STANDIN_WORK:-var/stand-in}
REBUILD=${VQ_STANDIN_REBUILD:-0}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/ops/stand-in/containers.conf}

if [ "$(id -u)" != 0 ]; then
  echo "build-bases: run as root (debootstrap, rootful podman)" >&2
  exit 2
fi
# podman's own Recommends included: catatonit (compose's `init: true`), and netavark with
# aardvark-dns (compose networks with service names), in case apt skips recommendations.
missing=()
for package in debootstrap podman buildah runc catatonit netavark aardvark-dns; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "build-bases: installing ${missing[*]} with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

exists() { [ "$REBUILD" != 1 ] && podman image exists "$1"; }
seconds() { date +%s; }

debian="$PREFIX/debian:$SUITE"
if exists "$debian"; then
  echo "build-bases: $debian exists"
else
  t0=$(seconds)
  rootfs="$WORK/rootfs"
  rm -rf "$rootfs"
  mkdir -p "$rootfs/etc/dpkg/dpkg.cfg.d"
  # As Docker's debian:*-slim: no manuals, docs or translations in the image.
  cp ops/stand-in/dpkg-nodoc.cfg "$rootfs/etc/dpkg/dpkg.cfg.d/01-nodoc"
  echo "build-bases: debootstrap $SUITE from $MIRROR"
  debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$rootfs" "$MIRROR" \
    > "$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
  cat > "$rootfs/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb ${MIRROR%/debian}/debian-security $SUITE-security main
SOURCES
  # Package scripts must not start services while an image is built.
  printf '#!/bin/sh\nexit 101\n' > "$rootfs/usr/sbin/policy-rc.d"
  chmod 755 "$rootfs/usr/sbin/policy-rc.d"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/var/log/*.log
  tar --numeric-owner -C "$rootfs" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["bash"]' - "$debian" >/dev/null
  rm -rf "$rootfs"
  echo "build-bases: $debian built in $(( $(seconds) - t0 )) s"
fi

for base in cuda python nginx-unprivileged redis; do
  tag="$PREFIX/$base:$SUITE"
  if exists "$tag"; then
    echo "build-bases: $tag exists"
    continue
  fi
  t0=$(seconds)
  buildah bud --isolation chroot --network host --format docker --layers -q \
    --build-arg "DEBIAN_IMAGE=$debian" -f "ops/stand-in/$base.Containerfile" -t "$tag" \
    ops/stand-in >/dev/null
  echo "build-bases: $tag built in $(( $(seconds) - t0 )) s"
done
