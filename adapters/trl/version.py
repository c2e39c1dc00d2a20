"""The TRL releases this adapter is written against, checked when it is imported.

The subclass overrides ``DPOTrainer._compute_loss``, which TRL rewrote in 0.29 and
again in 1.15 (the fused LM head that returns per-token log-probs instead of logits).
Outside the range the override would silently compute something else, so importing
the adapter refuses instead.
"""

from __future__ import annotations

from packaging.version import Version

MINIMUM = Version("1.16")
BELOW = Version("2")
TESTED = "1.16.0"
SUPPORTED_RANGE = f">={MINIMUM},<{BELOW}"


def check_trl_version(installed: str) -> None:
    version = Version(installed)
    if MINIMUM <= Version(version.base_version) < BELOW:
        return
    raise ImportError(
        f"vlm_dpo_plugins.adapters.trl supports trl{SUPPORTED_RANGE} (tested with {TESTED}); trl {installed} is "
        f"installed. Install a supported TRL with: pip install 'trl{SUPPORTED_RANGE}'. LLaMA-Factory and ms-swift "
        "users: use those frameworks' adapters, which work with the TRL they pin."
    )
