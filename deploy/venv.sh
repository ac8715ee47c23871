#!/usr/bin/env bash
# deploy/venv.sh REQUIREMENTS VENV: makes sure the virtualenv VENV holds what the pinned
# REQUIREMENTS file lists, rebuilding it only when that file changes (its hash is kept in the
# virtualenv). What CI's deploy checks, the browser test, the provider SDK check and the
# Python client's tests each keep between runs.
set -euo pipefail
req=$1
venv=$2
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
    echo "$want" >"$venv/.requirements.sha256"
fi
