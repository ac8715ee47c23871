#!/usr/bin/env bash
# Installs and builds the Node client, each only when needed:
#   - `npm ci` (the exact versions of package-lock.json) when node_modules is missing or was
#     installed from another lock file;
#   - `npm run build` (src/*.ts -> dist/, and shared/src/queue/replay.lua -> dist/replay.lua)
#     when the sources, the build setup or replay.lua changed since the last build.
# Safe to run from several processes at once (they take turns).
set -euo pipefail
cd "$(dirname "$0")"

exec 9>.deps.lock
flock 9

lock=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ ! -d node_modules/redis ] || [ "$(cat node_modules/.llmq-lock.sha256 2>/dev/null)" != "$lock" ]; then
    # --ignore-scripts: the build below runs once, not again from `prepare`.
    npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
    echo "$lock" >node_modules/.llmq-lock.sha256
fi

want=$(cat package.json tsconfig.json scripts/build.mjs src/*.ts ../../../shared/src/queue/replay.lua | sha256sum | cut -d' ' -f1)
if [ ! -f dist/index.js ] || [ "$(cat node_modules/.llmq-build.sha256 2>/dev/null)" != "$want" ]; then
    npm run --silent build
    echo "$want" >node_modules/.llmq-build.sha256
fi
