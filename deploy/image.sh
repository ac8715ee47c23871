#!/usr/bin/env bash
# make image: builds the llmq image from the repository's Dockerfile on this machine, without
# a Docker daemon and without pulling anything from a container registry.
#
# The Dockerfile takes its two base images as build arguments (BUILDER, RUNTIME); `docker
# build .` uses the public ones (rust:1.95-bookworm, gcr.io/distroless/cc-debian12:nonroot).
# Here both are made from Debian 12's packages, fetched by mmdebstrap, and the same Dockerfile
# is built by `buildah bud --isolation chroot` (as root; the build's RUN steps share the host's
# network, for crates.io):
#   - RUNTIME (localhost/llmq-base/runtime:bookworm): what distroless cc-debian12 holds that
#     the binaries can use, as files extracted from exactly these packages: base-files,
#     netbase, tzdata, libc6, libgcc-s1 (and its gcc-12-base), ca-certificates (the bundle is
#     built from its Mozilla certificates, as update-ca-certificates would), plus
#     /etc/passwd and /etc/group with root, nonroot (65532) and nobody (65534). No shell, no
#     package manager, no other executable.
#   - BUILDER (localhost/llmq-base/builder:<rust version>-bookworm): Debian 12 minbase with
#     gcc, libc6-dev, ca-certificates and git, and this machine's Rust toolchain (its version
#     must be the one the Dockerfile's default BUILDER names) in /usr/local/rust, and the
#     host's CA bundle (for crates.io through a TLS-inspecting proxy, where there is one).
# Each base is made once and kept (buildah's storage); LLMQ_IMAGE_REBASE=1 makes them again.
# The build keeps its layers (--layers), so a second `make image` with the same dependencies
# rebuilds only the workspace.
#
# Prints the image's name, its size and each binary's size. `make image-check` runs it.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${LLMQ_IMAGE:-localhost/llmq:dev}
SUITE=bookworm
MIRROR=${LLMQ_DEBIAN_MIRROR:-http://deb.debian.org/debian}
RUNTIME_PACKAGES=(base-files netbase tzdata libc6 libgcc-s1 gcc-12-base ca-certificates)

say() { echo "image: $*" >&2; }
fail() { say "$*"; exit 1; }

[ "$(id -u)" = 0 ] || fail "buildah and mmdebstrap run as root here; run make image as root."
for tool in buildah mmdebstrap rustc; do
    command -v "$tool" >/dev/null ||
        fail "$tool is not installed; install it (Debian: apt-get install buildah mmdebstrap) and run make image again."
done

rust_version=$(rustc --version | awk '{print $2}')
pinned=$(sed -n 's/^ARG BUILDER=.*rust:\([0-9.]*\)-.*/\1/p' Dockerfile)
case "$rust_version" in
"$pinned" | "$pinned".*) ;;
*) fail "this machine's Rust is $rust_version but the Dockerfile builds with rust:$pinned; install Rust $pinned (rustup toolchain install $pinned) or change the Dockerfile's BUILDER." ;;
esac
RUNTIME_BASE=localhost/llmq-base/runtime:$SUITE
BUILDER_BASE=localhost/llmq-base/builder:$rust_version-$SUITE

have() { [ "${LLMQ_IMAGE_REBASE:-0}" != 1 ] && buildah inspect --type image "$1" >/dev/null 2>&1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A base image from a root filesystem tarball: FROM scratch, the tarball as its one layer.
from_tarball() { # name tarball [buildah config args...]
    local name=$1 tarball=$2 ctr
    shift 2
    ctr=$(buildah from scratch)
    buildah add --quiet "$ctr" "$tarball" / >/dev/null
    [ $# -eq 0 ] || buildah config "$@" "$ctr"
    buildah commit --quiet --rm "$ctr" "$name" >/dev/null
}

if ! have "$RUNTIME_BASE"; then
    say "making $RUNTIME_BASE from Debian's packages: ${RUNTIME_PACKAGES[*]}"
    root=$work/runtime
    mkdir -p "$root"
    # mmdebstrap fetches the packages (and their dependencies); the hook, run once they are
    # extracted, extracts only the listed ones again into $root; mmdebstrap's own tree is thrown away.
    include=$(IFS=,; echo "${RUNTIME_PACKAGES[*]}")
    # The hook is a shell command: the folder reaches it through the environment, never
    # pasted into its text.
    LLMQ_IMAGE_ROOT=$root mmdebstrap --quiet --variant=extract --include="$include" \
        --extract-hook="for p in ${RUNTIME_PACKAGES[*]}; do dpkg-deb --extract \"\$1\"/var/cache/apt/archives/\${p}_*.deb \"\$LLMQ_IMAGE_ROOT\"; done" \
        "$SUITE" /dev/null "$MIRROR"
    # What only a package manager or a shell would use: maintainer tools and their examples,
    # the login banner's script; each package's copyright stays.
    # glibc's iconv modules (8 MB) too: Rust's standard library never calls iconv.
    rm -rf "$root/usr/sbin/update-ca-certificates" "$root/etc/update-motd.d" "$root/usr/share/man" \
        "$root"/usr/lib/*-linux-gnu/gconv
    find "$root/usr/share/doc" -mindepth 2 -maxdepth 2 ! -name copyright -exec rm -rf {} +
    mkdir -p "$root/etc/ssl/certs" "$root/home/nonroot" "$root/tmp"
    cat "$root"/usr/share/ca-certificates/mozilla/*.crt >"$root/etc/ssl/certs/ca-certificates.crt"
    printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
        'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
        'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$root/etc/passwd"
    printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'nonroot:x:65532:' >"$root/etc/group"
    chown 65532:65532 "$root/home/nonroot"
    chmod 1777 "$root/tmp"
    tar -C "$root" --numeric-owner -cf "$work/runtime.tar" .
    from_tarball "$RUNTIME_BASE" "$work/runtime.tar" --user 65532:65532
fi

if ! have "$BUILDER_BASE"; then
    toolchain=$(rustc --print sysroot)
    say "making $BUILDER_BASE from Debian's packages and the Rust toolchain in $toolchain"
    mmdebstrap --quiet --variant=minbase --include=gcc,libc6-dev,ca-certificates,git \
        "$SUITE" "$work/builder.tar" "$MIRROR"
    # The toolchain without its HTML documentation (800 MB of it).
    mkdir -p "$work/rust/usr/local"
    cp -a "$toolchain" "$work/rust/usr/local/rust"
    rm -rf "$work/rust/usr/local/rust/share/doc"
    # This machine's trust store, for the build's downloads from crates.io: where a proxy
    # re-signs TLS, its certificate authority is in the host's bundle, not in Debian's.
    # Only the builder has it; the runtime image keeps Debian's bundle.
    mkdir -p "$work/rust/etc/ssl/certs"
    cp /etc/ssl/certs/ca-certificates.crt "$work/rust/etc/ssl/certs/ca-certificates.crt"
    tar -C "$work/rust" --numeric-owner -cf "$work/rust.tar" .
    ctr=$(buildah from scratch)
    buildah add --quiet "$ctr" "$work/builder.tar" / >/dev/null
    buildah add --quiet "$ctr" "$work/rust.tar" / >/dev/null
    buildah config --env CARGO_HOME=/usr/local/cargo \
        --env PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        "$ctr"
    buildah commit --quiet --rm "$ctr" "$BUILDER_BASE" >/dev/null
fi

say "building $IMAGE from ./Dockerfile (BUILDER=$BUILDER_BASE, RUNTIME=$RUNTIME_BASE)"
if ! buildah bud --quiet --isolation chroot --layers --force-rm --pull-never \
    --build-arg BUILDER="$BUILDER_BASE" --build-arg RUNTIME="$RUNTIME_BASE" \
    --build-arg LLMQ_COMMIT="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)" \
    -t "$IMAGE" . >"$work/build.log" 2>&1; then
    tail -30 "$work/build.log" >&2
    fail "building $IMAGE from ./Dockerfile failed (the end of its output is above)."
fi

ctr=$(buildah from --pull-never "$IMAGE")
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
mnt=$(buildah mount "$ctr")
mb() { du -sb "$1" | awk '{printf "%.1f", $1 / 1e6}'; }
echo "image=$IMAGE size_mb=$(mb "$mnt") buildah_size=\"$(buildah images --format '{{.Size}}' "$IMAGE")\""
for bin in llmq llmq-worker llmq-scheduler; do
    echo "binary=$bin size_mb=$(mb "$mnt/usr/local/bin/$bin")"
done
buildah umount "$ctr" >/dev/null
