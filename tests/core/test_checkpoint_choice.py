"""Resuming never picks a checkpoint whose save was cut off (adapters/hf_trainer/checkpoint_choice.py)."""

from __future__ import annotations

import logging

import pytest
from vlm_dpo_plugins.adapters.hf_trainer.checkpoint_choice import (
    choose_checkpoint,
    mark_saved,
    mark_saving,
    why_incomplete,
)


def checkpoint(output_dir, step, *, state="{}", saving_ranks=()):
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if state is not None:
        (folder / "trainer_state.json").write_text(state)
    for rank in saving_ranks:
        mark_saving(folder, rank)
    return folder


def test_a_marker_left_by_any_rank_or_a_missing_or_truncated_state_makes_it_incomplete(tmp_path):
    assert why_incomplete(checkpoint(tmp_path, 1)) is None
    assert why_incomplete(checkpoint(tmp_path, 2, saving_ranks=[1])) == (
        "its save was interrupted (vlm_dpo_saving.rank1 left behind)"
    )
    assert why_incomplete(checkpoint(tmp_path, 3, state=None)) == "it has no trainer_state.json"
    assert why_incomplete(checkpoint(tmp_path, 4, state='{"global_step": 4, "log_hi')).startswith(
        "its trainer_state.json cannot be read ("
    )
    finished = checkpoint(tmp_path, 5, saving_ranks=[0, 1])
    mark_saved(finished, 0)
    mark_saved(finished, 1)
    assert why_incomplete(finished) is None


def test_resuming_from_the_newest_skips_incomplete_ones_and_says_so(tmp_path, caplog):
    checkpoint(tmp_path, 2)
    checkpoint(tmp_path, 10)  # numerically newest complete, not the lexically last
    checkpoint(tmp_path, 12, saving_ranks=[0])
    checkpoint(tmp_path, 14, state=None)
    with caplog.at_level(logging.WARNING):
        assert choose_checkpoint(True, tmp_path) == str(tmp_path / "checkpoint-10")
    (message,) = [record.getMessage() for record in caplog.records]
    assert f"not resuming from {tmp_path / 'checkpoint-14'}: it has no trainer_state.json; " in message
    assert f"{tmp_path / 'checkpoint-12'}: its save was interrupted (vlm_dpo_saving.rank0 left behind)" in message
    assert message.endswith(f"resuming from {tmp_path / 'checkpoint-10'}, the newest complete checkpoint")


def test_a_named_incomplete_checkpoint_falls_back_to_the_newest_complete_one_before_it(tmp_path, caplog):
    checkpoint(tmp_path, 4)
    checkpoint(tmp_path, 6, saving_ranks=[0])
    checkpoint(tmp_path, 8)  # after the one asked for: never a substitute
    assert choose_checkpoint(str(tmp_path / "checkpoint-6"), tmp_path / "elsewhere") == str(tmp_path / "checkpoint-4")
    assert choose_checkpoint(str(tmp_path / "checkpoint-8"), tmp_path) == str(tmp_path / "checkpoint-8")
    assert choose_checkpoint(None, tmp_path) is None and choose_checkpoint(False, tmp_path) is None


def test_with_no_complete_checkpoint_the_error_names_each_one_and_its_defect(tmp_path):
    checkpoint(tmp_path, 1, state=None)
    checkpoint(tmp_path, 2, saving_ranks=[0])
    with pytest.raises(ValueError) as error:
        choose_checkpoint(True, tmp_path)
    assert str(error.value) == (
        f"no complete checkpoint to resume from ({tmp_path / 'checkpoint-2'}: its save was interrupted "
        f"(vlm_dpo_saving.rank0 left behind); {tmp_path / 'checkpoint-1'}: it has no trainer_state.json)"
    )
    with pytest.raises(ValueError, match="no checkpoint-\\* folder to resume from in "):
        choose_checkpoint(True, tmp_path / "empty")


def test_a_path_that_is_not_a_folder_is_left_to_the_trainer(tmp_path):
    assert choose_checkpoint(str(tmp_path / "missing"), tmp_path) == str(tmp_path / "missing")
