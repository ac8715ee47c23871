"""Renders the overlays once per test session with `kubectl kustomize` (offline)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from checks import REPO  # noqa: E402

# What gets rendered: our two overlays, and the operator's overlay the docs describe.
RENDERS = {
    "keda": REPO / "deploy/kubernetes/overlays/keda",
    "static": REPO / "deploy/kubernetes/overlays/static",
    "example-overlay": REPO / "deploy/tests/example-overlay",
}
KEDA_RENDERS = ["keda", "example-overlay"]


def render(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is needed to render the manifests (kubectl kustomize)")
    out = subprocess.run([kubectl, "kustomize", str(path)], check=True, capture_output=True, text=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    return {name: render(path) for name, path in RENDERS.items()}


@pytest.fixture(scope="session")
def dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()
