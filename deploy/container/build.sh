#!/usr/bin/env bash
# Build the arvados-dispatch-cloud container image from a built binary:
#   deploy/container/build.sh [BINARY] [IMAGE]
# BINARY defaults to target/release/arvados-dispatch-cloud, IMAGE to
# localhost/arvados-dispatch-cloud:latest. Extra buildah options (storage driver, isolation)
# come from $BUILDAH_OPTS and $BUILDAH_BUD_OPTS.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
binary="${1:-$here/../../target/release/arvados-dispatch-cloud}"
image="${2:-localhost/arvados-dispatch-cloud:latest}"
[ -x "$binary" ] || { echo "build.sh: $binary: not an executable" >&2; exit 1; }

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
root="$ctx/rootfs"
mkdir -p "$root/usr/bin" "$root/etc/ssl/certs" "$root/tmp"
chmod 1777 "$root/tmp"
install -m 0755 "$binary" "$root/usr/bin/arvados-dispatch-cloud"
# The shared libraries the binary links, at the paths the dynamic linker looks for them.
ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\/.*ld-linux/ { print $1 }' | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/:/nonexistent\narvados:x:10001:10001:arvados-dispatch-cloud:/tmp:/nonexistent\n' > "$root/etc/passwd"
printf 'root:x:0:\narvados:x:10001:\n' > "$root/etc/group"
cp "$here/Containerfile" "$ctx/Containerfile"
# Docker format keeps the HEALTHCHECK (OCI images have none).
# shellcheck disable=SC2086
buildah ${BUILDAH_OPTS:-} bud ${BUILDAH_BUD_OPTS:-} --format docker -t "$image" -f "$ctx/Containerfile" "$ctx"
