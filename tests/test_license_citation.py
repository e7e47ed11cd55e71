"""The repository's LICENSE and CITATION.cff say what pyproject.toml says: the license is
Apache-2.0 and the cited version is the package's version."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _project() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def test_license_file_is_the_apache_2_text_pyproject_names():
    assert _project()["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text.splitlines()[1] and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert "9. Accepting Warranty or Additional Liability." in text  # the full text, all 9 sections


def test_citation_cff_names_the_package_its_version_and_license():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0"
    assert cff["title"] == _project()["name"]
    assert str(cff["version"]) == _project()["version"]
    assert cff["license"] == _project()["license"]
    assert cff["authors"] == [{"name": "fl-merge developers"}]
