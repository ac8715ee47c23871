"""The package as pip installs it: it carries the canonical replay.lua (the file, not a
link to the repository), its type marker, and the sources of this tree (deps.sh was run)."""

from __future__ import annotations

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
