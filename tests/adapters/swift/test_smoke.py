"""Smoke test: a tiny random-weight VLM trains 2 DPO steps through ms-swift's own CLI.

Runs ``swift rlhf --rlhf_type dpo ...`` as a subprocess (full fine-tuning, fp32 on CPU,
offline, every cache in ``tmp_path``) on swift-format JSONL rows (``messages`` +
``rejected_response`` + ``images``) with PNG images, then checks the run on disk:
finite logged loss starting at ln 2, language-model weights moved, and the vision
tower and projector (frozen by swift's defaults ``--freeze_vit true``,
``--freeze_aligner true``) unchanged. Runs once per tiny model (see ``conftest.py``).

Only meaningful in the ms-swift test environment; skipped elsewhere.
"""

from __future__ import annotations

import math

import pytest

swift = pytest.importorskip("swift", reason="needs the ms-swift test environment (ms-swift==4.6.0)")
if getattr(swift, "__file__", None) is None:  # a namespace package (e.g. a stray ``swift/`` folder), not ms-swift
    pytest.skip("`swift` is not ms-swift here", allow_module_level=True)

MAX_STEPS = 2


def test_dpo_two_steps_via_swift_cli(swift_dpo, swift_tiny_model) -> None:
    run = swift_dpo(swift_tiny_model, num_rows=4, max_steps=MAX_STEPS, batch_size=2)
    print(f"[swift smoke] {swift_tiny_model.name}: swift rlhf subprocess {run.seconds:.1f}s")
    assert run.returncode == 0, f"swift rlhf failed (rc={run.returncode}, {run.seconds:.1f}s)\n{run.tail()}"

    # swift really resolved the run we asked for, with its freezing defaults
    args = run.args_json()
    assert (args["rlhf_type"], args["model_type"], args["template"]) == (
        "dpo",
        swift_tiny_model.model_type,
        swift_tiny_model.template,
    )
    assert args["tuner_type"] == "full"
    assert (args["freeze_vit"], args["freeze_aligner"], args["freeze_llm"]) == (True, True, False), args

    # a loss at every step (logging_steps=1), in swift's logging.jsonl and the HF trainer state
    state = run.trainer_state()
    assert state["global_step"] == MAX_STEPS, run.tail()
    state_losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    jsonl_losses = [entry["loss"] for entry in run.logged_steps()]
    assert len(state_losses) == MAX_STEPS, (state["log_history"], run.tail())
    assert jsonl_losses == pytest.approx(state_losses, abs=1e-6)
    assert all(math.isfinite(loss) for loss in state_losses), state_losses
    # sigmoid DPO with the policy equal to the reference model starts at exactly ln 2
    assert state_losses[0] == pytest.approx(math.log(2), abs=1e-4), state_losses
    grad_norms = [entry["grad_norm"] for entry in state["log_history"] if "grad_norm" in entry]
    assert grad_norms and all(math.isfinite(g) and g > 0 for g in grad_norms), grad_norms

    # Full fine-tuning (weight decay 0, so a weight moves only if it got a gradient):
    # the language model moved, the frozen vision tower and projector did not.
    moved, kept = run.weight_changes()
    assert all(moved[part] or kept[part] for part in moved), f"a model part is missing: {moved} {kept}"
    assert moved["language"], "no language-model weight changed after 2 DPO steps"
    # every language-model tensor got a gradient (catches a checkpointing set-up that cuts the graph)
    assert not kept["language"], f"language-model weights that never moved: {kept['language']}"
    assert not moved["vision"], f"frozen vision tower changed (swift's --freeze_vit default): {moved['vision']}"
    assert not moved["aligner"], f"frozen projector changed (swift's --freeze_aligner default): {moved['aligner']}"
