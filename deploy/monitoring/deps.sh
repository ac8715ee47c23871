#!/usr/bin/env bash
# make promtool-deps: Prometheus's promtool, which the tests run on every binary's /metrics
# (tests/tests/e2e/metrics.rs). Debian's `prometheus` package holds it, pinned here; it is
# installed with apt-get when promtool is missing (the package's server is not started).
set -euo pipefail
version="2.42.0+ds-5+deb12u1"
if command -v promtool >/dev/null; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null; then
    echo "promtool-deps: promtool is missing; install it: apt-get install prometheus=$version" >&2
    exit 2
fi
as_root=()
[ "$(id -u)" -eq 0 ] || as_root=(sudo)
"${as_root[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq --no-install-recommends \
    "prometheus=$version" >/dev/null
