"""pyproject.toml declares version ranges, constraints.txt pins one tested point inside them, and
``make`` and environment.yml (for conda users) both install the project at that point."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = "constraints.txt"


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(d) for d in project["dependencies"] + project["optional-dependencies"]["test"]]


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for number, raw in enumerate((ROOT / CONSTRAINTS).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;=<>!~]+)", line)
        assert match, f"{CONSTRAINTS}:{number}: {raw!r} is not an exact NAME==VERSION pin"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"{CONSTRAINTS}:{number}: {name} is pinned twice"
        pins[name] = Version(match.group(2))
    return pins


def test_every_dependency_is_pinned_inside_its_range() -> None:
    pins = _pins()
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (pyproject.toml) has no exact version in {CONSTRAINTS}"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"{CONSTRAINTS} pins {name}=={pins[name]}, outside pyproject.toml's range {req.specifier}"


def test_torch_and_torchvision_pins_are_a_pair() -> None:
    """Each torch release has its own torchvision (2.11 <-> 0.26 ... 2.14 <-> 0.29): a constraints
    file edited for a cluster's torch must move both."""
    pins = _pins()
    torch, vision = pins["torch"], pins["torchvision"]
    assert (vision.major, vision.minor) == (0, torch.minor + 15) and torch.major == 2, (torch, vision)


def test_ranges_admit_the_gpu_images_torch() -> None:
    """Cluster users' CUDA stacks dictate their torch build: the GPU image's torch 2.11 and
    torchvision 0.26 (where benchmarks/gpu_check.sh runs) must satisfy the declared ranges."""
    specs = {canonicalize_name(r.name): r.specifier for r in _requirements()}
    assert specs["torch"].contains("2.11.0") and specs["torchvision"].contains("0.26.0")
    assert not specs["torch"].contains("2.10.0"), "torch below 2.11 was never run"


def test_conda_environment_installs_the_project_with_the_constraints() -> None:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    # The project with its test extra, under the constraints file: nothing is listed twice.
    assert sorted(pip) == sorted([f"-c {CONSTRAINTS}", "-e .[test]"])
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert Requirement(f"python{requires}").specifier.contains(python.split("=", 1)[1] + ".0")


def test_makefile_installs_with_the_constraints() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^CONSTRAINTS := {re.escape(CONSTRAINTS)}$", makefile, re.M)
    assert re.search(r"^\$\(STAMP\): pyproject\.toml \$\(CONSTRAINTS\)$", makefile, re.M), \
        "the install stamp must depend on both files"
    assert re.search(r"pip install .*-c \$\(CONSTRAINTS\) -e '\.\[test\]'", makefile)
