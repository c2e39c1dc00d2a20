"""``VLMDPOTrainer`` with ``peft_config=LoraConfig(...)`` on the tiny LLaVA, through ``.train()``.

What a LoRA user expects from the default freeze policy (only the language model trains):
adapters on the language model train and nothing else moves, the reference is the model
with its adapter switched off (no second copy), an adapter checkpoint resumes with the
plugins' state, and ``"all-linear"`` does not wrap the vision tower.
"""

from __future__ import annotations

import math

import pytest

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback  # noqa: E402
from vlm_dpo_plugins.adapters.hf_trainer.checkpoint_state import read_state  # noqa: E402
from vlm_dpo_plugins.adapters.trl import VLMDPOTrainer  # noqa: E402

# q_proj and v_proj exist in the CLIP vision tower too: PEFT wraps both towers with these names.
NAMED_TARGETS = ["q_proj", "v_proj"]
POISONED = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight"


def lora(target_modules) -> peft.LoraConfig:
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target_modules)


def make_trainer(model_dir, rows, output_dir, target_modules, *, callbacks=(), **overrides):
    torch.manual_seed(0)
    options = dict(
        output_dir=str(output_dir),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    options.update(overrides)
    return VLMDPOTrainer(
        model=AutoModelForImageTextToText.from_pretrained(model_dir),
        args=trl.DPOConfig(**options),
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoProcessor.from_pretrained(model_dir),
        peft_config=lora(target_modules),
        callbacks=list(callbacks),
    )


def training_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed(model, before) -> set[str]:
    return {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}


def lora_parameters(model, tower: str) -> set[str]:
    return {name for name, _ in model.named_parameters() if f".{tower}." in name and ".lora_" in name}


class WatchVisionAdapters(TrainerCallback):
    """Before every optimizer step: which vision-tower LoRA weights are trainable or hold a gradient."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        adapters = [p for name, p in model.named_parameters() if ".vision_tower." in name and ".lora_" in name]
        self.seen.append(
            {
                "trainable": sum(p.requires_grad for p in adapters),
                "with_gradient": sum(p.grad is not None for p in adapters),
            }
        )


# -- which parameters train -----------------------------------------------------------------------------------------


def test_lora_on_named_modules_trains_only_the_language_model_adapters(tiny_model_dirs, preference_rows, tmp_path):
    trainer = make_trainer(
        tiny_model_dirs["llava"], preference_rows, tmp_path, NAMED_TARGETS, gradient_checkpointing=False
    )
    model = trainer.model
    language, vision = lora_parameters(model, "language_model"), lora_parameters(model, "vision_tower")
    assert language and vision, "PEFT wrapped q_proj/v_proj in both towers"
    assert {name for name, p in model.named_parameters() if p.requires_grad} == language
    before = snapshot(model)
    trainer.train()

    assert changed(model, before) == language  # base weights, projector, vision adapters: all as they were
    assert trainer.state.global_step == 3


def test_frozen_vision_adapters_stay_frozen_through_training(tiny_model_dirs, preference_rows, tmp_path):
    watch = WatchVisionAdapters()
    trainer = make_trainer(
        tiny_model_dirs["llava"],
        preference_rows,
        tmp_path,
        NAMED_TARGETS,
        gradient_checkpointing=False,
        callbacks=[watch],
    )
    trainer.train()
    assert watch.seen == [{"trainable": 0, "with_gradient": 0}] * 3
    assert all("vlm_dpo/grad_norm/vision" not in entry for entry in training_logs(trainer))


def test_lora_on_named_modules_trains_with_trl_default_gradient_checkpointing(
    tiny_model_dirs, preference_rows, tmp_path
):
    trainer = make_trainer(tiny_model_dirs["llava"], preference_rows, tmp_path, NAMED_TARGETS, max_steps=1)
    assert trainer.args.gradient_checkpointing, "TRL's default"
    trainer.train()
    assert trainer.state.global_step == 1


def test_all_linear_puts_no_adapter_on_the_vision_tower(tiny_model_dirs, preference_rows, tmp_path):
    model_dir = tiny_model_dirs["llava"]
    # What PEFT alone does with "all-linear" on this model: adapters in the vision tower and the projector too.
    alone = peft.get_peft_model(AutoModelForImageTextToText.from_pretrained(model_dir), lora("all-linear"))
    assert lora_parameters(alone, "vision_tower") and lora_parameters(alone, "multi_modal_projector")

    trainer = make_trainer(model_dir, preference_rows, tmp_path, "all-linear", max_steps=2)
    model = trainer.model
    wrapped = {name.rsplit(".lora_A", 1)[0] for name in lora_parameters(model, "language_model") if ".lora_A." in name}
    assert not lora_parameters(model, "vision_tower")
    assert not lora_parameters(model, "multi_modal_projector")
    linear_layers = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {name.rsplit(".", 1)[-1] for name in wrapped} == linear_layers
    assert len(wrapped) == 2 * len(linear_layers)  # both decoder layers, every linear; never the LM head
    before = snapshot(model)
    trainer.train()  # with TRL's default gradient checkpointing: no frozen adapter, nothing to trip over
    assert changed(model, before) == lora_parameters(model, "language_model")


# -- the reference ------------------------------------------------------------------------------------------------


def test_the_reference_is_the_model_with_its_adapter_switched_off(tiny_model_dirs, preference_rows, tmp_path):
    # One batch, the same four pairs every step: the reference log-probs implied by the logged metrics
    # (policy log-probs minus reward / beta) must stay those of the untrained base model at every step.
    trainer = make_trainer(
        tiny_model_dirs["llava"],
        preference_rows[:4],
        tmp_path,
        "all-linear",
        max_steps=4,
        per_device_train_batch_size=4,
    )
    assert trainer.ref_model is None, "no second copy of the model"
    trainer.train()
    logs = training_logs(trainer)
    beta = trainer.beta
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA starts at zero: policy == reference
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.01, "the adapter trained"
    base_chosen, base_rejected = logs[0]["logps/chosen"], logs[0]["logps/rejected"]
    for entry in logs[1:]:
        assert entry["rewards/margins"] != pytest.approx(0.0, abs=1e-4)
        assert entry["logps/chosen"] - entry["rewards/chosen"] / beta == pytest.approx(base_chosen, rel=1e-4)
        assert entry["logps/rejected"] - entry["rewards/rejected"] / beta == pytest.approx(base_rejected, rel=1e-4)


# -- checkpoints ------------------------------------------------------------------------------------------------------


class NanGradientAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            dict(model.named_parameters())[POISONED].grad.view(-1)[0] = math.nan


class StopAt(TrainerCallback):
    """Ends training after optimizer step ``step`` with a checkpoint, as an interruption would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


def test_an_adapter_checkpoint_resumes_with_the_plugin_state(tiny_model_dirs, preference_rows, tmp_path):
    def trainer(output_dir, callbacks=()):
        return make_trainer(
            tiny_model_dirs["llava"],
            preference_rows,
            output_dir,
            "all-linear",
            max_steps=5,
            save_strategy="steps",
            save_steps=100,
            callbacks=[NanGradientAt(1), *callbacks],
        )

    interrupted = trainer(tmp_path / "run", callbacks=[StopAt(3)])
    interrupted.train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").exists()
    assert not (checkpoint / "model.safetensors").exists(), "an adapter checkpoint, not the whole model"
    assert read_state(checkpoint, 0)["guards"]["skipped_steps"] == 1

    resumed = trainer(tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.plugins.get_plugin("guards").skipped_steps == 1
    resumed_logs = training_logs(resumed)[-2:]
    assert [entry["vlm_dpo/skipped_steps"] for entry in resumed_logs] == [1, 1]

    straight = trainer(tmp_path / "straight")
    straight.train()
    # The adapter weights, its optimizer state, the schedule and the data position all came back.
    assert [entry["loss"] for entry in resumed_logs] == pytest.approx(
        [entry["loss"] for entry in training_logs(straight)][-2:], abs=1e-6
    )
    saved = lora_parameters(resumed.model, "language_model")
    assert saved and not lora_parameters(resumed.model, "vision_tower")
