#!/usr/bin/env bash
# make sdk-deps: what tests/tests/e2e/batch.rs's provider-file test needs: OpenAI's and
# Anthropic's Python SDKs, pinned in tests/sdk/requirements.txt, in a virtualenv kept between
# runs ($LLMQ_SDK_VENV, default ~/.cache/llmq/sdk-venv) and rebuilt only when that file changes.
set -euo pipefail
cd "$(dirname "$0")/../.."

venv="${LLMQ_SDK_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/llmq/sdk-venv}"
deploy/venv.sh tests/sdk/requirements.txt "$venv"
