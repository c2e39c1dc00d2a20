"""``vlm-dpo train``: the TRL adapter applied, on the embedded tiny VLM or on a user's model and data.

An application of ``vlm_dpo_plugins.adapters.trl``, not part of it, and kept out of the core
package because the core must never import a framework. Installed as ``vlm_dpo_plugins.demo``;
the CLI imports it lazily, so ``vlm-dpo --help`` works without TRL.
"""
