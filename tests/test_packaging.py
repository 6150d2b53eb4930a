"""Packaging metadata says what LICENSE and the README say."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_one_license_stated_the_same_way_everywhere():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"  # an SPDX expression (PEP 639), not a {text = ...} table
    assert project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().splitlines()[0] == "MIT License"
    assert "License: MIT." in (ROOT / "README.md").read_text()
    assert not any("Apache" in (ROOT / name).read_text() for name in ("pyproject.toml", "README.md", "LICENSE"))
