"""The adapters ship inside the package as vlm_dpo_plugins.adapters, and no top-level 'adapters' module is made."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def declared_packages() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def source_packages() -> set[str]:
    found = set()
    for base, prefix in ((ROOT / "vlm_dpo_plugins", "vlm_dpo_plugins"), (ROOT / "adapters", "vlm_dpo_plugins.adapters")):
        for init in base.rglob("__init__.py"):
            parts = init.parent.relative_to(base).parts
            found.add(".".join((prefix, *parts)))
    return found


def test_every_source_package_is_declared_in_pyproject():
    assert source_packages() == declared_packages()


def test_adapters_import_under_the_package_name_only():
    spec = importlib.util.find_spec("vlm_dpo_plugins.adapters")
    assert spec is not None and spec.origin.endswith(str(Path("adapters") / "__init__.py"))
    top_level = importlib.util.find_spec("adapters")
    assert top_level is None or "site-packages" not in (top_level.origin or ""), "a top-level 'adapters' was installed"
