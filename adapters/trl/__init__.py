"""TRL adapter: ``VLMDPOTrainer``, TRL's ``DPOTrainer`` with every hook wired into its training loop.

Importing it checks the installed TRL against the range the adapter is written for.
"""

import trl as _trl
from vlm_dpo_plugins.adapters.trl.version import SUPPORTED_RANGE, check_trl_version

check_trl_version(_trl.__version__)

from vlm_dpo_plugins.adapters.trl.trainer import VLMDPOTrainer  # noqa: E402

__all__ = ["SUPPORTED_RANGE", "VLMDPOTrainer"]
