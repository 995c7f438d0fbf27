#!/usr/bin/env bash
# Build local stand-ins for the public base images (python:3.11-slim-bookworm, redis:7.4-alpine) on a
# machine that cannot reach Docker Hub, so the real Dockerfile and docker-compose.yml are built
# and run unchanged, with PYTHON_IMAGE / REDIS_IMAGE pointed at these tags.
#
# Both are Debian bookworm made by debootstrap and loaded with `docker import`. An image that
# already exists under its tag is reused; FORCE=1 rebuilds. Prints the two tags on stdout as
# shell assignments (PYTHON_IMAGE=... REDIS_IMAGE=...); everything else goes to stderr.
#
# Stand-in Python is Debian's python3 (3.11) at /usr/bin/python3, not /usr/local/bin/python as in
# the official image: the Dockerfile only relies on `python3` being on PATH.
set -euo pipefail

PYTHON_STANDIN="${PYTHON_STANDIN:-kite-bridge-standin/python:3.11-bookworm}"
REDIS_STANDIN="${REDIS_STANDIN:-kite-bridge-standin/redis:7.0-bookworm}"
SUITE="${STANDIN_SUITE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
FORCE="${FORCE:-0}"

log() { printf 'standin: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "debootstrap needs root"
docker info >/dev/null 2>&1 || die "no Docker engine answers (see tests/e2e/compose.sh)"

if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2
fi

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

WORK="$(mktemp -d /tmp/bridge-standin.XXXXXX)"
cleanup() {
    # debootstrap leaves /proc and friends mounted when it fails half-way.
    for mnt in proc sys dev/pts dev; do
        find "$WORK" -maxdepth 2 -type d -path "*/$mnt" -exec umount -l {} \; 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

# rootfs NAME PACKAGES: debootstrap a minimal bookworm with PACKAGES into $WORK/NAME.
rootfs() {
    local name="$1" packages="$2" dir="$WORK/$1"
    log "debootstrap $SUITE ($packages) into $dir, from $MIRROR"
    if ! debootstrap --variant=minbase --include="$packages" "$SUITE" "$dir" "$MIRROR" \
        >"$WORK/$name.log" 2>&1; then
        tail -n 30 "$WORK/$name.log" >&2
        die "debootstrap of $name failed (log above)"
    fi
    # Trust the same extra CAs as this machine (a TLS-intercepting egress proxy signs with one):
    # pip inside `docker build` only reaches the package index when the base image trusts it.
    if [[ -x $dir/usr/sbin/update-ca-certificates ]] &&
        compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$dir/usr/local/share/ca-certificates/"
        chroot "$dir" update-ca-certificates >&2
    fi
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir"/tmp/* \
        "$dir"/usr/share/doc "$dir"/usr/share/man "$dir"/usr/share/locale
}

# import NAME TAG CHANGE...: load $WORK/NAME as TAG with Dockerfile-style CHANGE lines.
import() {
    local name="$1" tag="$2"
    shift 2
    local args=()
    for change in "$@"; do args+=(--change "$change"); done
    tar --numeric-owner -C "$WORK/$name" -c . | docker import "${args[@]}" - "$tag" >/dev/null
    log "built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | numfmt --to=iec))"
}

if [[ $FORCE == 1 ]] || ! have_image "$PYTHON_STANDIN"; then
    rootfs python "python3,python3-venv,python3-pip,ca-certificates"
    import python "$PYTHON_STANDIN" \
        'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        'ENV LANG=C.UTF-8' \
        'CMD ["python3"]'
else
    log "reusing $PYTHON_STANDIN"
fi

if [[ $FORCE == 1 ]] || ! have_image "$REDIS_STANDIN"; then
    # redis-server pulls in redis-tools, so redis-cli is there for the compose healthcheck.
    rootfs redis "redis-server"
    mkdir -p "$WORK/redis/data"
    import redis "$REDIS_STANDIN" \
        'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        'WORKDIR /data' \
        'EXPOSE 6379' \
        'CMD ["redis-server", "--protected-mode", "no"]'
else
    log "reusing $REDIS_STANDIN"
fi

printf 'PYTHON_IMAGE=%s\nREDIS_IMAGE=%s\n' "$PYTHON_STANDIN" "$REDIS_STANDIN"
