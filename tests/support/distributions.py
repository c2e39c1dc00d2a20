"""A real installed distribution with a ``vlm_dpo_plugins`` entry point, found through ``sys.path`` in-process."""

from __future__ import annotations

import importlib
from pathlib import Path

from vlm_dpo_plugins.manager import BLOCK_PLUGINS_ENV, LOAD_PLUGINS_ENV


def install_distribution(site: Path, name: str, version: str, entry_point: str, monkeypatch) -> None:
    """A real installed distribution: a .dist-info with a ``vlm_dpo_plugins`` entry point, found via sys.path."""
    dist_info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (dist_info / "entry_points.txt").write_text(f"[vlm_dpo_plugins]\n{entry_point}\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv(LOAD_PLUGINS_ENV, raising=False)
    monkeypatch.delenv(BLOCK_PLUGINS_ENV, raising=False)
    importlib.invalidate_caches()
