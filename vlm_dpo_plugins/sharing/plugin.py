"""Prompt and image sharing as a plugin: it declares the ``sharing`` config section.

The sharing itself runs inside each adapter's DPO step (``adapters/hf_trainer/preference_step.py``) around the
framework's own model calls; blocking this plugin (``VLM_DPO_BLOCK_PLUGINS=sharing``) runs two rows per pair.
"""

from __future__ import annotations

from collections.abc import Mapping

from vlm_dpo_plugins.markers import hookimpl
from vlm_dpo_plugins.sharing.settings import SharingConfig


class PromptSharing:
    @hookimpl
    def vlm_dpo_config_sections(self) -> Mapping[str, type]:
        return {"sharing": SharingConfig}
