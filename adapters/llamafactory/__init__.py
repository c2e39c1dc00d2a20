"""LLaMA-Factory adapter: active once installed, configured by a ``vlm_dpo:`` section in the training YAML.

Nothing here runs until LLaMA-Factory imports its DPO workflow (``_vlm_dpo_plugins_autoload``).
"""
