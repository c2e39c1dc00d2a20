"""TRL adapter: wires the core's hooks into ``trl.DPOTrainer`` (TRL 1.x)."""
