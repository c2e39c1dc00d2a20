"""Framework adapters, installed as ``vlm_dpo_plugins.adapters.<framework>``.

Each adapter imports only its own framework and only wires the core's hooks into
that framework's training loop; policy logic belongs in the core.
"""
