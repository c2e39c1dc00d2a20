"""A test plugin module installed the way a third-party plugin is, for a framework's CLI in a subprocess.

The module file is copied next to a ``*.dist-info`` folder whose ``entry_points.txt`` registers it in the
``vlm_dpo_plugins`` group; the returned environment puts the folder on the subprocess's ``sys.path`` and loads
only that entry point.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def install_as_entry_point(source: str | Path, directory: Path, module: str, entry_point: str) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, directory / f"{module}.py")
    dist_info = directory / f"{module}-0.0.dist-info"
    dist_info.mkdir(exist_ok=True)
    name = module.replace("_", "-")
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0\n")
    (dist_info / "entry_points.txt").write_text(f"[vlm_dpo_plugins]\n{entry_point} = {module}:plugin\n")
    python_path = os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": python_path, "VLM_DPO_LOAD_PLUGINS": entry_point}
