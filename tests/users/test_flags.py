"""The flag reference: generated from the schema, complete, and the same in README.md and --help."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from sidecar import flags
from sidecar.config import SECRET_KEYS, SidecarConfig
from testsupport.processes import ROOT, python_env


def leaf_keys() -> set[str]:
    """Every dotted key of the schema that holds a value (not a section)."""
    node = OmegaConf.to_container(OmegaConf.structured(SidecarConfig), resolve=False, throw_on_missing=False)
    keys: set[str] = set()

    def walk(value: object, prefix: str) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(child, f"{prefix}{key}.")
        else:
            keys.add(prefix.rstrip("."))

    walk(node, "")
    return keys


def test_readme_holds_the_generated_table() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert flags.section(readme) == flags.markdown(), (
        "README.md's flag reference differs from the config schema: run `python -m sidecar.flags --write README.md`")


def test_every_setting_is_documented_once() -> None:
    rows = flags.settings()
    schema = leaf_keys()
    assert schema <= {r.key for r in rows}, f"undocumented: {schema - {r.key for r in rows}}"
    assert len({r.flag for r in rows}) == len(rows)
    assert all(r.help for r in rows)
    by_key = {r.key: r for r in rows}
    assert by_key["azureblobprovider.enabled"].flag == "--azureblobprovider"
    assert by_key["context.eventid"].default == "required"
    assert by_key["sharedsecret"].default == "(secret; env `SHARED_SECRET`)"
    for key in SECRET_KEYS:
        assert by_key[key].default.startswith("(secret"), key


def test_a_setting_without_help_is_an_error(monkeypatch) -> None:
    monkeypatch.setattr(flags, "_field_comments", lambda: {})
    with pytest.raises(ValueError, match="setting context.eventid has no help text"):
        flags.settings()


def test_write_replaces_only_the_section(tmp_path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(f"# Title\n\n{flags.BEGIN}\nold table\n{flags.END}\n\nafter\n", encoding="utf-8")
    flags.main(["--write", str(doc)])
    text = doc.read_text(encoding="utf-8")
    assert text.startswith("# Title\n\n") and text.endswith(f"{flags.END}\n\nafter\n")
    assert flags.section(text) == flags.markdown() and "old table" not in text


def test_help_prints_the_reference() -> None:
    result = subprocess.run([sys.executable, "-m", "sidecar", "--help"], env=python_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: sidecar")
    for row in flags.settings():
        assert f"  {row.flag}  (" in result.stdout
    printed = subprocess.run([sys.executable, "-m", "sidecar.flags"], env=python_env(), capture_output=True,
                             text=True, timeout=60)
    assert printed.returncode == 0 and printed.stdout == flags.markdown()
