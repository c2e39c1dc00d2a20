"""The Qwen2-VL bf16 NaN report, reproduced on the tiny Qwen2-VL with a forced overflow, and handled.

At optimizer step 1 the images reach the model scaled by 1e38: in bf16 the vision tower's patch embedding
overflows to inf, and the loss is NaN, as one overflowing batch of the multimodal stage would make it.

- stock ``trl.DPOTrainer`` in bf16: the NaN step is applied and the weights hold NaN from then on (its logged
  loss reads 0.0 for that step and every later one, which hides it);
- ``VLMDPOTrainer``, same run: the step is skipped (non-finite loss), the weights stay finite and training goes
  on;
- ``VLMDPOTrainer`` under DeepSpeed ZeRO-2 in bf16 (the report's setup): DeepSpeed's own overflow check skips
  the step, the guards count it once and do not step again, every later loss is finite.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("deepspeed")
trl = pytest.importorskip("trl")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.integrations.deepspeed import unset_hf_deepspeed_config  # noqa: E402
from trl_runs import make_trainer, training_logs  # noqa: E402
from vlm_dpo_plugins.adapters.trl import VLMDPOTrainer  # noqa: E402

from vlm_dpo_plugins.tiny import build_tiny_qwen2_vl, make_preference_examples, trl_conversational_rows  # noqa: E402

STEPS = 4
OVERFLOW_AT = 1
ZERO2_BF16 = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 10**9,
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "allgather_bucket_size": "auto"},
}


class OverflowingImages(TrainerCallback):
    """At one step, every forward gets ``pixel_values`` x 1e38: past bf16's range once the patch embedding sums."""

    def __init__(self, step: int) -> None:
        self.step, self.handle = step, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if state.global_step == self.step:
            self.handle = model.register_forward_pre_hook(self.scale, with_kwargs=True)

    @staticmethod
    def scale(module, args, kwargs):
        if kwargs.get("pixel_values") is not None:
            kwargs["pixel_values"] = kwargs["pixel_values"] * 1e38
        return args, kwargs


def train(trainer_class, model_dir, rows, output_dir, deepspeed=None):
    unset_hf_deepspeed_config()
    trainer = make_trainer(
        model_dir,
        rows,
        output_dir,
        trainer_class=trainer_class,
        callbacks=[OverflowingImages(OVERFLOW_AT)],
        max_steps=STEPS,
        learning_rate=1e-3,
        bf16=True,
        deepspeed=deepspeed,
    )
    try:
        trainer.train()
    finally:
        unset_hf_deepspeed_config()
    losses = [entry["loss"] for entry in training_logs(trainer)]
    finite = all(torch.isfinite(p.detach().float()).all() for p in trainer.model.parameters() if p.numel())
    return trainer, losses, finite


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="module")
def rows():
    return trl_conversational_rows(make_preference_examples(16, seed=3))


def test_stock_trl_in_bf16_keeps_the_nan_for_good(deepspeed_process_group, model_dir, rows, tmp_path):
    _, _, finite = train(trl.DPOTrainer, model_dir, rows, tmp_path)
    assert not finite, "the overflowing step wrote NaN into the weights, for every step after it"


def test_the_plugins_skip_the_overflowing_step_in_bf16(deepspeed_process_group, model_dir, rows, tmp_path):
    trainer, losses, finite = train(VLMDPOTrainer, model_dir, rows, tmp_path)
    assert finite
    outcome = trainer.vlm_dpo_step_outcomes[OVERFLOW_AT]
    assert outcome.skipped and outcome.reasons == ("non-finite loss (nan)",), outcome
    assert all(math.isfinite(loss) and loss > 0.5 for loss in losses[OVERFLOW_AT + 1 :]), losses  # trains on


def test_under_zero2_in_bf16_deepspeed_skips_it_and_the_guards_count_it_once(
    deepspeed_process_group, model_dir, rows, tmp_path
):
    trainer, losses, finite = train(VLMDPOTrainer, model_dir, rows, tmp_path, deepspeed=ZERO2_BF16)
    assert all(map(math.isfinite, losses[OVERFLOW_AT + 1 :])), losses
    assert finite and trainer.model_wrapped.skipped_steps == 1
    assert trainer.plugins.get_plugin("guards").skipped_steps == 1
    assert [entry["vlm_dpo/skipped_steps"] for entry in trainer.state.log_history if "loss" in entry] == [0, 1, 1, 1]
