"""The package as pip installs it: it carries the canonical replay.lua (the file, not a
link to the repository), its type marker, and the sources of this tree and nothing else
(deps.sh was run, and builds from a clean tree)."""

from __future__ import annotations

import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import llmq_client
from llmq_client import plans

from .conftest import REPO

SOURCE = REPO / "producer" / "clients" / "python" / "src" / "llmq_client"


def test_the_installed_package_is_this_tree_not_the_sources() -> None:
    installed = Path(llmq_client.__file__).resolve().parent
    assert installed != SOURCE.resolve(), "the tests must run the installed package: run deps.sh"
    stale = [
        p.name
        for p in SOURCE.glob("*.py")
        if not (installed / p.name).exists() or (installed / p.name).read_bytes() != p.read_bytes()
    ]
    assert not stale, f"installed {stale} differ from the sources: run producer/clients/python/deps.sh"
    extra = sorted(p.name for p in installed.glob("*.py") if not (SOURCE / p.name).exists())
    assert not extra, f"installed {extra} are not in the sources: an earlier build was shipped"


def test_the_installed_package_carries_the_canonical_replay_script() -> None:
    canonical = (REPO / "shared" / "src" / "queue" / "replay.lua").read_text(encoding="utf-8")
    shipped = resources.files("llmq_client").joinpath("replay.lua")
    assert shipped.is_file()
    assert not Path(str(shipped)).is_symlink(), "the wheel holds the file itself"
    assert shipped.read_text(encoding="utf-8") == canonical
    assert plans.replay_script() == canonical
    # Its text lives only there: no module holds a copy of the script.
    for module in Path(llmq_client.__file__).parent.glob("*.py"):
        assert "redis.call(" not in module.read_text(encoding="utf-8"), module.name


def test_the_package_is_typed() -> None:
    assert resources.files("llmq_client").joinpath("py.typed").is_file()


def test_deps_sh_removes_an_earlier_build_before_installing(tmp_path: Path) -> None:
    """A stale build/lib (a module since removed) is packed into the wheel by setuptools:
    deps.sh must remove it before pip builds, not only after."""
    root = tmp_path / "repo"
    here = root / "producer" / "clients" / "python"
    here.mkdir(parents=True)
    source = REPO / "producer" / "clients" / "python"
    for name in ("deps.sh", "requirements-test.txt"):
        shutil.copy2(source / name, here / name)
    # deps.sh makes its virtualenv with the repository's deploy/venv.sh.
    (root / "deploy").mkdir()
    shutil.copy2(REPO / "deploy" / "venv.sh", root / "deploy" / "venv.sh")
    stale = here / "build" / "lib" / "llmq_client" / "removed_module.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("stale = True\n")
    (here / "src" / "llmq_client.egg-info").mkdir(parents=True)
    # A virtualenv whose pip notes what the tree held when it was asked to install.
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "pip.log"
    pip = venv / "bin" / "pip"
    pip.write_text(
        "#!/bin/sh\n"
        'case "$*" in *install*)\n'
        f'  if [ -e producer/clients/python/build ] || [ -e producer/clients/python/src/llmq_client.egg-info ]; then echo stale >>"{log}"; else echo clean >>"{log}"; fi;;\n'
        "esac\n"
    )
    pip.chmod(0o755)
    want = subprocess.run(
        ["sha256sum", str(here / "requirements-test.txt")], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    (venv / ".requirements.sha256").write_text(want + "\n")
    done = subprocess.run(
        ["bash", str(here / "deps.sh")],
        env={**os.environ, "LLMQ_PYTHON_CLIENT_VENV": str(venv)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert log.read_text() == "clean\n", "pip built with an earlier build's files in the tree"
    assert not (here / "build").exists()
