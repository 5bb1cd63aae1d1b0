"""The README and ``sidecar --help`` stand alone: every repository path they name exists in a clone,
and they send readers to nothing outside it (no shared folder, no design notes a clone lacks)."""

from __future__ import annotations

import re
import subprocess

from sidecar import cli, flags
from testsupport.processes import ROOT

README = ROOT / "README.md"
# Texts a clone does not have; the docs must say what they need in their own words.
OUTSIDE = re.compile(r"spec/SIDECAR|SIDECAR\.md|DESIGN\.md|shared folder|/work/", re.IGNORECASE)
# Paths under the module's folders, development mode's folders and installed tools: they exist only
# once the sidecar (or scripts/setup) has run, so they are described, not checked.
RUNTIME_ROOTS = {"in", "out", ".dev", "ion", "ion-child", ".venv", ".tools", ".ion-offline", "outputs"}


def tracked() -> set[str]:
    """Every file and folder git tracks in this clone (what a new user's clone has)."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    paths = set(files)
    for f in files:
        parts = f.split("/")
        paths.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return paths


def named_paths(text: str) -> set[str]:
    """Repository-relative paths in backticks: ``scripts/dev``, ``deploy/servicebus/Config.json``, ``bench/``."""
    found = set()
    for token in re.findall(r"`([^`\s]+)`", text):
        token = token.removeprefix("./").rstrip("/")
        if "/" not in token and not re.fullmatch(r"[\w.-]+\.(md|toml|yml|yaml|lock|json|py|sh)", token):
            continue
        if token.startswith(("/", "-", "http")) or any(c in token for c in "{}$*=:<>"):
            continue
        found.add(token)
    return found


def test_readme_names_nothing_outside_the_repository() -> None:
    text = README.read_text(encoding="utf-8")
    assert not OUTSIDE.search(text), OUTSIDE.search(text).group(0)


def test_every_repository_path_the_readme_names_exists() -> None:
    paths = named_paths(README.read_text(encoding="utf-8"))
    assert {"scripts/dev", "docker-compose.yml", "uv.lock", "requirements.lock", "examples/module.py"} <= paths
    have = tracked()
    # Paths into the repository's own folders and files (example paths such as `x/y.txt` in the folder
    # contract's rules, and files under the module's or development mode's folders, are not).
    tops = {p for p in have if "/" not in p}
    missing = sorted(p for p in paths if p.split("/")[0] in tops - RUNTIME_ROOTS and p not in have)
    assert not missing, f"README.md names paths a clone does not have: {missing}"
    # Not vacuous: the module client's old path, from before it moved to client/, would be caught.
    stale = named_paths("use `sidecar/client.py` or `./scripts/setup`")
    assert stale == {"sidecar/client.py", "scripts/setup"} and "sidecar/client.py" not in have


def test_help_text_names_nothing_outside_the_repository() -> None:
    text = cli.USAGE + flags.text() + (cli.__doc__ or "")
    assert not OUTSIDE.search(text), OUTSIDE.search(text).group(0)
