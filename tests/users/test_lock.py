"""The lock files agree with pyproject.toml and with what the tests run on (offline, a few seconds).

``uv.lock`` (``uv lock``) pins every package at an exact version with hashes; ``scripts/setup``
installs from it, so these tests run on exactly those versions. ``requirements.lock`` is its runtime
part exported for pip, which the Dockerfile installs. ``pyproject.toml`` keeps compatible ranges.
After a dependency change, ``scripts/lock`` rewrites both files. The wheel built from pyproject.toml
ships the sidecar's packages and nothing of the test suite.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from testsupport.processes import ROOT

UV_LOCK = ROOT / "uv.lock"
REQUIREMENTS_LOCK = ROOT / "requirements.lock"
FIX = "run scripts/lock (it rewrites uv.lock and requirements.lock from pyproject.toml), then scripts/setup test"


def uv(*args: str) -> subprocess.CompletedProcess:
    """Run the uv that scripts/setup installs into the virtual environment, offline."""
    exe = Path(sys.executable).with_name("uv")
    assert exe.exists(), f"{exe} is missing: scripts/setup installs uv into .venv"
    env = {**os.environ, "UV_OFFLINE": "1", "UV_NO_PROGRESS": "1"}
    return subprocess.run([str(exe), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def locked_entries() -> list[tuple[Requirement, list[str]]]:
    """``(name==version ; marker, [sha256 hashes])`` of every package in requirements.lock."""
    lines = REQUIREMENTS_LOCK.read_text(encoding="utf-8").replace("\\\n", " ").splitlines()
    entries = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            requirement, *hashes = line.split(" --hash=")
            entries.append((Requirement(requirement.strip()), [h.strip() for h in hashes]))
    return entries


def locked_requirements() -> list[Requirement]:
    """``name==version ; marker`` of every package in requirements.lock."""
    return [requirement for requirement, _ in locked_entries()]


def without_comments(text: str) -> list[str]:
    """The lines of a requirements file that are not comments (the header names the output file)."""
    return [line for line in text.splitlines() if not line.lstrip().startswith("#")]


def test_uv_lock_satisfies_pyproject() -> None:
    # uv compares the lock with pyproject.toml's requirements without any network access.
    result = uv("lock", "--check", "--offline", "--python", "3.11")
    assert result.returncode == 0, f"uv.lock is out of date with pyproject.toml: {FIX}\n{result.stderr}"


def test_requirements_lock_is_the_export_of_uv_lock() -> None:
    result = uv("export", "--frozen", "--no-dev", "--no-emit-project", "--no-emit-local", "--format", "requirements-txt")
    assert result.returncode == 0, result.stderr
    assert without_comments(result.stdout) == without_comments(REQUIREMENTS_LOCK.read_text(encoding="utf-8")), \
        f"requirements.lock differs from uv.lock: {FIX}"


def test_every_locked_requirement_is_pinned_with_hashes() -> None:
    entries = locked_entries()
    assert len(entries) > 50
    for requirement, hashes in entries:
        [spec] = requirement.specifier
        assert spec.operator == "==", requirement
        # pip's --require-hashes (the Dockerfile) needs a hash for every requirement.
        assert hashes and all(h.startswith("sha256:") for h in hashes), requirement


def test_the_tests_run_on_the_locked_versions() -> None:
    """What this environment has installed is what requirements.lock pins (scripts/setup installs
    uv.lock), so "tested" and "shipped in the image" name the same versions."""
    wrong = []
    for requirement in locked_requirements():
        if requirement.marker and not requirement.marker.evaluate():
            continue
        [spec] = requirement.specifier
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            wrong.append(f"{requirement.name} missing (locked {spec.version})")
            continue
        if canonicalize_name(installed) != canonicalize_name(spec.version) and installed != spec.version:
            wrong.append(f"{requirement.name} {installed} (locked {spec.version})")
    assert not wrong, f"installed versions differ from requirements.lock: {', '.join(wrong)}; run scripts/setup test"


def test_pyproject_keeps_ranges_for_people_who_install_the_package() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for line in project["dependencies"]:
        requirement = Requirement(line)
        assert requirement.specifier, f"{line}: give a compatible range (the lock file pins the exact version)"
    # The lock files pin what the ranges allow; a package of this repository (a uv path source, such as
    # the module client) is installed from its folder at the version its own pyproject.toml gives.
    locked = {canonicalize_name(r.name): next(iter(r.specifier)).version for r in locked_requirements()}
    sources = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["uv"]["sources"]
    for name, source in sources.items():
        local = tomllib.loads((ROOT / source["path"] / "pyproject.toml").read_text(encoding="utf-8"))["project"]
        locked[canonicalize_name(name)] = local["version"]
    for line in project["dependencies"]:
        requirement = Requirement(line)
        assert requirement.specifier.contains(locked[canonicalize_name(requirement.name)], prereleases=True), line


@pytest.mark.parametrize("name", ["prefect", "fastapi", "hydra-core"])
def test_uv_lock_and_requirements_lock_name_the_same_version(name: str) -> None:
    import tomllib

    packages = {p["name"]: p["version"] for p in tomllib.loads(UV_LOCK.read_text(encoding="utf-8"))["package"]}
    locked = {canonicalize_name(r.name): next(iter(r.specifier)).version for r in locked_requirements()}
    assert packages[name] == locked[name]


def test_module_client_dependencies_are_locked() -> None:
    """The module client (client/, its own distribution) is installed without dependency resolution
    (scripts/setup, Dockerfile): each of its dependencies must be in the lock, in its range."""
    import tomllib

    client = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    locked = {canonicalize_name(r.name): next(iter(r.specifier)).version for r in locked_requirements()}
    for line in client["dependencies"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in locked, f"client/ needs {line}, which uv.lock does not hold: add it to pyproject.toml, {FIX}"
        assert requirement.specifier.contains(locked[name], prereleases=True), f"{line} vs locked {locked[name]}"


def test_the_wheel_ships_the_sidecar_without_the_test_support(tmp_path: Path) -> None:
    """``testsupport`` serves the tests and benchmarks from the checkout (pytest's ``pythonpath``, the
    benchmarks' ``sys.path``, ``python_env`` for child processes); a user's install must not get it.
    Built from the checkout's tracked files that can hold packages, offline (uv's cache holds setuptools since scripts/setup)."""
    source = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "-z", "pyproject.toml", "README.md", "sidecar", "flows", "dispatcher",
                              "testsupport", "tests"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes((ROOT / name).read_bytes())
    exe = Path(sys.executable).with_name("uv")
    result = subprocess.run([str(exe), "build", "--wheel", "--out-dir", str(tmp_path / "dist"), str(source)],
                            env={**os.environ, "UV_OFFLINE": "1", "UV_NO_PROGRESS": "1"}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    [wheel] = (tmp_path / "dist").glob("ion_sidecar-*.whl")
    top = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {"sidecar", "flows", "dispatcher"} <= top and "testsupport" not in top and "tests" not in top, sorted(top)
