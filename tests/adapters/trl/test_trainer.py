"""``VLMDPOTrainer.train()`` end to end on tiny LLaVA and Qwen2-VL: every hook inside TRL's own loop."""

from __future__ import annotations

import math

import pytest

trl = pytest.importorskip("trl")

import torch  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback  # noqa: E402
from trl_runs import (  # noqa: E402
    plain_rows,
    STOCK_CANNOT_TRAIN,
    TRL_FAMILIES,
    EVERYTHING_TRAINS,
    UNSHARED,
    InjectNonFiniteGradient,
    changed,
    identical_pair_rows,
    make_trainer,
    snapshot,
    training_logs,
)
from vlm_dpo_plugins.adapters.hf_trainer.checkpoint_state import read_state  # noqa: E402

from vlm_dpo_plugins.errors import ConfigError, TrainingHalted  # noqa: E402

# -- the plugin must not change correct training ------------------------------------------


@pytest.mark.model_support("TRL", "stock")
@pytest.mark.parametrize("architecture", [family for family in TRL_FAMILIES if family not in STOCK_CANNOT_TRAIN])
def test_losses_equal_stock_dpo_trainer_when_nothing_needs_fixing(
    architecture, tiny_model_dirs, preference_rows, tmp_path
):
    model_dir = tiny_model_dirs[architecture]
    stock = make_trainer(model_dir, preference_rows, tmp_path / "stock", trainer_class=trl.DPOTrainer)
    stock.train()
    ours = make_trainer(model_dir, preference_rows, tmp_path / "ours", vlm_dpo_config=EVERYTHING_TRAINS | UNSHARED)
    ours.train()

    stock_logs, our_logs = training_logs(stock), training_logs(ours)
    assert len(stock_logs) == len(our_logs) == 4
    for expected, actual in zip(stock_logs, our_logs):
        assert actual["loss"] == pytest.approx(expected["loss"], abs=1e-5)
        for key in ("rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm", "entropy"):
            assert actual[key] == pytest.approx(expected[key], abs=1e-5), key
        assert {"vlm_dpo/skipped_steps", "vlm_dpo/grad_norm/language", "collation/skipped_rows"} <= set(actual)
    # And the same weights at the end: the guarded step clipped and stepped exactly as the Trainer does.
    for (name, p), (_, q) in zip(stock.model.named_parameters(), ours.model.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


@pytest.mark.model_support("TRL", "framework-fix", family="mllama")
def test_stock_trl_cannot_train_mllama_and_the_adapter_collates_what_the_processor_would(
    tiny_model_dirs, preference_rows, tmp_path
):
    model_dir = tiny_model_dirs["mllama"]
    stock = make_trainer(model_dir, preference_rows, tmp_path / "stock", trainer_class=trl.DPOTrainer, max_steps=1)
    stock_batch = next(iter(stock.get_train_dataloader()))
    assert stock_batch["cross_attention_mask"].shape[1] < stock_batch["input_ids"].shape[1]  # the prompt's only
    with pytest.raises(RuntimeError, match="must match the size of tensor"):
        stock.train()

    ours = make_trainer(model_dir, preference_rows[:4], tmp_path / "ours", per_device_train_batch_size=4, max_steps=4)
    batch = ours.data_collator([ours.train_dataset[index] for index in range(4)])  # in order, unlike the loader's
    # Each row is what Mllama's processor makes of the whole conversation in one call: one BOS, and every token
    # from the image token on, the response's included, attends to the image's tiles.
    processor = ours.processing_class
    for row in range(8):
        example = preference_rows[row % 4]
        response = example["chosen"] if row < 4 else example["rejected"]
        text = processor.apply_chat_template(example["prompt"] + response)
        expected = processor(text=text, images=example["images"], add_special_tokens=False, return_tensors="pt")
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :length].tolist() == expected["input_ids"][0].tolist()
        torch.testing.assert_close(batch["cross_attention_mask"][row, :length], expected["cross_attention_mask"][0])
    before = snapshot(ours.model)
    ours.train()
    losses = [entry["loss"] for entry in training_logs(ours)]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    assert changed(ours.model, before) <= set(ours.vlm_dpo_groups["language"])


@pytest.mark.model_support("TRL", "framework-fix", family="paligemma")
@pytest.mark.model_support("TRL", "freeze", family="paligemma")
def test_stock_trl_cannot_train_paligemma_and_the_adapter_writes_responses_as_its_suffix(
    tiny_model_dirs, preference_rows, tmp_path
):
    model_dir = tiny_model_dirs["paligemma"]
    rows = plain_rows(preference_rows[:4])
    stock = make_trainer(model_dir, rows, tmp_path / "stock", trainer_class=trl.DPOTrainer, max_steps=1)
    with pytest.raises(ValueError, match="`images` are expected as arguments to a `PaliGemmaProcessor` instance"):
        stock.train()

    ours = make_trainer(model_dir, rows, tmp_path / "ours", per_device_train_batch_size=4, max_steps=4)
    batch = ours.data_collator([ours.train_dataset[index] for index in range(4)])
    # Each row is what the processor makes of prompt and response as prefix and suffix in one call.
    processor = AutoProcessor.from_pretrained(model_dir)
    for row in range(8):
        example = rows[row % 4]
        response = example["chosen"] if row < 4 else example["rejected"]
        expected = processor(text=example["prompt"], images=example["images"], suffix=response, return_tensors="pt")
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :length].tolist() == expected["input_ids"][0].tolist()
        assert batch["token_type_ids"][row, :length].tolist() == expected["token_type_ids"][0].tolist()
    assert "labels" not in batch
    before = snapshot(ours.model)
    ours.train()
    losses = [entry["loss"] for entry in training_logs(ours)]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    assert changed(ours.model, before) <= set(ours.vlm_dpo_groups["language"])


# -- freeze policy -------------------------------------------------------------------------


@pytest.mark.model_support("TRL", "freeze")
@pytest.mark.parametrize("architecture", TRL_FAMILIES)
def test_default_policy_keeps_vision_and_projector_unchanged_and_the_margin_grows(
    architecture, tiny_model_dirs, preference_rows, tmp_path
):
    # The same 4 pairs every step: their margin is what the policy learned, not batch-to-batch noise.
    trainer = make_trainer(
        tiny_model_dirs[architecture], preference_rows[:4], tmp_path, max_steps=8, per_device_train_batch_size=4
    )
    before = snapshot(trainer.model)
    trainer.train()

    moved = changed(trainer.model, before)
    groups = trainer.vlm_dpo_groups
    assert moved, "the language model trained"
    assert moved <= set(groups["language"]) | set(groups.get("other", ()))
    assert not moved & (set(groups["vision"]) | set(groups["projector"]))
    margins = [entry["rewards/margins"] for entry in training_logs(trainer)]
    assert margins[0] == pytest.approx(0.0, abs=1e-6)
    # Tiny Gemma 3 (embeddings scaled by sqrt(hidden), soft-capped logits) learns slower at the same rate: its last
    # margin came to 0.199 on an AVX-512 machine (TRL's default bf16 rounds per CPU), above 0.2 on another.
    assert margins[-1] > {"gemma3": 0.15}.get(architecture, 0.3) and margins[-1] == max(margins), margins


def test_per_group_learning_rates_reach_the_optimizer(tiny_model_dirs, preference_rows, tmp_path):
    config = {"freeze": {"trainable": ["projector", "language"], "learning_rates": {"projector": 1e-4}}}
    trainer = make_trainer(tiny_model_dirs["llava"], preference_rows, tmp_path, max_steps=1, vlm_dpo_config=config)
    trainer.train()
    rates = {group["group"]: group["initial_lr"] for group in trainer.optimizer.param_groups if group["params"]}
    assert rates == {"projector": 1e-4, "language": 1e-2}


class SnapshotAtStepBegin(TrainerCallback):
    def __init__(self, step):
        self.step = step
        self.parameters = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.parameters = snapshot(model)


def test_progressive_unfreezing_adds_the_projector_at_its_stage(tiny_model_dirs, preference_rows, tmp_path):
    config = {"freeze": {"unfreeze": [{"at_step": 2, "groups": ["projector"]}]}}
    at_stage = SnapshotAtStepBegin(2)
    trainer = make_trainer(
        tiny_model_dirs["llava"], preference_rows, tmp_path, max_steps=4, vlm_dpo_config=config, callbacks=[at_stage]
    )
    initial = snapshot(trainer.model)
    projector = set(trainer.vlm_dpo_groups["projector"])
    trainer.train()

    assert not {n for n in projector if not torch.equal(at_stage.parameters[n], initial[n])}, "frozen before step 2"
    assert changed(trainer.model, at_stage.parameters) & projector == projector, "trained from step 2"
    groups = {group["group"]: len(group["params"]) for group in trainer.optimizer.param_groups}
    assert groups["projector"] == len(projector)
    # The detectors watch the projector's gradients from its stage on.
    assert trainer.plugins.get_plugin("diagnostics").trainable == {"projector", "language"}


# -- stability guards ----------------------------------------------------------------------


def assert_state_dicts_equal(expected, actual):
    assert expected["param_groups"] == actual["param_groups"]
    assert expected["state"].keys() == actual["state"].keys()
    for index, state in expected["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(actual["state"][index][key])), (index, key)


@pytest.mark.parametrize("architecture", ["llava", "qwen2_vl"])
def test_nan_gradient_at_step_k_is_skipped_with_optimizer_state_intact(
    architecture, tiny_model_dirs, preference_rows, tmp_path
):
    injector = InjectNonFiniteGradient(at_steps=[2])
    trainer = make_trainer(tiny_model_dirs[architecture], preference_rows, tmp_path, max_steps=5, callbacks=[injector])
    trainer.train()

    record = injector.records[2]
    assert changed(trainer.model, record["parameters"]), "later steps trained"
    assert not {n for n, p in record["after_parameters"].items() if not torch.equal(p, record["parameters"][n])}
    assert_state_dicts_equal(record["optimizer"], record["after_optimizer"])
    assert record["after_schedule"] == record["schedule"], "the LR schedule did not advance on the skipped step"
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    logs = training_logs(trainer)
    assert trainer.state.global_step == 5
    assert [entry["vlm_dpo/skipped_steps"] for entry in logs] == [0, 0, 1, 1, 1]
    outcome = trainer.vlm_dpo_step_outcomes[2]
    assert outcome.skipped and "non-finite gradient norm" in outcome.reasons[0] and "language" in outcome.reasons[0]


def test_consecutive_nan_steps_halt_with_a_checkpoint_and_the_cause(tiny_model_dirs, preference_rows, tmp_path):
    injector = InjectNonFiniteGradient(at_steps=range(10))
    config = {"guards": {"max_consecutive_skips": 2}}
    trainer = make_trainer(
        tiny_model_dirs["llava"], preference_rows, tmp_path, max_steps=6, callbacks=[injector], vlm_dpo_config=config
    )
    with pytest.raises(TrainingHalted, match=r"2 consecutive optimizer steps skipped .*A checkpoint was saved to "):
        trainer.train()
    checkpoint = tmp_path / "checkpoint-1"
    assert (checkpoint / "model.safetensors").exists()
    assert read_state(checkpoint, 0)["guards"]["skipped_steps"] == 2


# -- checkpoints -----------------------------------------------------------------------------


class StopAt(TrainerCallback):
    """Ends training after optimizer step ``step``, as an interruption would, with the schedule of the full run."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


# Stopped after the stage's step, or right before it: the resumed run then starts the stage itself.
@pytest.mark.parametrize("stop", [4, 3])
def test_resume_restores_weights_guard_state_and_the_unfreeze_stage(
    tiny_model_dirs, preference_rows, tmp_path, stop
):
    config = {"freeze": {"unfreeze": [{"at_step": 3, "groups": ["projector"]}]}}
    model_dir = tiny_model_dirs["llava"]

    def trainer(output_dir, callbacks=()):
        return make_trainer(
            model_dir,
            preference_rows,
            output_dir,
            max_steps=6,
            save_strategy="steps",
            save_steps=100,
            callbacks=[InjectNonFiniteGradient([1]), *callbacks],
            vlm_dpo_config=config,
        )

    interrupted = trainer(tmp_path / "run", callbacks=[StopAt(stop)])
    interrupted.train()
    checkpoint = tmp_path / "run" / f"checkpoint-{stop}"
    assert read_state(checkpoint, 0)["guards"]["skipped_steps"] == 1

    resumed = trainer(tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.plugins.get_plugin("guards").skipped_steps == 1
    resumed_logs = training_logs(resumed)[stop - 6 :]  # the log history before comes back from the checkpoint
    assert [entry["vlm_dpo/skipped_steps"] for entry in resumed_logs] == [1] * (6 - stop)
    projector = resumed.vlm_dpo_groups["projector"]
    assert all(dict(resumed.model.named_parameters())[name].requires_grad for name in projector)

    uninterrupted = trainer(tmp_path / "straight")
    uninterrupted.train()
    # The same losses after the resume as without the interruption: weights, the optimizer with the projector
    # stage's layout and moments, the schedule and the data position all came back.
    resumed_losses = [entry["loss"] for entry in resumed_logs]
    straight_losses = [entry["loss"] for entry in training_logs(uninterrupted)][stop - 6 :]
    assert resumed_losses == pytest.approx(straight_losses, abs=1e-6)
    # And the checkpoint still loads with from_pretrained, for evaluation or export.
    reloaded = AutoModelForImageTextToText.from_pretrained(checkpoint)
    saved = dict(reloaded.named_parameters())
    assert all(torch.equal(saved[name], p.detach()) for name, p in interrupted.model.named_parameters())


def test_resume_from_a_stock_trl_checkpoint_loads_its_weights(tiny_model_dirs, preference_rows, tmp_path):
    # Stock TRL on transformers 5 writes the hub layout, which the Trainer's own resume does not load.
    stock = make_trainer(
        tiny_model_dirs["llava"],
        preference_rows,
        tmp_path,
        trainer_class=trl.DPOTrainer,
        max_steps=2,
        save_strategy="steps",
        save_steps=2,
    )
    stock.train()
    ours = make_trainer(
        tiny_model_dirs["llava"], preference_rows, tmp_path, max_steps=3, vlm_dpo_config=EVERYTHING_TRAINS
    )
    ours.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert training_logs(ours)[-1]["loss"] != pytest.approx(math.log(2), abs=1e-4), "trained weights were loaded"


# -- loss variants ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "first_loss"),
    [("sigmoid", math.log(2)), ("hinge", 1.0), ("ipo", 25.0), ("mdpo", 3 * math.log(2))],
)
def test_the_configured_loss_variant_is_the_loss_trained(
    variant, first_loss, tiny_model_dirs, preference_rows, tmp_path
):
    # At step 1 policy == reference, every log-ratio is 0: sigmoid ln 2, hinge 1, IPO (1 / (2 beta))^2 = 25,
    # mDPO three logistic terms at 0.
    config = {"loss": {"type": variant}}
    trainer = make_trainer(tiny_model_dirs["llava"], preference_rows, tmp_path, max_steps=2, vlm_dpo_config=config)
    trainer.train()
    logs = training_logs(trainer)
    assert logs[0]["loss"] == pytest.approx(first_loss, rel=1e-5)
    assert logs[1]["loss"] != pytest.approx(first_loss, rel=1e-3)
    if variant == "mdpo":
        assert {"mdpo/conditional_loss", "mdpo/anchor_loss", "rewards/margins"} <= set(logs[0])


@pytest.mark.parametrize("variant", ["hinge", "ipo"])
def test_shared_loss_types_match_trl_own_implementation(variant, tiny_model_dirs, preference_rows, tmp_path):
    stock = make_trainer(
        tiny_model_dirs["llava"], preference_rows, tmp_path / "stock", trainer_class=trl.DPOTrainer, loss_type=[variant]
    )
    stock.train()
    ours = make_trainer(
        tiny_model_dirs["llava"],
        preference_rows,
        tmp_path / "ours",
        loss_type=[variant],
        vlm_dpo_config=EVERYTHING_TRAINS | UNSHARED,
    )
    ours.train()
    assert ours.vlm_dpo_config.loss.type == variant
    assert [e["loss"] for e in training_logs(ours)] == pytest.approx(
        [e["loss"] for e in training_logs(stock)], abs=1e-5
    )


@pytest.mark.parametrize(
    "options",
    [
        dict(loss_type=["exo_pair"], label_smoothing=1e-3),
        # MPO as TRL ships it (InternVL's weights): sigmoid + BCO-pair (without a reward baseline in TRL 1.x) + SFT.
        dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    ],
    ids=["exo_pair", "mpo"],
)
def test_a_trl_only_loss_type_is_left_to_trl(tiny_model_dirs, preference_rows, tmp_path, options):
    stock = make_trainer(
        tiny_model_dirs["llava"], preference_rows, tmp_path / "s", trainer_class=trl.DPOTrainer, **options
    )
    stock.train()
    ours = make_trainer(
        tiny_model_dirs["llava"], preference_rows, tmp_path / "o", vlm_dpo_config=EVERYTHING_TRAINS, **options
    )
    ours.train()
    assert ours._trl_computes_loss
    assert [e["loss"] for e in training_logs(ours)] == pytest.approx(
        [e["loss"] for e in training_logs(stock)], abs=1e-5
    )


def test_mpo_from_the_registry_trains_as_trls_mpo(tiny_model_dirs, preference_rows, tmp_path):
    # TRL 1.x's bco_pair has no reward baseline: the registry's mpo without one is TRL's loss list, step by step.
    stock = make_trainer(
        tiny_model_dirs["llava"], preference_rows, tmp_path / "s", trainer_class=trl.DPOTrainer, bf16=False,
        loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0],
    )
    stock.train()
    config = EVERYTHING_TRAINS | {"loss": {"type": "mpo", "mpo_running_baseline": False}}
    ours = make_trainer(tiny_model_dirs["llava"], preference_rows, tmp_path / "o", bf16=False, vlm_dpo_config=config)
    ours.train()
    assert not ours._trl_computes_loss
    for mine, theirs in zip(training_logs(ours), training_logs(stock), strict=True):
        for key in ("loss", "rewards/chosen", "rewards/margins", "grad_norm"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (key, mine, theirs)


def test_mpos_reward_baseline_follows_the_trained_batches_and_resumes(tiny_model_dirs, preference_rows, tmp_path):
    def trainer(output_dir):
        return make_trainer(
            tiny_model_dirs["llava"], preference_rows, output_dir, bf16=False, max_steps=4, save_strategy="steps",
            save_steps=3, callbacks=[InjectNonFiniteGradient([1])], vlm_dpo_config={"loss": {"type": "mpo"}},
        )

    straight = trainer(tmp_path / "run")
    straight.train()
    logs = training_logs(straight)
    # Step 0: policy == reference, every reward 0: 0.8 ln 2 + 0.2 * 2 ln 2 + the SFT term.
    assert logs[0]["loss"] == pytest.approx(1.2 * math.log(2) + logs[0]["mpo/generation_loss"], rel=1e-6)
    # The baseline a step uses: the mean of its own batch's mean reward and those of the steps taken before it;
    # step 1 is skipped (a NaN gradient), so its batch is taken back and counts for no later step.
    means = [(entry["rewards/chosen"] + entry["rewards/rejected"]) / 2 for entry in logs]
    expected = [means[0], (means[0] + means[1]) / 2, (means[0] + means[2]) / 2, (means[0] + means[2] + means[3]) / 3]
    assert [entry["vlm_dpo/skipped_steps"] for entry in logs] == [0, 1, 1, 1]
    assert [entry["mpo/reward_baseline"] for entry in logs] == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert abs(means[2]) > 1e-4  # the baseline is not a sum of zeros
    # Saved after three steps: steps 0 and 2 count.
    state = read_state(tmp_path / "run" / "checkpoint-3", 0)["losses"]["reward_baseline"]
    assert state == {"mean": pytest.approx(expected[2], rel=1e-5), "count": 2}

    resumed = trainer(tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    for mine, theirs in zip(training_logs(resumed)[3:], logs[3:], strict=True):
        for key in ("loss", "mpo/reward_baseline"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-9), (key, mine, theirs)


def test_conflicting_settings_name_both_keys(tiny_model_dirs, preference_rows, tmp_path):
    with pytest.raises(ConfigError, match=r"DPOConfig.beta is 0.2 and the plugin config's loss.beta is 0.3"):
        make_trainer(
            tiny_model_dirs["llava"], preference_rows, tmp_path, beta=0.2, vlm_dpo_config={"loss": {"beta": 0.3}}
        )
    with pytest.raises(ConfigError, match=r"DPOConfig.loss_type is \['hinge'\] and the plugin config's loss.type"):
        make_trainer(
            tiny_model_dirs["llava"],
            preference_rows,
            tmp_path,
            loss_type=["hinge"],
            vlm_dpo_config={"loss": {"type": "simpo"}},
        )


def test_dpo_config_values_set_only_there_are_used(tiny_model_dirs, preference_rows, tmp_path):
    trainer = make_trainer(tiny_model_dirs["llava"], preference_rows, tmp_path, beta=0.25, max_grad_norm=0.5)
    assert trainer.vlm_dpo_config.loss.beta == 0.25 and trainer.beta == 0.25
    assert trainer.vlm_dpo_config.guards.max_grad_norm == 0.5
    assert trainer.args.max_grad_norm == 0.0, "the guards clip; the Trainer's own clipping is off"


# -- collation, diagnostics, checkpointing ------------------------------------------------------


def test_identical_pairs_stop_training_before_step_0_naming_the_rows(tiny_model_dirs, preference_rows, tmp_path):
    from vlm_dpo_plugins.collation.policy import PairCheckError

    trainer = make_trainer(tiny_model_dirs["llava"], identical_pair_rows(preference_rows, [3, 11]), tmp_path)
    with pytest.raises(PairCheckError, match="identical-pair") as raised:
        trainer.train()
    assert raised.value.rows == [3, 11]
    assert trainer.state.global_step == 0


def test_skip_policy_leaves_rows_out_before_training_and_reports_them(tiny_model_dirs, preference_rows, tmp_path):
    config = {"collation": {"policy": {"identical-pair": "skip"}}}
    rows = identical_pair_rows(preference_rows, [5])
    trainer = make_trainer(tiny_model_dirs["llava"], rows, tmp_path, max_steps=2, vlm_dpo_config=config)
    trainer.train()
    assert len(trainer.train_dataset) == len(rows) - 1
    assert 5 not in trainer.train_dataset["row_index"]
    report = (tmp_path / "collation_report.jsonl").read_text()
    assert '"row": 5' in report and "identical-pair" in report


def test_detector_reports_a_loss_stuck_at_ln2(tiny_model_dirs, preference_rows, tmp_path):
    config = {
        "collation": {"policy": {"identical-pair": "warn"}},
        "diagnostics": {"stall_steps": 3},
    }
    rows = identical_pair_rows(preference_rows, range(len(preference_rows)))
    trainer = make_trainer(tiny_model_dirs["llava"], rows, tmp_path, max_steps=4, vlm_dpo_config=config)
    trainer.train()
    assert [finding.code for finding in trainer.vlm_dpo_findings] == ["loss-stuck-at-ln2"]


def test_gradient_checkpointing_is_non_reentrant(tiny_model_dirs, preference_rows, tmp_path):
    trainer = make_trainer(
        tiny_model_dirs["llava"], preference_rows, tmp_path, max_steps=1, gradient_checkpointing=True
    )
    assert trainer.args.gradient_checkpointing_kwargs["use_reentrant"] is False
    trainer.train()


def test_an_unsupported_trl_is_refused_at_import_with_the_range():
    from vlm_dpo_plugins.adapters.trl import RELEASES

    RELEASES.require("1.16.0", "vlm_dpo_plugins.adapters.trl")
    with pytest.raises(
        ImportError, match=r"supports trl>=1.16,<2 .*trl 0.24.0 is installed.*pip install 'trl>=1.16,<2'"
    ):
        RELEASES.require("0.24.0", "vlm_dpo_plugins.adapters.trl")


@pytest.mark.parametrize("blocked", ["guards", "freeze", "collation", "sharing", "losses"])
def test_a_blocked_builtin_leaves_its_part_to_trl(tiny_model_dirs, preference_rows, tmp_path, blocked):
    from vlm_dpo_plugins.manager import create_plugin_manager

    manager = create_plugin_manager(load_entry_points=False, block=[blocked])
    trainer = make_trainer(
        tiny_model_dirs["llava"], preference_rows[:4], tmp_path, max_steps=1, bf16=False, plugin_manager=manager
    )
    assert trainer.vlm_dpo_config.section("loss" if blocked == "losses" else blocked) is None
    assert trainer._trl_computes_loss == (blocked == "losses")
    before = snapshot(trainer.model)
    trainer.train()
    moved = changed(trainer.model, before)
    vision = {name for name in before if "vision_tower" in name}
    # Without the guards TRL clips with its own max_grad_norm; without the freeze policy everything trains.
    assert trainer.args.max_grad_norm == (1.0 if blocked == "guards" else 0.0)
    assert bool(moved & vision) == (blocked == "freeze")
