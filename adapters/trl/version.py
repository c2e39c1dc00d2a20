"""The TRL releases this adapter is written against, checked when it is imported.

The subclass overrides ``DPOTrainer._compute_loss``, which TRL rewrote in 0.29 and
again in 1.15 (the fused LM head that returns per-token log-probs instead of logits).
Outside the range the override would silently compute something else, so importing
the adapter refuses instead: TRL users import the trainer themselves and see why.
"""

from __future__ import annotations

from vlm_dpo_plugins.adapters.hf_trainer.activation import SupportedReleases

RELEASES = SupportedReleases("TRL", "trl", minimum="1.16", below="2", tested="1.16.0")
SUPPORTED_RANGE = RELEASES.range


def check_trl_version(installed: str) -> None:
    if RELEASES.supports(installed):
        return
    raise ImportError(
        f"vlm_dpo_plugins.adapters.trl supports trl{SUPPORTED_RANGE} (tested with {RELEASES.tested}); trl {installed} "
        f"is installed. Install a supported TRL with: pip install 'trl{SUPPORTED_RANGE}'. LLaMA-Factory and ms-swift "
        "users: use those frameworks' adapters, which work with the TRL they pin."
    )
