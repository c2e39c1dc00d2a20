"""``vlm-dpo doctor --data``: every layout read, every planted defect found at its row, nothing else reported."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from PIL import Image

from vlm_dpo_plugins.cli import main
from vlm_dpo_plugins.preference_data.pairs import RowProblem, parse_pair

ROWS = 10_000
DISTINCT_IMAGES = 2_000


def run_doctor(capsys, *arguments) -> tuple[int, str]:
    code = main(["doctor", *map(str, arguments)])
    return code, capsys.readouterr().out


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as file:
        for row in rows:
            file.write(row if isinstance(row, str) else json.dumps(row))
            file.write("\n")
    return path


# -- the layouts --------------------------------------------------------------------------


LAYOUTS = {
    "trl-strings": {"prompt": "<image>What is it?", "chosen": "A cat.", "rejected": "A dog.", "images": ["a.png"]},
    "trl-messages": {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        ],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
        "rejected": [{"role": "assistant", "content": "A dog."}],
        "image": "a.png",
    },
    "sharegpt": {
        "conversations": [{"from": "human", "value": "<image>What is it?"}],
        "chosen": {"from": "gpt", "value": "A cat."},
        "rejected": {"from": "gpt", "value": "A dog."},
        "images": ["a.png"],
    },
    "sharegpt-openai-tags": {
        "messages": [{"role": "user", "content": "<image>What is it?"}],
        "chosen": {"role": "assistant", "content": "A cat."},
        "rejected": {"role": "assistant", "content": "A dog."},
        "images": ["a.png"],
    },
    "alpaca": {
        "instruction": "<image>What is it?",
        "input": "",
        "chosen": "A cat.",
        "rejected": "A dog.",
        "images": ["a.png"],
    },
    "swift": {
        "messages": [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "A cat."}],
        "rejected_response": "A dog.",
        "images": [{"path": "a.png"}],
    },
}
EXPECTED_LAYOUT = {
    "trl-strings": "trl",
    "trl-messages": "trl",
    "sharegpt": "sharegpt",
    "sharegpt-openai-tags": "sharegpt",
    "alpaca": "alpaca",
    "swift": "swift",
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_layout_reads_as_the_same_pair(name):
    pair = parse_pair(7, LAYOUTS[name])
    assert (pair.row, pair.layout, pair.chosen, pair.rejected) == (7, EXPECTED_LAYOUT[name], "A cat.", "A dog.")
    assert pair.prompt.endswith("What is it?") and pair.placeholders == 1 and len(pair.images) == 1


@pytest.mark.parametrize(
    "row, field, words",
    [
        ({"prompt": "q", "chosen": "a"}, "rejected", "the row has no 'rejected'"),
        ({"prompt": "q", "chosen": {"role": "user", "content": "a"}, "rejected": "b"}, "chosen", "has role 'user'"),
        (
            {"conversations": [{"from": "gpt", "value": "q"}], "chosen": "a", "rejected": "b"},
            "conversations[0]",
            "the prompt ends with a 'gpt' turn",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}], "rejected_response": "b"},
            "messages[0]",
            "ms-swift takes the last assistant turn",
        ),
        ({"question": "q", "answer": "a"}, None, "no known preference layout"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "images": "a.png"}, "images", "expected a list"),
    ],
)
def test_an_unreadable_row_names_its_field(row, field, words):
    with pytest.raises(RowProblem) as raised:
        parse_pair(0, row)
    assert raised.value.field_name == field and words in raised.value.message


# -- 10,000 pairs with planted defects ---------------------------------------------------------------------


def healthy_row(index: int, image: str) -> dict:
    question, chosen, rejected = (
        f"What is shown in picture {index}?",
        f"A red square, number {index}.",
        "A blue circle.",
    )
    layout = index % 4
    if layout == 0:
        return {"prompt": f"<image>{question}", "chosen": chosen, "rejected": rejected, "images": [image]}
    if layout == 1:
        return {
            "conversations": [{"from": "human", "value": f"<image>{question}"}],
            "chosen": {"from": "gpt", "value": chosen},
            "rejected": {"from": "gpt", "value": rejected},
            "images": [image],
        }
    if layout == 2:
        return {
            "messages": [{"role": "user", "content": f"<image>{question}"}, {"role": "assistant", "content": chosen}],
            "rejected_response": rejected,
            "images": [image],
        }
    return {"instruction": f"<image>{question}", "chosen": chosen, "rejected": rejected, "images": [image]}


def set_responses(row: dict, chosen: str | None = None, rejected: str | None = None) -> None:
    if "rejected_response" in row:
        if chosen is not None:
            row["messages"][-1]["content"] = chosen
        if rejected is not None:
            row["rejected_response"] = rejected
    elif isinstance(row.get("chosen"), dict):
        if chosen is not None:
            row["chosen"]["value"] = chosen
        if rejected is not None:
            row["rejected"]["value"] = rejected
    else:
        if chosen is not None:
            row["chosen"] = chosen
        if rejected is not None:
            row["rejected"] = rejected


def chosen_text(row: dict) -> str:
    if "rejected_response" in row:
        return row["messages"][-1]["content"]
    return row["chosen"]["value"] if isinstance(row["chosen"], dict) else row["chosen"]


PLANTS = {
    "identical-pair": lambda row, images: set_responses(row, rejected=chosen_text(row)),
    "near-identical-pair": lambda row, images: set_responses(row, rejected=chosen_text(row).upper()),
    "leading-space-mismatch": lambda row, images: set_responses(row, rejected=" A green triangle."),
    "empty-response": lambda row, images: set_responses(row, chosen="   "),
    "image-count-mismatch": lambda row, images: row["images"].append(row["images"][0]),
    "image-unreadable": lambda row, images: row["images"].__setitem__(0, images.pop()),
    "malformed-row": None,  # written as a broken JSON line
}


@pytest.fixture(scope="module")
def planted_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("doctor-data")
    (root / "images").mkdir()
    for index in range(DISTINCT_IMAGES):
        Image.new("RGB", (8, 8), (index % 256, index // 256, 90)).save(root / "images" / f"{index}.png")
    (root / "images" / "empty.png").write_bytes(b"")
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    broken_images = ["images/missing-1.png", "images/empty.png", "images/corrupt.png", "images/missing-2.png"]

    rng = random.Random(0)
    chosen_rows = rng.sample(range(ROWS), 4 * len(PLANTS))
    planted: dict[str, set[int]] = {}
    for offset, code in enumerate(PLANTS):
        planted[code] = set(chosen_rows[4 * offset : 4 * offset + 4])
    lines = []
    for index in range(ROWS):
        row = healthy_row(index, f"images/{index % DISTINCT_IMAGES}.png")
        code = next((code for code, rows in planted.items() if index in rows), None)
        if code == "malformed-row":
            lines.append('{"prompt": "<image>cut off mid-')
            continue
        if code is not None:
            PLANTS[code](row, broken_images)
        lines.append(row)
    return write_jsonl(root / "pairs.jsonl", lines), planted


def test_ten_thousand_pairs_in_under_a_minute_with_every_planted_defect_at_its_row(planted_dataset, capsys):
    path, planted = planted_dataset
    started = time.perf_counter()
    code, out = run_doctor(capsys, "--data", path, "--json")
    seconds = time.perf_counter() - started
    print(f"doctor: {ROWS} rows, {DISTINCT_IMAGES} images in {seconds:.1f} s")
    assert seconds < 60, "the issue's budget for 10,000 pairs with images"

    report = json.loads(out)
    assert code == 1 and report["errors"] > 0
    data = report["data"]
    assert data["rows"] == ROWS and data["distinct_images"] == DISTINCT_IMAGES + 4
    layouts = ("trl", "sharegpt", "swift", "alpaca")  # healthy_row's rotation
    expected = {name: ROWS // 4 for name in layouts}
    for row in planted["malformed-row"]:
        expected[layouts[row % 4]] -= 1
    assert data["layouts"] == expected
    found: dict[str, set[int]] = {}
    for finding in data["findings"]:
        found.setdefault(finding["code"], set()).add(finding["row"])
    # A near-identical plant upper-cases the whole answer; an identical plant makes the texts equal: one code each.
    assert found == planted


def test_the_text_report_has_a_summary_table_and_names_rows(planted_dataset, capsys):
    path, planted = planted_dataset
    code, out = run_doctor(capsys, "--data", path, "--no-progress")
    assert code == 1
    first, *_ = sorted(planted["identical-pair"])
    assert f"data: {path}: {ROWS} rows" in out
    assert any(line.split()[:3] == ["identical-pair", "error", "4"] for line in out.splitlines())
    assert f"[error] identical-pair (row {first}, field 'rejected')" in out
    assert out.rstrip().endswith("warning(s)") and "FAIL: " in out


def test_clean_data_exits_0(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "ok.jsonl", [LAYOUTS[name] for name in sorted(LAYOUTS)])
    code, out = run_doctor(capsys, "--data", path)
    assert code == 0 and "no findings" in out and out.rstrip().endswith("ok: 0 error(s), 0 warning(s)")


def test_a_missing_file_is_a_clear_error(tmp_path, capsys):
    assert main(["doctor", "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert "data file not found" in capsys.readouterr().err


# -- lengths with the model's own processor -------------------------------------------------------------------


def test_truncation_cutting_images_or_whole_responses_is_found_with_the_model(tmp_path, capsys):
    from vlm_dpo_plugins.tiny import build_tiny_llava

    model = build_tiny_llava(tmp_path / "llava")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    long_text = " ".join(["red green blue"] * 30)
    rows = [
        {"prompt": "<image>What colour?", "chosen": "Red.", "rejected": "Blue.", "images": ["a.png"]},
        {"prompt": f"{long_text} <image>", "chosen": "Red.", "rejected": "Blue.", "images": ["a.png"]},
        {"prompt": f"<image>{long_text}", "chosen": "Red.", "rejected": "Blue.", "images": ["a.png"]},
        {
            "prompt": "<image>What colour?",
            "chosen": f"{long_text} red",
            "rejected": f"{long_text} blue",
            "images": ["a.png"],
        },
    ]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    capsys.readouterr()  # what building the model printed
    code, out = run_doctor(capsys, "--data", path, "--model", model, "--max-length", 40, "--json")
    found = {(f["row"], f["code"]) for f in json.loads(out)["data"]["findings"]}
    assert found == {(1, "image-tokens-truncated"), (2, "response-truncated"), (3, "response-truncated")}
    assert code == 1
    code, out = run_doctor(capsys, "--data", path, "--model", model, "--max-length", 4096)
    assert code == 0
