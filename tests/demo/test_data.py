"""Loading a preference data file: both row shapes, image paths, every error message, TRL's collator on the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("trl")

from PIL import Image  # noqa: E402
from vlm_dpo_plugins.demo.data import load_preference_dataset  # noqa: E402

from vlm_dpo_plugins.errors import ConfigError  # noqa: E402
from vlm_dpo_plugins.tiny import make_preference_examples, write_preference_images  # noqa: E402

IMAGE = {"type": "image", "text": None}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def write_jsonl(path: Path, rows: list, *, blank_lines_after: tuple[int, ...] = ()) -> Path:
    lines = []
    for index, row in enumerate(rows):
        lines.append(row if isinstance(row, str) else json.dumps(row))
        if index in blank_lines_after:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def examples():
    return make_preference_examples(4, seed=3)


@pytest.fixture
def image_names(tmp_path, examples):
    """The PNGs live in tmp_path/images; rows refer to them as images/<name> (relative to tmp_path)."""
    return [f"images/{path.name}" for path in write_preference_images(examples, tmp_path / "images")]


def plain_rows(examples, image_names) -> list[dict]:
    return [
        {"prompt": example.prompt, "chosen": example.chosen, "rejected": example.rejected, "images": [name]}
        for example, name in zip(examples, image_names)
    ]


def load_error(path: Path, **kwargs) -> str:
    with pytest.raises(ConfigError) as caught:
        load_preference_dataset(path, **kwargs)
    return str(caught.value)


# ---------------------------------------------------------------- accepted shapes


def test_plain_jsonl_rows_become_trl_conversational_rows(tmp_path, examples, image_names):
    rows = plain_rows(examples, image_names)
    rows[0]["source"] = "ignored: extra keys are fine"
    path = write_jsonl(tmp_path / "pairs.jsonl", rows, blank_lines_after=(1,))

    dataset = load_preference_dataset(path)

    assert len(dataset) == 4
    assert dataset.column_names == ["images", "prompt", "chosen", "rejected", "row_index"]
    assert dataset["row_index"] == [0, 1, 2, 3]
    row = dataset[0]
    assert row["prompt"] == [{"role": "user", "content": [IMAGE, text(examples[0].prompt)]}]
    assert row["chosen"] == [{"role": "assistant", "content": [text(examples[0].chosen)]}]
    assert row["rejected"] == [{"role": "assistant", "content": [text(examples[0].rejected)]}]
    assert len(row["images"]) == 1 and isinstance(row["images"][0], Image.Image)
    assert row["images"][0].convert("RGB").tobytes() == examples[0].image.convert("RGB").tobytes()


def test_image_placeholders_place_each_image_where_it_stands(tmp_path, image_names):
    row = {
        "prompt": "Compare <image> and <image>\nWhich one is red?",
        "chosen": "The first.",
        "rejected": "The second.",
        "images": image_names[:2],
    }
    dataset = load_preference_dataset(write_jsonl(tmp_path / "pairs.jsonl", [row]))

    content = dataset[0]["prompt"][0]["content"]
    assert content == [text("Compare "), IMAGE, text(" and "), IMAGE, text("Which one is red?")]
    assert [image.size for image in dataset[0]["images"]] == [(56, 56), (56, 56)]


def test_leading_llava_style_placeholder(tmp_path, image_names):
    row = {"prompt": "<image>\nWhat is it?", "chosen": "A square.", "rejected": "A circle.", "image": image_names[0]}
    dataset = load_preference_dataset(write_jsonl(tmp_path / "pairs.jsonl", [row]))
    assert dataset[0]["prompt"][0]["content"] == [IMAGE, text("What is it?")]


def test_json_list_with_images_root_and_single_image_key(tmp_path, examples, image_names):
    rows = [
        {"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected, "image": Path(name).name}
        for e, name in zip(examples, image_names)
    ]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = data_dir / "pairs.json"
    path.write_text(json.dumps(rows))

    dataset = load_preference_dataset(path, images_root=tmp_path / "images")

    assert len(dataset) == 4
    assert dataset[3]["prompt"][0]["content"] == [IMAGE, text(examples[3].prompt)]
    # Without images_root the same names resolve against data/, where they are not.
    assert "data/pair_0000" in load_error(path)


def test_absolute_image_paths_ignore_both_roots(tmp_path, examples, image_names):
    rows = plain_rows(examples, [str(tmp_path / name) for name in image_names])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path = write_jsonl(elsewhere / "pairs.jsonl", rows)
    assert len(load_preference_dataset(path, images_root=tmp_path / "no-such-folder")) == 4


def test_trl_conversational_rows_with_typed_parts_and_string_contents(tmp_path, examples, image_names):
    typed = {
        "prompt": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": "Left:"}, {"type": "image"}, {"type": "image"}]},
        ],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Red."}]}],
        "rejected": [{"role": "assistant", "content": "Blue."}],
        "images": image_names[:2],
    }
    # All string contents and no image part: the images go before the first user text, as TRL does it.
    strings = {
        "prompt": [{"role": "user", "content": examples[2].prompt}],
        "chosen": [{"role": "assistant", "content": examples[2].chosen}],
        "rejected": [{"role": "assistant", "content": examples[2].rejected}],
        "images": [image_names[2]],
    }
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([typed, strings]))

    dataset = load_preference_dataset(path)

    assert dataset[0]["prompt"] == [
        {"role": "system", "content": [text("Answer briefly.")]},
        {"role": "user", "content": [text("Left:"), IMAGE, IMAGE]},
    ]
    assert dataset[0]["chosen"] == [{"role": "assistant", "content": [text("Red.")]}]
    assert dataset[0]["rejected"] == [{"role": "assistant", "content": [text("Blue.")]}]
    assert dataset[1]["prompt"] == [{"role": "user", "content": [IMAGE, text(examples[2].prompt)]}]
    assert len(dataset[0]["images"]) == 2 and len(dataset[1]["images"]) == 1


def test_empty_responses_load_and_are_left_to_the_collation_checks(tmp_path, examples, image_names):
    rows = plain_rows(examples, image_names)[:1]
    rows[0]["chosen"] = ""
    dataset = load_preference_dataset(write_jsonl(tmp_path / "pairs.jsonl", rows))
    assert dataset[0]["chosen"] == [{"role": "assistant", "content": [text("")]}]


def test_images_are_stored_as_paths_and_decoded_only_when_read(tmp_path, examples, image_names):
    dataset = load_preference_dataset(write_jsonl(tmp_path / "pairs.jsonl", plain_rows(examples, image_names)))

    stored = dataset.data.column("images").to_pylist()
    assert stored[0] == [{"bytes": None, "path": str(tmp_path / image_names[0])}]
    assert all(entry["bytes"] is None for row in stored for entry in row)
    assert isinstance(dataset[1]["images"][0], Image.Image)


def test_trl_vision_collator_builds_a_batch_from_the_loaded_rows(tmp_path, examples, image_names):
    from transformers import AutoProcessor
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from vlm_dpo_plugins.tiny import build_tiny_llava

    rows = plain_rows(examples, image_names)
    rows[1]["prompt"] = "<image>\n" + rows[1]["prompt"]
    dataset = load_preference_dataset(write_jsonl(tmp_path / "pairs.jsonl", rows))
    processor = AutoProcessor.from_pretrained(build_tiny_llava(tmp_path / "m"))

    batch_rows = [dataset[i] for i in range(3)]
    assert all(isinstance(image, Image.Image) for row in batch_rows for image in row["images"])
    batch = DataCollatorForVisionPreference(processor)(batch_rows)

    assert batch["input_ids"].shape[0] == 2 * 3  # chosen rows, then rejected rows
    assert batch["pixel_values"].shape[0] == 2 * 3  # one image per row, repeated for each side
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert ((batch["input_ids"] == image_token_id).sum(dim=1) > 0).all()


# ---------------------------------------------------------------- errors


def test_unreadable_jsonl_line_names_row_and_line(tmp_path, examples, image_names):
    rows = plain_rows(examples, image_names)[:2] + ['{"prompt": "cut off', *plain_rows(examples, image_names)[2:]]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows, blank_lines_after=(0,))
    message = load_error(path)
    assert str(path) in message
    assert "1 problem(s)" in message
    assert "row 2 (line 4): the line is not valid JSON" in message
    assert "Fix: make the line one complete JSON object, or remove it" in message


def test_a_line_that_is_not_utf8_is_one_bad_row_and_the_other_rows_are_still_checked(tmp_path, examples, image_names):
    rows = plain_rows(examples, image_names)
    rows[3]["images"] = ["images/missing.png"]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b"color", b"col\xe0r", 1)  # a Latin-1 byte: not UTF-8
    path.write_bytes(b"".join(lines))
    message = load_error(path)
    assert "2 problem(s)" in message
    assert "row 1 (line 2): the line is not UTF-8 (invalid continuation byte at byte" in message
    assert "Fix: re-encode the line as UTF-8, or remove it" in message
    assert "row 3 (line 4), field 'images[0]': the image file" in message  # the rows after it are still read


def test_json_file_holding_jsonl_suggests_the_jsonl_extension(tmp_path, examples, image_names):
    path = write_jsonl(tmp_path / "pairs.json", plain_rows(examples, image_names))
    message = load_error(path)
    assert "is not valid JSON: Extra data at line 2" in message and "name it .jsonl" in message


def test_json_file_must_hold_a_list(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text('{"data": []}')
    assert "holds a JSON object, not a list of rows" in load_error(path)


def test_missing_empty_and_oddly_named_files(tmp_path):
    assert "preference data file not found: tried" in load_error(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert "holds no rows" in load_error(tmp_path / "empty.jsonl")
    (tmp_path / "pairs.csv").write_text("prompt,chosen\n")
    assert "unsupported extension '.csv'" in load_error(tmp_path / "pairs.csv")


def test_row_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [["a", "b"]])
    message = load_error(path)
    assert "row 0 (line 1): is a JSON array, not an object" in message
    assert 'Fix: each row must be an object with "prompt", "chosen", "rejected" and "images"' in message


def test_missing_and_wrongly_typed_fields(tmp_path, examples, image_names):
    rows = plain_rows(examples, image_names)
    del rows[0]["chosen"]
    rows[1]["prompt"] = 5
    del rows[2]["images"]
    rows[3]["images"] = "images/one.png"
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(rows))

    message = load_error(path)

    assert "4 problem(s)" in message
    assert "row 0, field 'chosen': is missing. Fix: add \"chosen\"" in message
    assert "row 1, field 'prompt': is a JSON number, expected a string or a list of messages" in message
    assert 'row 2, field \'images\': is missing. Fix: add "images": ["path.png", ...]' in message
    assert "row 3, field 'images': is the string 'images/one.png', expected a list of image paths" in message
    assert "(line" not in message  # a .json file has no meaningful line per row


def test_unknown_role(tmp_path, image_names):
    row = {
        "prompt": [{"role": "human", "content": "What colour?"}],
        "chosen": [{"role": "assistant", "content": "Red."}],
        "rejected": [{"role": "assistant", "content": "Blue."}],
        "images": [image_names[0]],
    }
    message = load_error(write_jsonl(tmp_path / "pairs.jsonl", [row]))
    assert "row 0 (line 1), field 'prompt[0].role': is the string 'human', not a known role" in message
    assert "Fix: use one of system, user, assistant, tool" in message


def test_malformed_content_parts(tmp_path, image_names):
    row = {
        "prompt": [{"role": "user", "content": [{"type": "video"}, {"type": "text"}]}],
        "chosen": [{"role": "assistant", "content": 3}],
        "rejected": "Blue.",
        "images": [image_names[0]],
    }
    message = load_error(write_jsonl(tmp_path / "pairs.jsonl", [row]))
    assert "field 'prompt[0].content[0]': has type the string 'video'" in message
    assert "field 'chosen[0].content': is a JSON number, expected a string or a list of typed parts" in message


def test_placeholder_count_must_match_images(tmp_path, image_names):
    row = {"prompt": "<image> vs <image>: which?", "chosen": "A", "rejected": "B", "images": [image_names[0]]}
    message = load_error(write_jsonl(tmp_path / "pairs.jsonl", [row]))
    assert "row 0 (line 1), field 'prompt': has 2 image placeholder(s)" in message
    assert "but 'images' lists 1 image(s)" in message
    assert "Fix: make them equal: one <image> (or image part) per image, in order" in message


def test_image_part_count_must_match_images_in_conversational_rows(tmp_path, image_names):
    row = {
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which?"}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "This."}]}],
        "rejected": [{"role": "assistant", "content": "That."}],
        "images": image_names[:2],
    }
    message = load_error(write_jsonl(tmp_path / "pairs.jsonl", [row]))
    assert "field 'prompt': has 1 image placeholder(s)" in message and "lists 2 image(s)" in message
    assert "field 'chosen': contains an image part. Fix: images belong in the prompt" in message


def test_missing_image_names_the_path_tried_and_images_root(tmp_path, examples, image_names):
    rows = plain_rows(examples, image_names)
    rows[1]["images"] = ["images/missing.png"]
    message = load_error(write_jsonl(tmp_path / "pairs.jsonl", rows))
    missing = tmp_path / "images" / "missing.png"
    assert f"row 1 (line 2), field 'images[0]': the image file '{missing}' does not exist" in message
    assert f"relative paths resolve against the data file's folder {tmp_path}" in message
    assert "--images-root DIR" in message

    message = load_error(write_jsonl(tmp_path / "pairs.jsonl", rows), images_root=tmp_path / "pics")
    assert f"the image file '{tmp_path / 'pics' / 'images' / 'missing.png'}' does not exist" in message
    assert f"relative paths resolve against --images-root {tmp_path / 'pics'}" in message


def test_image_pillow_cannot_open(tmp_path, examples, image_names):
    (tmp_path / "images" / "broken.png").write_bytes(b"this is not a png")
    rows = plain_rows(examples, image_names)
    rows[2]["images"] = ["images/broken.png"]
    message = load_error(write_jsonl(tmp_path / "pairs.jsonl", rows))
    assert "row 2 (line 3), field 'images[0]': the image file " in message
    assert "broken.png' cannot be read as an image (UnidentifiedImageError" in message
    assert "replace the file with a readable image" in message


def test_every_problem_is_collected_and_the_list_is_capped_at_twenty(tmp_path, examples, image_names):
    row = plain_rows(examples, image_names)[0]
    rows = [dict(row, images=[f"images/gone_{index}.png"]) for index in range(25)]
    rows[3] = dict(row, prompt=None)
    message = load_error(write_jsonl(tmp_path / "pairs.jsonl", rows))

    assert message.startswith(f"25 problem(s) in preference data file {tmp_path / 'pairs.jsonl'}:")
    assert "row 3 (line 4), field 'prompt': is null" in message
    assert "gone_19.png" in message and "gone_20.png" not in message  # rows 0..19 listed, sorted by row
    assert message.rstrip().endswith("... and 5 more")
