"""vlm-dpo-plugins: pluggy hooks that fix preference (DPO) training of vision-language models.

``import vlm_dpo_plugins`` imports neither torch nor any training framework; the
framework adapters live in ``vlm_dpo_plugins.adapters.<framework>``.
"""

from vlm_dpo_plugins.markers import hookimpl, hookspec

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl", "hookspec"]
