"""ms-swift adapter: ``swift rlhf --rlhf_type dpo ... --external_plugins "$(vlm-dpo swift-plugin)"``.

Settings come from the YAML file named by ``VLM_DPO_CONFIG``. Nothing imports ms-swift until the plugin file runs.
"""

from __future__ import annotations

from pathlib import Path

PLUGIN_FILE = Path(__file__).parent / "plugin_file" / "vlm_dpo_swift.py"


def plugin_path() -> Path:
    """The file to pass to ``swift ... --external_plugins``."""
    return PLUGIN_FILE
