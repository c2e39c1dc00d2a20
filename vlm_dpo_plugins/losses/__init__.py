"""Loss variants: the DPO family, computed from summed response log-probabilities."""
