#!/usr/bin/env bash
# make deploy-check: the Kubernetes manifests and the Dockerfile, checked offline in seconds.
#   1. kubectl kustomize renders each overlay;
#   2. kubernetes-validate --strict checks the result against the API schemas of several
#      Kubernetes versions (it has none for KEDA's kinds: those it skips, and only those);
#   3. yamllint, hadolint;
#   4. deploy/tests (pytest): what no schema knows, e.g. the KEDA trigger matching the worker.
# The tools come from deploy/tests/requirements.txt; .ci/run installs them into
# $LLMQ_DEPLOY_VENV (default ~/.cache/llmq/deploy-venv), which this script puts first on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

# The oldest Kubernetes the manifests are meant for, one in between, and the newest
# kubernetes-validate knows.
K8S_VERSIONS=(1.30 1.33 1.37)
# Our overlays, and the operator's example overlay, which adds the web page (components/web).
OVERLAYS=(kubernetes/overlays/keda kubernetes/overlays/static tests/example-overlay)
# The only kinds that may go unchecked for want of a schema (KEDA's and the prometheus-operator's).
UNCHECKED_KINDS='ScaledObject|TriggerAuthentication|PodMonitor|PrometheusRule'

venv="${LLMQ_DEPLOY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/llmq/deploy-venv}"
if [ -x "$venv/bin/python" ]; then
    PATH="$venv/bin:$PATH"
fi
missing=()
for tool in kubectl kubernetes-validate yamllint hadolint; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
python3 -c 'import pytest, yaml' 2>/dev/null || missing+=("pytest and PyYAML")
if [ ${#missing[@]} -gt 0 ]; then
    echo "deploy-check: missing ${missing[*]}. Install the pinned tools with" >&2
    echo "  python3 -m venv $venv && $venv/bin/pip install -r deploy/tests/requirements.txt" >&2
    echo "(kubectl: Debian's package kubectl, or any kubectl with kustomize built in)" >&2
    exit 2
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

for path in "${OVERLAYS[@]}"; do
    overlay=$(basename "$path")
    kubectl kustomize "deploy/$path" >"$out/$overlay.yaml"
    objects=$(grep -c '^kind:' "$out/$overlay.yaml")
    for version in "${K8S_VERSIONS[@]}"; do
        if ! kubernetes-validate --strict --quiet -k "$version" "$out/$overlay.yaml" >"$out/validate.log" 2>&1; then
            cat "$out/validate.log" >&2
            echo "deploy-check: $overlay does not validate against Kubernetes $version" >&2
            exit 1
        fi
        # A kind or apiVersion it has no schema for is only a warning to it; fail on any but
        # the KEDA and prometheus-operator kinds, so a typo in an apiVersion cannot pass
        # unchecked.
        if grep -v -E "Couldn't find schema for kind ($UNCHECKED_KINDS) with api version (keda\.sh|monitoring\.coreos\.com)/" \
            "$out/validate.log" | grep -q .; then
            cat "$out/validate.log" >&2
            echo "deploy-check: unexpected output validating $overlay against Kubernetes $version" >&2
            exit 1
        fi
        skipped=$(grep -c "Couldn't find schema" "$out/validate.log" || true)
        note=""
        [ "$skipped" -eq 0 ] || note=" ($skipped KEDA and prometheus-operator objects skipped: no schema for them)"
        echo "kubernetes-validate --strict -k $version: $path, $objects objects ok$note"
    done
done

yamllint -s -c deploy/.yamllint deploy/
echo "yamllint: deploy/ ok"
hadolint Dockerfile
echo "hadolint: Dockerfile ok"

python3 -m pytest -q -p no:cacheprovider deploy/tests
