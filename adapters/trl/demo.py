"""The main job: DPO-train the embedded tiny VLM on synthetic image preferences, on CPU, in seconds.

It runs TRL's own ``DPOTrainer`` with the plugins' freeze policy, guard settings
and detectors applied through the hooks, prints a per-step table and a summary of
what the plugins did.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.freeze.apply import apply_trainable
from vlm_dpo_plugins.freeze.report import trainable_report
from vlm_dpo_plugins.manager import create_plugin_manager
from vlm_dpo_plugins.types import RunContext

# The demo still trains with TRL's own loss, so only the variants TRL implements under the same name.
TRL_LOSS_TYPES = frozenset({"sigmoid", "hinge", "ipo", "robust"})
TABLE_COLUMNS = (("step", 5), ("loss", 8), ("margin", 8), ("accuracy", 8), ("grad_norm", 9))


def _cell(value: object, width: int) -> str:
    if isinstance(value, float):
        return f"{value:>{width}.4f}"
    return f"{value!s:>{width}}"


def run_demo(output_dir: str | Path, steps: int = 8, pairs: int = 16, seed: int = 0, config_path: str | None = None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # transformers 5 renames gradient checkpointing and warns on every step; not the user's concern here.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    import trl
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    # Backend fallbacks and config rewrites are logged as warnings; the step table is the output here.
    transformers_logging.set_verbosity_error()

    from vlm_dpo_plugins.tiny import build_tiny_llava, make_preference_examples, trl_conversational_rows

    output_dir = Path(output_dir)
    manager = create_plugin_manager()
    config = manager.load_config(config_path)
    manager.hook.vlm_dpo_configure(config=config)
    if config.loss.type not in TRL_LOSS_TYPES:
        raise ConfigError(
            f"'loss.type' is {config.loss.type!r}, which the demo cannot run yet: it trains with TRL's own loss "
            f"({', '.join(sorted(TRL_LOSS_TYPES))}); pick one of those"
        )

    model_dir = build_tiny_llava(output_dir / "tiny-llava", seed=seed)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    groups = manager.hook.vlm_dpo_classify_parameters(model=model, model_type=model.config.model_type)
    apply_trainable(model, manager.hook.vlm_dpo_trainable_parameters(groups=groups, step=0))
    context = RunContext(framework="trl", framework_version=trl.__version__, model_type=model.config.model_type)

    findings = []

    class PluginLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            metrics = {key: float(value) for key, value in logs.items() if isinstance(value, (int, float))}
            for extra in manager.hook.vlm_dpo_metrics(step=state.global_step):
                metrics.update(extra)
            for batch in manager.hook.vlm_dpo_on_log(step=state.global_step, metrics=metrics):
                findings.extend(batch)
            row = (state.global_step, metrics["loss"], metrics.get("rewards/margins", math.nan),
                   metrics.get("rewards/accuracies", math.nan), metrics.get("grad_norm", math.nan))
            print("  ".join(_cell(value, width) for value, (_, width) in zip(row, TABLE_COLUMNS)), flush=True)

    args = trl.DPOConfig(
        output_dir=str(output_dir / "run"),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        beta=config.loss.beta,
        label_smoothing=config.loss.label_smoothing,
        loss_type=[config.loss.type],
        max_grad_norm=config.guards.max_grad_norm or 0.0,
        gradient_checkpointing_kwargs=manager.hook.vlm_dpo_gradient_checkpointing_kwargs(context=context),
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
    )
    trainer = trl.DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(trl_conversational_rows(make_preference_examples(pairs, seed=seed))),
        processing_class=processor,
        callbacks=[PluginLog()],
    )
    trainer.remove_callback(PrinterCallback)  # the per-step table replaces its raw dict lines
    print(f"vlm-dpo: tiny LLaVA ({sum(p.numel() for p in model.parameters()):,} parameters), "
          f"{pairs} synthetic image pairs, {steps} DPO steps on CPU, loss '{config.loss.type}'")
    for group, numbers in trainable_report(groups, model).items():
        if numbers["parameters"]:
            state = "trainable" if numbers["trainable"] else "frozen"
            print(f"  {group:<10} {numbers['parameters']:>9,} parameters  {state}")
    print("  ".join(f"{name:>{width}}" for name, width in TABLE_COLUMNS))
    trainer.train()
    print(f"summary: {len(findings)} finding(s)")
    for finding in findings:
        print(f"  {finding}")
    return trainer
