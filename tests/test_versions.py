"""The recorded versions (constraints.txt, installed by make) pin every dependency pyproject.toml
names, each inside the range pyproject.toml gives people who pip install the package."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict:
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt pins exact versions only: {line!r}"
            found[canonicalize_name(name)] = Version(version)
    return found


def requirements() -> list:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return [Requirement(text) for text in listed]


def test_every_dependency_is_pinned_inside_its_range():
    pinned = pins()
    for requirement in requirements():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{name} has no pin in constraints.txt (run make lock)"
        assert requirement.specifier.contains(pinned[name], prereleases=True), \
            f"{name}=={pinned[name]} is outside pyproject.toml's {requirement.specifier}"
        assert not requirement.specifier.contains(Version("999")), f"{name} has no upper bound in pyproject.toml"


def test_make_installs_the_pins_and_torch_matches_them():
    makefile = (ROOT / "Makefile").read_text()
    assert "-c $(CONSTRAINTS)" in makefile
    torch_spec = next(line for line in makefile.splitlines() if line.startswith("TORCH_SPEC"))
    assert f"torch=={pins()['torch']}" in torch_spec
