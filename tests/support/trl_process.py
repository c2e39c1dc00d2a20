"""``VLMDPOTrainer.train()`` in a process of its own, for the tests that kill it: ``python trl_process.py SPEC``.

SPEC is a JSON file: ``model_dir``, ``output_dir``, ``max_steps``, ``save_steps``, ``resume`` (passed to
``train(resume_from_checkpoint=...)``) and the fault plugin's ``fault``/``steps``/``kill``. The rows are the
TRL suite's (16 synthetic pairs, seed 3), rebuilt here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(spec_path: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from fault_plugin import FaultInjector
    from trl_runs import make_trainer

    from vlm_dpo_plugins.manager import create_plugin_manager
    from vlm_dpo_plugins.tiny import make_preference_examples, trl_conversational_rows

    spec = json.loads(Path(spec_path).read_text())
    manager = create_plugin_manager(load_entry_points=False)
    kill = tuple(spec["kill"]) if spec.get("kill") else None
    manager.register(FaultInjector(spec.get("fault", "grad-nan"), spec.get("steps", []), kill=kill))
    trainer = make_trainer(
        spec["model_dir"],
        trl_conversational_rows(make_preference_examples(16, seed=3)),
        spec["output_dir"],
        max_steps=spec["max_steps"],
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=spec["save_steps"],
        plugin_manager=manager,
        vlm_dpo_config=spec.get("vlm_dpo"),
    )
    trainer.train(resume_from_checkpoint=spec.get("resume"))


if __name__ == "__main__":
    main(sys.argv[1])
