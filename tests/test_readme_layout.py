"""The README's Layout section names every module of the tree, and only those."""

from __future__ import annotations

import re

from tests.conftest import ROOT


def layout_paths() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```\n(.*?)```", section, re.S)
    assert block, "the Layout section has no code block"
    return [line.split()[0] for line in block.group(1).splitlines() if line.strip()]


def test_every_listed_path_exists():
    missing = [p for p in layout_paths() if not (ROOT / p).exists()]
    assert not missing, f"README Layout names paths that do not exist: {missing}"


def test_every_module_of_app_is_listed():
    listed = set(layout_paths())
    modules = sorted(
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "app").rglob("*.py")
        if p.name != "__init__.py" and not any(f"{d}/" in listed for d in map(str, p.relative_to(ROOT).parents))
    )
    unlisted = [m for m in modules if m not in listed]
    assert not unlisted, f"README Layout misses modules: {unlisted}"
    top = {p.name + ("/" if p.is_dir() else "") for p in ROOT.iterdir() if not p.name.startswith(".")}
    for entry in ("colbert_patches/", "models/", "bench/", "scripts/", "tests/", "main.py"):
        assert entry in top and entry in listed
