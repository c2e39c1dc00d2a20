"""The collation checks on the batches TRL's own DataCollatorForVisionPreference builds (TRL >= 0.29).

Acceptance: chosen == rejected rows on the tiny LLaVA are reported with their row
indices and kept under ``warn``, dropped, counted and filed under ``skip``, and
named in the error under ``error``. Then the crash the image checks exist for: a
Qwen2-VL prompt cut inside its image tokens fails the model's forward pass, and
the checked collation names the row or leaves it out instead.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from vlm_dpo_plugins.collation.policy import PairCheckError
from vlm_dpo_plugins.collation.wrapper import HookedCollator
from vlm_dpo_plugins.manager import create_plugin_manager
from vlm_dpo_plugins.types import RunContext

trl = pytest.importorskip("trl")
if tuple(int(part) for part in trl.__version__.split(".")[:2]) < (0, 29):
    pytest.skip(f"TRL {trl.__version__} < 0.29 has no DataCollatorForVisionPreference (LLaMA-Factory's env)",
                allow_module_level=True)
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference  # noqa: E402


@pytest.fixture(scope="module")
def llava_processor(tmp_path_factory):
    from transformers import AutoProcessor

    from vlm_dpo_plugins.tiny import build_tiny_llava

    return AutoProcessor.from_pretrained(build_tiny_llava(tmp_path_factory.mktemp("tiny-llava")))


def rows_with_identical_pairs():
    """Dataset rows 20..23 in TRL's conversational format; rows 21 and 23 have chosen == rejected."""
    from vlm_dpo_plugins.tiny import make_preference_examples, trl_conversational_rows

    rows = trl_conversational_rows(make_preference_examples(4, seed=3))
    for index, row in enumerate(rows):
        row["row_index"] = 20 + index
    rows[1]["rejected"] = rows[1]["chosen"]
    rows[3]["rejected"] = rows[3]["chosen"]
    return rows


def configured(tmp_path, policy):
    manager = create_plugin_manager(load_entry_points=False)
    manager.hook.vlm_dpo_configure(config=manager.load_config({"collation": {"policy": {"identical-pair": policy}}}))
    manager.hook.vlm_dpo_train_begin(model=torch.nn.Linear(1, 1), context=RunContext("trl", output_dir=str(tmp_path)))
    return manager


def test_warn_reports_identical_pairs_with_their_rows_and_keeps_them(llava_processor, tmp_path, caplog):
    manager = configured(tmp_path, "warn")
    collator = DataCollatorForVisionPreference(llava_processor)
    with caplog.at_level(logging.WARNING, logger="vlm_dpo_plugins.collation"):
        batch = HookedCollator(manager, collator)(rows_with_identical_pairs())
    assert batch["input_ids"].shape[0] == 8 and batch["pixel_values"].shape[0] == 8
    logged = [record.getMessage() for record in caplog.records if record.name == "vlm_dpo_plugins.collation"]
    assert [message.split(":")[0] for message in logged] == ["kept (row 21)", "kept (row 23)"]
    report = [json.loads(line) for line in (tmp_path / "collation_report.jsonl").read_text().splitlines()]
    assert [(line["row"], line["action"], line["check"]) for line in report] == [
        (21, "warn", "identical-pair"), (23, "warn", "identical-pair"),
    ]


def test_skip_drops_identical_pairs_counts_them_and_files_them(llava_processor, tmp_path):
    manager = configured(tmp_path, "skip")
    collator = DataCollatorForVisionPreference(llava_processor)
    rows = rows_with_identical_pairs()
    batch = HookedCollator(manager, collator)(rows)
    expected = collator([{k: v for k, v in rows[i].items() if k != "row_index"} for i in (0, 2)])
    assert sorted(batch) == sorted(expected)
    assert all(torch.equal(batch[key], expected[key]) for key in batch)
    assert manager.get_plugin("collation").summary.skipped_rows == {21, 23}
    report = [json.loads(line) for line in (tmp_path / "collation_report.jsonl").read_text().splitlines()]
    assert [(line["row"], line["action"], line["check"]) for line in report] == [
        (21, "skip", "identical-pair"), (23, "skip", "identical-pair"),
    ]


def test_error_raises_naming_the_identical_rows(llava_processor, tmp_path):
    manager = configured(tmp_path, "error")
    with pytest.raises(PairCheckError, match=r"^collation checks failed for 2 row\(s\): 21, 23\n") as raised:
        HookedCollator(manager, DataCollatorForVisionPreference(llava_processor))(rows_with_identical_pairs())
    assert "identical-pair (row 21, field 'rejected'): chosen and rejected responses are token-identical" in str(
        raised.value
    )


def test_a_qwen2_vl_prompt_cut_inside_its_images_is_named_or_left_out_instead_of_crashing(tmp_path_factory):
    import dataclasses

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_dpo_plugins.tiny import build_tiny_qwen2_vl, make_preference_examples, trl_conversational_rows

    if "max_length" not in {field.name for field in dataclasses.fields(DataCollatorForVisionPreference)}:
        pytest.skip(f"TRL {trl.__version__}'s vision collator does not truncate (no max_length)")
    directory = build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"))
    processor = AutoProcessor.from_pretrained(directory)
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    rows = trl_conversational_rows(make_preference_examples(2, seed=1))
    # Row 1 gets two 112x112 images (16 tokens each, the tiny processor's cap); row 0 keeps one 56x56 (4 tokens).
    big = rows[1]["images"][0].resize((112, 112))
    rows[1]["images"] = [big, big]
    rows[1]["prompt"][0]["content"].insert(0, {"type": "image"})
    collator = DataCollatorForVisionPreference(processor, max_length=40)  # row 0 fits whole; row 1 is cut

    fresh = [{key: value for key, value in row.items()} for row in rows]
    with pytest.raises(ValueError, match="Image features and image tokens do not match"), torch.no_grad():
        model(**{k: v for k, v in collator(fresh).items() if k != "completion_mask"})

    manager = create_plugin_manager(load_entry_points=False)
    manager.hook.vlm_dpo_configure(config=manager.load_config({}))
    with pytest.raises(PairCheckError, match=r"image-tokens-truncated \(row 1, field 'chosen'\).*its 2 image\(s\) need 32"):
        HookedCollator(manager, collator)([dict(row) for row in rows])

    manager.hook.vlm_dpo_configure(config=manager.load_config(
        {"collation": {"policy": {"image-tokens-truncated": "skip"}, "report_path": str(tmp_path_factory.mktemp("r") / "r.jsonl")}}
    ))
    batch = HookedCollator(manager, collator)([dict(row) for row in rows])
    assert batch["input_ids"].shape[0] == 2 and batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    with torch.no_grad():
        assert torch.isfinite(model(**{k: v for k, v in batch.items() if k != "completion_mask"}).logits).all()
