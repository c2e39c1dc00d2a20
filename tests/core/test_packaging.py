"""The adapters and the demo ship inside the package as vlm_dpo_plugins.adapters and vlm_dpo_plugins.demo;
no top-level 'adapters' or 'demo' module is made."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]


def declared_packages() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def source_packages() -> set[str]:
    found = set()
    shipped_folders = (
        (ROOT / "vlm_dpo_plugins", "vlm_dpo_plugins"),
        (ROOT / "adapters", "vlm_dpo_plugins.adapters"),
        (ROOT / "demo", "vlm_dpo_plugins.demo"),
    )
    for base, prefix in shipped_folders:
        for init in base.rglob("__init__.py"):
            parts = init.parent.relative_to(base).parts
            found.add(".".join((prefix, *parts)))
    return found


def test_every_source_package_is_declared_in_pyproject():
    assert source_packages() == declared_packages()


@pytest.mark.parametrize("folder", ["adapters", "demo"])
def test_shipped_folders_import_under_the_package_name_only(folder):
    spec = importlib.util.find_spec(f"vlm_dpo_plugins.{folder}")
    assert spec is not None and spec.origin.endswith(str(Path(folder) / "__init__.py"))
    top_level = importlib.util.find_spec(folder)
    assert top_level is None or "site-packages" not in (top_level.origin or ""), f"a top-level '{folder}' was installed"
