"""The live detectors inside ``VLMDPOTrainer.train()``: each seed failure reproduced on a tiny VLM, and the cause named.

A healthy run is the control: 30 steps that learn the preference must not raise one
finding or one warning.
"""

from __future__ import annotations

import logging

import pytest

trl = pytest.importorskip("trl")

import torch  # noqa: E402
from trl_runs import (  # noqa: E402
    EVERYTHING_TRAINS,
    UNSHARED,
    InjectNonFiniteGradient,
    identical_pair_rows,
    make_trainer,
    training_logs,
)
from vlm_dpo_plugins.demo.scenarios import image_grounded_rows  # noqa: E402

# The unfrozen-vision scenario's set-up: 8 image-decided pairs, all in every batch, a rate that moves the vision
# tower a long way in 30 steps. Only the freeze policy differs between the failing and the healthy run.
GROUNDED = dict(max_steps=30, per_device_train_batch_size=8, learning_rate=2e-2)


def warnings_from_the_plugins(records) -> list[str]:
    return [r.getMessage() for r in records if r.name.startswith("vlm_dpo_plugins") and r.levelno >= logging.WARNING]


def test_a_healthy_30_step_run_raises_no_finding_and_no_warning(tiny_model_dirs, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    trainer = make_trainer(tiny_model_dirs["llava"], image_grounded_rows(8, 0), tmp_path, **GROUNDED)
    trainer.train()

    logs = training_logs(trainer)
    assert len(logs) == 30
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.2 and logs[-1]["rewards/accuracies"] >= 0.75, "it learned"
    assert trainer.vlm_dpo_findings == []
    assert warnings_from_the_plugins(caplog.records) == []
    assert not (tmp_path / "vlm_dpo_findings.jsonl").exists()
    # The detectors' measurements are logged every step all the same.
    assert {"vlm_dpo/diag/ln2_streak", "vlm_dpo/diag/loss_slope", "vlm_dpo/diag/margin_amplitude"} <= logs[-1].keys()


def test_trainable_vision_gives_a_rising_loss_at_chance_accuracy_named_as_the_vision_tower(tiny_model_dirs, tmp_path):
    trainer = make_trainer(
        tiny_model_dirs["llava"],
        image_grounded_rows(8, 0),
        tmp_path,
        vlm_dpo_config=EVERYTHING_TRAINS | UNSHARED,  # the trajectory this scenario was tuned on
        **GROUNDED,
    )
    trainer.train()

    [finding] = trainer.vlm_dpo_findings
    assert finding.code == "loss-rising-accuracy-chance"
    assert "reward accuracy stayed near chance" in finding.message
    assert "the vision tower and projector are trainable" in finding.message
    assert "freeze.trainable: [language]" in finding.fix
    logged = training_logs(trainer)[finding.step - 1]
    assert logged["vlm_dpo/diag/reward_comovement"] > 0.5


def test_identical_pairs_that_get_through_are_named_from_the_batch(tiny_model_dirs, preference_rows, tmp_path):
    rows = identical_pair_rows(preference_rows, range(len(preference_rows)))
    config = {"collation": {"policy": {"identical-pair": "warn"}}, "diagnostics": {"stall_steps": 3}}
    trainer = make_trainer(tiny_model_dirs["llava"], rows, tmp_path, max_steps=4, vlm_dpo_config=config)
    trainer.train()

    [finding] = trainer.vlm_dpo_findings
    assert finding.code in ("loss-stuck-at-ln2", "no-gradient")
    assert "2 of 2 pairs have token-identical responses" in finding.message
    assert "chosen and rejected are identical after tokenization" in finding.message


class MaskEveryResponse:
    """A collator bug after the checks: the completion mask zeroed, so no response token is trained."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, examples):
        batch = self.collate(examples)
        batch["completion_mask"] = torch.zeros_like(batch["completion_mask"])
        return batch


def test_masked_responses_are_named_as_the_cause(tiny_model_dirs, preference_rows, tmp_path):
    trainer = make_trainer(tiny_model_dirs["llava"], preference_rows, tmp_path, max_steps=4)
    trainer.data_collator = MaskEveryResponse(trainer.data_collator)
    trainer.train()

    [finding] = trainer.vlm_dpo_findings
    assert finding.code == "no-gradient" and finding.step == 3
    assert "language received no usable gradient" in finding.message
    assert "4 of 4 responses have no trained token" in finding.message
    assert "the label/completion mask hides whole responses" in finding.message
    assert all(entry["loss"] == pytest.approx(0.6931, abs=1e-4) for entry in training_logs(trainer))


def test_a_non_finite_gradient_is_reported_once_with_the_first_group_it_hit(tiny_model_dirs, preference_rows, tmp_path):
    vision = InjectNonFiniteGradient(at_steps=[1, 2], parameter="model.vision_tower.embeddings.patch_embedding.weight")
    language = InjectNonFiniteGradient(at_steps=[1])
    trainer = make_trainer(
        tiny_model_dirs["llava"],
        preference_rows,
        tmp_path,
        max_steps=4,
        vlm_dpo_config=EVERYTHING_TRAINS,
        callbacks=[vision, language],
    )
    trainer.train()

    [finding] = trainer.vlm_dpo_findings
    assert finding.code == "non-finite" and finding.severity.value == "warning" and finding.step == 2
    assert "first offending parameter group: vision (also language)" in finding.message
    assert "The step was skipped (weights and optimizer state untouched)" in finding.message
    assert "guards.group_max_grad_norm.vision" in finding.fix
    assert [entry["vlm_dpo/diag/non_finite_steps"] for entry in training_logs(trainer)] == [0, 1, 2, 2]
    written = (tmp_path / "vlm_dpo_findings.jsonl").read_text().splitlines()
    assert len(written) == 1 and '"code": "non-finite"' in written[0] and '"step": 2' in written[0]
