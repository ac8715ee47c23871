#!/usr/bin/env bash
# What tests/tests/e2e/client_python.rs needs: a virtualenv ($LLMQ_PYTHON_CLIENT_VENV, default
# ~/.cache/llmq/python-client-venv) holding the test dependencies pinned in
# producer/clients/python/requirements-test.txt (rebuilt only when that file changes) and the
# client itself, installed from this directory as `pip install ./producer/clients/python`
# would (not editable, so the tests run what a user installs; reinstalled on every run).
set -euo pipefail
cd "$(dirname "$0")/../../.."

here=producer/clients/python
venv="${LLMQ_PYTHON_CLIENT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/llmq/python-client-venv}"
deploy/venv.sh "$here/requirements-test.txt" "$venv"
# setuptools builds in the source tree and packs whatever build/lib holds: what an earlier
# build left there (a module since removed) would be shipped. Start clean, and leave it clean.
rm -rf "$here/build" "$here/src/llmq_client.egg-info"
"$venv/bin/pip" install --quiet --disable-pip-version-check --force-reinstall --no-deps "./$here"
# The client's own dependencies must be met by the pinned ones.
if ! broken=$("$venv/bin/pip" check --disable-pip-version-check 2>&1); then
    echo "deps.sh: the client's dependencies do not fit the pinned ones: $broken" >&2
    exit 1
fi
rm -rf "$here/build" "$here/src/llmq_client.egg-info"
