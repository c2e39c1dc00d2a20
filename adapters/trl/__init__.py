"""TRL adapter: ``VLMDPOTrainer``, TRL's ``DPOTrainer`` with every hook in its own loop (docs/trl.md).

Importing it checks the installed TRL: the subclass overrides ``DPOTrainer._compute_loss``, which TRL rewrote in
0.29 and again in 1.15; outside the range the override would silently compute something else.
"""

import trl as _trl
from vlm_dpo_plugins.adapters.hf_trainer.activation import SupportedReleases

RELEASES = SupportedReleases("TRL", "trl", minimum="1.16", below="2", tested="1.16.0")
SUPPORTED_RANGE = RELEASES.range
RELEASES.require(
    _trl.__version__,
    "vlm_dpo_plugins.adapters.trl",
    "LLaMA-Factory and ms-swift users: use those frameworks' adapters, which work with the TRL they pin.",
)

from vlm_dpo_plugins.adapters.trl.trainer import VLMDPOTrainer  # noqa: E402

__all__ = ["SUPPORTED_RANGE", "VLMDPOTrainer"]
