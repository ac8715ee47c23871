#!/usr/bin/env bash
# make image-check: runs what `make image` built, from the image's own filesystem.
#   1. each binary prints its version, run as the image's user (nonroot, 65532);
#   2. `llmq migrate`, a worker and the scheduler from the image, against this machine's
#      Redis and Postgres and an llmq-mock on loopback (the host's build of the test tool):
#      the worker finishes a task submitted by the image's `llmq submit --wait`, the ledger
#      has its call, and the worker and the scheduler stop on SIGTERM with exit code 0.
# How it runs the image: `buildah run --isolation chroot --network host`. The container's
# root is the image's (nothing of the host's filesystem but the provider file, mounted
# read-only), it runs as the image's user, and it shares the host's network namespace, so
# 127.0.0.1 is the host's Redis, Postgres and mock. No daemon, as root.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${LLMQ_IMAGE:-localhost/llmq:dev}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
QUEUE=image-check-$$
# A database of its own on $DATABASE_URL's server, made and dropped here: a ledger another run
# migrated (from an unreleased commit whose migration changed since) must not fail this one.
base_url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/llmq}
SERVER_URL=${base_url%/*}
own_db=llmq_image_check_$$
DATABASE_URL=$SERVER_URL/$own_db

say() { echo "image-check: $*" >&2; }
fail() { say "$*"; exit 1; }

for tool in buildah psql redis-cli pgrep; do
    command -v "$tool" >/dev/null || fail "$tool is not installed; image-check needs it (Debian: buildah, postgresql-client, redis-tools, procps)."
done
buildah inspect --type image "$IMAGE" >/dev/null 2>&1 || fail "there is no image $IMAGE; run make image first."
[ "$(buildah inspect --type image --format '{{.OCIv1.Config.User}}' "$IMAGE")" = 65532:65532 ] ||
    fail "the image does not run as nonroot (65532:65532); see the Dockerfile's USER."

work=$(mktemp -d)
pids=()
ctr=$(buildah from --pull-never --name "llmq-image-check-$$" "$IMAGE")
# `buildah run` does not pass a signal on to what it runs: stop the processes under it too.
kill_tree() {
    local child
    for child in $(pgrep -P "$1"); do kill_tree "$child"; done
    kill -TERM "$1" 2>/dev/null || true
}
cleanup() {
    for pid in "${pids[@]}"; do kill_tree "$pid"; done
    wait 2>/dev/null || true
    buildah rm "$ctr" >/dev/null 2>&1 || true
    redis-cli -u "$REDIS_URL" --scan --pattern "llmq:{$QUEUE}:*" 2>/dev/null |
        xargs -r redis-cli -u "$REDIS_URL" del >/dev/null 2>&1 || true
    rm -rf "$work"
    psql "$SERVER_URL/postgres" -qc "DROP DATABASE IF EXISTS $own_db WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 143' TERM INT
psql "$SERVER_URL/postgres" -qc "CREATE DATABASE $own_db" >/dev/null || fail "could not make the database $own_db on $SERVER_URL."

# Runs one of the image's binaries in the container, as the image's user, on the host's
# network, with the provider file at /etc/llmq/providers.yaml.
in_image() {
    buildah run --isolation chroot --network host \
        --volume "$work/providers.yaml:/etc/llmq/providers.yaml:ro" \
        --env REDIS_URL="$REDIS_URL" --env DATABASE_URL="$DATABASE_URL" \
        --env LLMQ_CONFIG=/etc/llmq/providers.yaml --env LLMQ_MOCK_URL="${mock_url:-}" \
        "$ctr" -- "$@"
}

# What the container sees is the image: its files, its user.
mnt=$(buildah mount "$ctr")
for bin in llmq llmq-worker llmq-scheduler; do
    [ -x "$mnt/usr/local/bin/$bin" ] || fail "the image has no /usr/local/bin/$bin."
done
extra=$(cd "$mnt" && find . -type f -perm -u+x ! -name '*.so*' ! -path './usr/local/bin/*' -print -quit)
[ -z "$extra" ] || fail "the image holds executables besides the three binaries: $extra"
[ ! -e "$mnt/bin/sh" ] || fail "the image has a shell (/bin/sh); the runtime base must not."
buildah umount "$ctr" >/dev/null

: >"$work/providers.yaml"
for bin in llmq llmq-worker llmq-scheduler; do
    out=$(in_image "/usr/local/bin/$bin" --version) || fail "$bin --version failed in the image: $out"
    case "$out" in
    "$bin "[0-9]*) say "$out" ;;
    *) fail "$bin --version printed '$out', not its name and version." ;;
    esac
done

# llmq-mock from the host's build (a test tool, not in the image).
mock=${LLMQ_MOCK:-target/debug/llmq-mock}
[ -x "$mock" ] || cargo build --quiet -p llmq-tests --bin llmq-mock
"$mock" --listen 127.0.0.1:0 >"$work/mock.out" 2>"$work/mock.log" &
pids+=($!)
for _ in $(seq 1 100); do grep -q listening "$work/mock.out" 2>/dev/null && break; sleep 0.1; done
mock_url=$(sed -n 's/.*listening on //p' "$work/mock.out")
[ -n "$mock_url" ] || fail "llmq-mock did not start: $(cat "$work/mock.log")"
# The provider file reads LLMQ_MOCK_URL itself.
cp examples/providers.mock.yaml "$work/providers.yaml"

in_image /usr/local/bin/llmq migrate >"$work/migrate.log" 2>&1 || fail "llmq migrate failed in the image: $(cat "$work/migrate.log")"
in_image /usr/local/bin/llmq-worker --queue "$QUEUE" --concurrency 4 >"$work/worker.log" 2>&1 &
worker=$!
pids+=("$worker")
in_image /usr/local/bin/llmq-scheduler >"$work/scheduler.log" 2>&1 &
scheduler=$!
pids+=("$scheduler")

# The process of binary `name` that our `buildah run` (pid `run`) started: found among that
# run's descendants only, never another one of the host's. "pid uid".
descendant() { # run name
    local pid
    for pid in $(pgrep -P "$1"); do
        if [ "$(ps -o comm= -p "$pid")" = "$2" ]; then
            echo "$pid $(ps -o uid= -p "$pid" | tr -d ' ')"
            return 0
        fi
        descendant "$pid" "$2" && return 0
    done
    return 1
}
process_of() { # run name
    local found=
    for _ in $(seq 1 100); do
        found=$(descendant "$1" "$2") && break
        sleep 0.1
    done
    [ -n "$found" ] || fail "no $2 process started from the image."
    echo "$found"
}
read -r worker_pid uid < <(process_of "$worker" llmq-worker)
[ "$uid" = 65532 ] || fail "the worker from the image runs as user $uid, not nonroot (65532)."
read -r scheduler_pid uid < <(process_of "$scheduler" llmq-scheduler)
[ "$uid" = 65532 ] || fail "the scheduler from the image runs as user $uid, not nonroot (65532)."

result=$(in_image /usr/local/bin/llmq submit --queue "$QUEUE" --model mock-fast --wait --wait-timeout 60s \
    --prompt "Hello from the image") || fail "the task did not finish: $result
worker log:
$(tail -20 "$work/worker.log")"
case "$result" in
*"mock answer from mock-fast: Hello from the image"*) say "a worker from the image answered: $result" ;;
*) fail "the worker from the image answered '$result'." ;;
esac

# The finisher writes the ledger a moment after the result.
calls=0
for _ in $(seq 1 100); do
    calls=$(psql "$DATABASE_URL" -tAc "SELECT count(*) FROM provider_calls WHERE queue = '$QUEUE' AND outcome = 'ok'")
    [ "$calls" -ge 1 ] && break
    sleep 0.1
done
[ "$calls" -ge 1 ] || fail "the worker from the image wrote no call of queue $QUEUE to the ledger."

# SIGTERM, sent to the binary's own process as Kubernetes sends it to a container's first
# process: each stops gracefully, and `buildah run` ends with its exit code, 0.
for stop in "worker $worker $worker_pid" "scheduler $scheduler $scheduler_pid"; do
    read -r name run pid <<<"$stop"
    kill -TERM "$pid"
    code=0
    wait "$run" || code=$?
    [ "$code" = 0 ] || fail "the $name from the image exited with $code on SIGTERM: $(tail -5 "$work/$name.log")"
done
pids=("${pids[0]}")
say "the worker and the scheduler from the image stopped on SIGTERM with exit code 0"
echo "image-check: $IMAGE passed ($(buildah images --format '{{.Size}}' "$IMAGE"))"
