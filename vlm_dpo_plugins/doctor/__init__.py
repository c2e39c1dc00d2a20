"""``vlm-dpo doctor``: preflight checks of a preference dataset and a training config, before any GPU time."""
