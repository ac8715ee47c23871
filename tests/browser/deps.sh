#!/usr/bin/env bash
# make browser-deps: what tests/tests/e2e/browser.rs needs.
#   - Debian's chromium at /usr/bin/chromium (installed with apt-get when missing);
#   - Playwright for Python, pinned in tests/browser/requirements.txt, in a virtualenv kept
#     between runs ($LLMQ_BROWSER_VENV, default ~/.cache/llmq/browser-venv) and rebuilt only
#     when that file changes. Playwright is never asked to download a browser.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null; then
        echo "browser-deps: Debian's chromium is missing; install it: apt-get install chromium" >&2
        exit 2
    fi
    as_root=()
    [ "$(id -u)" -eq 0 ] || as_root=(sudo)
    "${as_root[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq chromium >/dev/null
fi

venv="${LLMQ_BROWSER_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/llmq/browser-venv}"
deploy/venv.sh tests/browser/requirements.txt "$venv"
