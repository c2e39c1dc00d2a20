"""ms-swift adapter: one flag on swift's own command line turns it on.

    swift rlhf --rlhf_type dpo ... --external_plugins "$(vlm-dpo swift-plugin)"

``--external_plugins`` executes the plugin file shipped in ``plugin_file/``, which calls
``activation.activate()``. Settings come from a YAML file named by ``VLM_DPO_CONFIG``.
Nothing here imports ms-swift until that file runs.
"""

from __future__ import annotations

from pathlib import Path

PLUGIN_FILE = Path(__file__).parent / "plugin_file" / "vlm_dpo_swift.py"


def plugin_path() -> Path:
    """The file to pass to ``swift ... --external_plugins``."""
    return PLUGIN_FILE
