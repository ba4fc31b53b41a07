"""The README's Settings table names every setting, and only settings that exist."""

from __future__ import annotations

import re
from pathlib import Path

from app.settings import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def settings_section() -> str:
    text = README.read_text()
    match = re.search(r"^## Settings\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "README.md has no '## Settings' section"
    return match.group(1)


def documented_settings() -> list[str]:
    """The variables named (in backticks) in the first column of the Settings table."""
    names = []
    for line in settings_section().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if not cells or cells[0] in ("variable", "") or set(cells[0]) <= set("-: "):
            continue
        found = re.findall(r"`([^`]+)`", cells[0])
        assert found, f"a Settings row names no `VARIABLE`: {line}"
        names.extend(found)
    return names


def test_settings_table_names_the_prefix():
    assert f"`{Settings.model_config['env_prefix']}`" in settings_section()


def test_settings_table_matches_the_settings_class():
    documented = documented_settings()
    prefix = Settings.model_config["env_prefix"]
    assert not [n for n in documented if n.startswith(prefix)], f"write the names without {prefix}"
    duplicated = sorted({n for n in documented if documented.count(n) > 1})
    assert not duplicated, f"documented twice in README's Settings table: {duplicated}"
    fields = {name.upper() for name in Settings.model_fields}
    missing = sorted(fields - set(documented))
    stale = sorted(set(documented) - fields)
    problems = []
    if missing:
        problems.append(f"settings missing from README's Settings table: {missing}")
    if stale:
        problems.append(f"README's Settings table documents settings that do not exist: {stale}")
    assert not problems, "; ".join(problems)
