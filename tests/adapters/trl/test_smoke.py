"""The TRL environment is real: a tiny LLaVA trains 2 DPO steps with ``trl.DPOTrainer`` on CPU."""

from __future__ import annotations

import math

import pytest

trl = pytest.importorskip("trl")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from vlm_dpo_plugins.tiny import build_tiny_llava, make_preference_examples, trl_conversational_rows  # noqa: E402


def test_stock_dpo_trainer_trains_tiny_llava(tmp_path):
    model_dir = build_tiny_llava(tmp_path / "model")
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
    )
    trainer = trl.DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(trl_conversational_rows(make_preference_examples(4, seed=1))),
        processing_class=processor,
    )
    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2
    assert all(math.isfinite(loss) for loss in losses)
    # The first step starts from policy == reference, so its loss is exactly ln 2.
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert any(name.startswith("model.language_model.") for name in changed)
    assert any(name.startswith("model.vision_tower.") for name in changed), "stock TRL trains the vision tower too"
