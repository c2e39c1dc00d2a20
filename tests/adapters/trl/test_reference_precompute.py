"""``sharing.reference: precompute`` in VLMDPOTrainer: one reference pass before step 0, equal to the live reference.

The pass runs at the start of ``train()``; these tests call it as ``train()`` does
(``vlm_dpo_precompute_reference``) and then compare one step's loss, rewards and every gradient with the live
reference's, in fp32, then whole runs. The reference forward is counted by its vision tower and its language
model: once per pair in the pass, never in a step.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import weakref

import pytest

trl = pytest.importorskip("trl")

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from trl_runs import (  # noqa: E402
    COUNTED_IN_CROPS,
    TRL_FAMILIES,
    count_images,
    language_model_of,
    make_trainer,
    snapshot,
    training_logs,
)

from vlm_dpo_plugins.errors import ConfigError, VLMDPOError  # noqa: E402

PRECOMPUTE = {"sharing": {"reference": "precompute"}}


@pytest.fixture(scope="module")
def rows(preference_rows):
    """Pairs of different lengths, so the pass's batches and the steps' batches pad differently."""
    rows = copy.deepcopy(preference_rows[:4])
    rows[1]["rejected"][0]["content"][0]["text"] += " I am quite sure, it is that colour and no other."
    rows[3]["prompt"][0]["content"][1]["text"] += " Answer in one short sentence, please."
    return rows


class Forwards:
    """Calls of a model's language model and images through its vision tower."""

    def __init__(self, model):
        self.language, self.images = 0, 0
        language_model_of(model).register_forward_pre_hook(self._language)
        count_images(model, self._vision)

    def _language(self, module, args):
        self.language += 1

    def _vision(self, images):
        self.images += images


def one_step(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items() if values}
    return loss.detach(), gradients, metrics


def assert_same_step(step, live, tolerance=1e-5):
    loss, gradients, metrics = step
    live_loss, live_gradients, live_metrics = live
    assert torch.allclose(loss, live_loss, atol=tolerance, rtol=0)
    assert gradients.keys() == live_gradients.keys() and gradients
    for name, gradient in gradients.items():
        assert torch.allclose(gradient, live_gradients[name], atol=tolerance, rtol=0), name
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[name] == pytest.approx(live_metrics[name], abs=tolerance), name


@pytest.mark.model_support("TRL", "precompute")
@pytest.mark.parametrize("model", TRL_FAMILIES)
def test_a_precomputed_step_equals_the_live_one_and_the_reference_leaves_memory(
    tiny_model_dirs, rows, tmp_path, model
):
    trainer = make_trainer(
        tiny_model_dirs[model], rows, tmp_path / "pre", vlm_dpo_config=PRECOMPUTE, per_device_train_batch_size=4,
        bf16=False,
    )  # fmt: skip
    reference = weakref.ref(trainer.ref_model)
    in_pass = Forwards(trainer.ref_model)
    trainer.vlm_dpo_precompute_reference()
    # One packed batch, each pair's image encoded once (a 56 px square is 4 crops and a thumbnail for InternVL).
    images = 4 * (5 if model in COUNTED_IN_CROPS else 1)
    assert (in_pass.language, in_pass.images) == (1, images)
    gc.collect()
    assert trainer.ref_model is None and reference() is None
    policy = Forwards(trainer.model)
    step = one_step(trainer)
    assert (policy.language, policy.images) == (1, images)  # the policy's pass alone
    live = one_step(
        make_trainer(tiny_model_dirs[model], rows, tmp_path / "live", per_device_train_batch_size=4, bf16=False)
    )
    assert_same_step(step, live)


def test_lora_steps_run_no_adapter_off_pass(tiny_model_dirs, rows, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    options = dict(per_device_train_batch_size=4, bf16=False, peft_config=lora)
    trainer = make_trainer(tiny_model_dirs["llava"], rows, tmp_path / "pre", vlm_dpo_config=PRECOMPUTE, **options)
    trainer.vlm_dpo_precompute_reference()
    forwards = Forwards(trainer.model)
    step = one_step(trainer)
    assert forwards.language == 1
    live = one_step(make_trainer(tiny_model_dirs["llava"], rows, tmp_path / "live", **options))
    assert_same_step(step, live)


def test_training_follows_the_live_reference_and_a_second_run_reads_the_cache(
    tiny_model_dirs, rows, tmp_path, caplog
):
    cached = {"sharing": {"reference": "precompute", "reference_cache": str(tmp_path / "cache")}}
    runs = {}
    for name, config in (("pre", cached), ("live", {}), ("again", cached)):
        # SGD: AdamW's m / sqrt(v) turns a 1e-9 gradient's rounding into a step of the full learning rate.
        trainer = make_trainer(
            tiny_model_dirs["qwen2_vl"], rows, tmp_path / name, vlm_dpo_config=config, bf16=False, optim="sgd",
            learning_rate=0.5, max_steps=6,
        )  # fmt: skip
        with caplog.at_level(logging.INFO, logger="vlm_dpo_plugins.adapters"):
            caplog.clear()
            trainer.train()
        lines = [r.getMessage() for r in caplog.records if "sharing.reference: precompute:" in r.getMessage()]
        runs[name] = (training_logs(trainer), snapshot(trainer.model), lines)
    (logs, parameters, lines), (live_logs, live_parameters, live_lines) = runs["pre"], runs["live"]
    assert len(logs) == len(live_logs) == 6  # three epochs
    for entry, live_entry in zip(logs, live_logs):
        for key in ("loss", "rewards/margins", "grad_norm"):
            assert entry[key] == pytest.approx(live_entry[key], abs=1e-5), key
    for name, value in parameters.items():
        assert torch.allclose(value, live_parameters[name], atol=1e-5, rtol=0), name
    assert [line.split(" from ")[0] for line in lines] == [
        "vlm-dpo: sharing.reference: precompute: 4 training pair(s): 4 computed, 0 read"
    ]
    assert live_lines == []
    assert runs["again"][2][0].startswith("vlm-dpo: sharing.reference: precompute: 4 training pair(s): 0 computed, 4")
    assert [entry["loss"] for entry in runs["again"][0]] == [entry["loss"] for entry in logs]


def pass_line(trainer, caplog) -> str:
    with caplog.at_level(logging.INFO, logger="vlm_dpo_plugins.adapters"):
        caplog.clear()
        trainer.vlm_dpo_precompute_reference()
    return next(r.getMessage() for r in caplog.records if "precompute:" in r.getMessage()).split(" from ")[0]


def test_a_changed_image_or_reference_is_computed_again(tiny_model_dirs, rows, tmp_path, caplog):
    from PIL import Image

    config = {"sharing": {"reference": "precompute", "reference_cache": str(tmp_path / "cache")}}
    options = dict(per_device_train_batch_size=4, bf16=False, vlm_dpo_config=config)
    trainer = make_trainer(tiny_model_dirs["llava"], rows, tmp_path / "a", **options)
    assert pass_line(trainer, caplog).endswith("4 computed, 0 read")
    changed = copy.deepcopy(rows)
    changed[2]["images"] = [Image.new("RGB", changed[2]["images"][0].size, (250, 10, 10))]
    trainer = make_trainer(tiny_model_dirs["llava"], changed, tmp_path / "b", **options)
    assert pass_line(trainer, caplog).endswith("1 computed, 3 read")
    trainer = make_trainer(tiny_model_dirs["llava"], rows, tmp_path / "c", **options)
    with torch.no_grad():
        next(trainer.ref_model.parameters()).add_(1e-3)  # another reference model
    assert pass_line(trainer, caplog).endswith("4 computed, 0 read")
    assert len(list((tmp_path / "cache").glob("reference-*.json"))) == 2


def test_a_batch_the_pass_did_not_see_is_a_named_error_once_the_reference_is_released(
    tiny_model_dirs, rows, tmp_path
):
    trainer = make_trainer(
        tiny_model_dirs["llava"], rows, tmp_path, vlm_dpo_config=PRECOMPUTE, per_device_train_batch_size=4, bf16=False
    )
    trainer.vlm_dpo_precompute_reference()
    trainer._reference_attach.cache.entries.clear()  # as if the rows changed after the pass
    with pytest.raises(VLMDPOError, match="this batch's reference log-probs are not in the cache"):
        one_step(trainer)


def test_trls_precompute_ref_log_probs_runs_the_plugins_pass_for_images(tiny_model_dirs, rows, tmp_path, caplog):
    # Stock TRL refuses precompute_ref_log_probs for an image dataset; with the plugins it means their pass.
    with pytest.raises(ValueError, match="not supported for vision datasets"):
        make_trainer(tiny_model_dirs["llava"], rows, tmp_path / "stock", trainer_class=trl.DPOTrainer,
                     precompute_ref_log_probs=True)  # fmt: skip
    trainer = make_trainer(
        tiny_model_dirs["llava"], rows, tmp_path / "plugins", precompute_ref_log_probs=True, bf16=False,
        per_device_train_batch_size=4,
    )  # fmt: skip
    assert trainer.vlm_dpo_config.sharing.reference == "precompute" and not trainer.args.precompute_ref_log_probs
    assert pass_line(trainer, caplog).endswith("4 computed, 0 read")
    with pytest.raises(ConfigError, match=r"DPOConfig.precompute_ref_log_probs is True and .*sharing.reference"):
        make_trainer(tiny_model_dirs["llava"], rows, tmp_path / "both", precompute_ref_log_probs=True,
                     vlm_dpo_config={"sharing": {"reference": "live"}})  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "config", "message"),
    [
        ({}, {"loss": {"type": "mdpo"}}, "reads reference log-probs of rows made during the step"),
        ({"loss_type": ["exo_pair"], "label_smoothing": 1e-3}, {}, r"leaves the loss to the framework's own code"),
    ],
    ids=["mdpo", "trl-only-loss"],
)
def test_precompute_that_cannot_apply_stops_before_training(
    tiny_model_dirs, rows, tmp_path, overrides, config, message
):
    merged = {**config, **PRECOMPUTE}
    with pytest.raises(ConfigError, match=message):
        make_trainer(tiny_model_dirs["llava"], rows, tmp_path, vlm_dpo_config=merged, **overrides)


def test_the_cache_file_names_its_reference_and_holds_each_pair_once(tiny_model_dirs, rows, tmp_path):
    trainer = make_trainer(
        tiny_model_dirs["llava"], rows * 2, tmp_path, vlm_dpo_config=PRECOMPUTE, per_device_train_batch_size=4,
        bf16=False,
    )  # fmt: skip
    trainer.vlm_dpo_precompute_reference()
    [written] = (tmp_path / "vlm_dpo_reference").glob("reference-*.json")
    stored = json.loads(written.read_text())
    assert written.name == f"reference-{stored['fingerprint'][:24]}.json"
    assert len(stored["pairs"]) == 4  # eight rows, four distinct pairs
