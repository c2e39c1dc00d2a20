"""The precomputed reference's keys and file: a pair is known by its content, a file by its reference."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from PIL import Image

from vlm_dpo_plugins.config_source import load_plugin_config
from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.manager import create_plugin_manager
from vlm_dpo_plugins.sharing.reference_cache import (
    KEYS_KEY,
    REFERENCE_KEY,
    ReferenceAttach,
    ReferenceCache,
    example_key,
    take_attached,
)


def example(colour=(10, 20, 30), answer="A red circle.", **extra):
    return {
        "images": [Image.new("RGB", (8, 8), colour)],
        "prompt_ids": [1, 2, 3],
        "chosen": answer,
        "pixel_values": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
        **extra,
    }


def test_a_pair_is_known_by_every_field_and_by_its_pixels():
    key = example_key(example())
    assert key == example_key(example())
    assert key != example_key(example(colour=(10, 20, 31)))  # one pixel value, nothing else
    assert key != example_key(example(answer="A red square."))
    assert key != example_key({**example(), "prompt_ids": [1, 2, 4]})
    changed = example()
    changed["pixel_values"][1, 2] += 1
    assert key != example_key(changed)
    assert example_key({"a": 1, "b": 2}) == example_key({"b": 2, "a": 1})  # field order is not content


def test_an_image_named_by_its_path_is_known_by_the_files_bytes(tmp_path):
    path = tmp_path / "image.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
    before = example_key({"images": [str(path)]})
    Image.new("RGB", (8, 8), (1, 2, 4)).save(path)
    assert example_key({"images": [str(path)]}) != before


def test_a_field_without_content_to_hash_names_the_row_and_field():
    with pytest.raises(ConfigError, match=r"row 7's field 'meta.handle' .* holds a object, which has no content"):
        example_key({"meta": {"handle": object()}}, row=7)


def test_the_file_keeps_the_pairs_of_its_reference_and_sets_aside_anything_else(tmp_path, caplog):
    cache = ReferenceCache(tmp_path, "f" * 64)
    assert cache.add(["a", "b"], torch.tensor([-1.5, -2.25, -3.0, -4.125]), torch.tensor([3, 4, 5, 6])) == ["a", "b"]
    assert cache.add(["a"], torch.tensor([-9.0, -9.0]), torch.tensor([1, 1])) == []  # known pairs are kept as they are
    cache.save(["a", "b", "c"])
    again = ReferenceCache(tmp_path, "f" * 64)
    assert again.load() == 2
    assert again.entries == {"a": (-1.5, -3.0, 3, 5), "b": (-2.25, -4.125, 4, 6)}
    assert ReferenceCache(tmp_path, "e" * 64).load() == 0  # another reference: another file
    stored = json.loads(cache.path.read_text())
    stored["fingerprint"] = "e" * 64
    cache.path.write_text(json.dumps(stored))
    with caplog.at_level(logging.WARNING, logger="vlm_dpo_plugins.sharing"):
        assert ReferenceCache(tmp_path, "f" * 64).load() == 0
    cache.path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="vlm_dpo_plugins.sharing"):
        assert ReferenceCache(tmp_path, "f" * 64).load() == 0
    assert [r.getMessage().endswith("it is computed again") for r in caplog.records] == [True, True]


def test_a_non_finite_reference_is_an_error_not_an_entry(tmp_path):
    cache = ReferenceCache(tmp_path, "f" * 64)
    with pytest.raises(ConfigError, match="log-prob of a training pair is not finite"):
        cache.add(["a"], torch.tensor([float("nan"), -1.0]), torch.tensor([1, 1]))
    assert cache.entries == {}


def test_a_batch_carries_its_reference_only_when_every_pair_is_cached(tmp_path):
    attach = ReferenceAttach(lambda examples: {"input_ids": torch.zeros(2 * len(examples), 3)})
    first, second = example(), example(colour=(0, 0, 0))
    assert REFERENCE_KEY not in attach([first, second])  # no cache yet: a live run's collator, untouched
    attach.cache = ReferenceCache(tmp_path, "f" * 64)
    attach.cache.add([example_key(first)], torch.tensor([-1.0, -2.0]), torch.tensor([3, 4]))
    assert REFERENCE_KEY not in attach([first, second])
    attach.carry_keys = True
    batch = attach([first])
    assert batch[KEYS_KEY] == [example_key(first)]
    assert take_attached(batch).tolist() == [[-1.0, 3.0], [-2.0, 4.0]]  # chosen row, then rejected row
    assert REFERENCE_KEY not in batch


def test_the_sharing_section_names_a_bad_reference_setting():
    plugins = create_plugin_manager(load_entry_points=False)
    config, _ = load_plugin_config(plugins, {"sharing": {"reference": "precompute", "reference_cache": "/tmp/x"}})
    assert (config.sharing.reference, config.sharing.reference_cache) == ("precompute", "/tmp/x")
    expected = r"'sharing.reference' is 'precomputed'; expected one of \['live', 'precompute'\]; did you mean"
    with pytest.raises(ConfigError, match=expected):
        load_plugin_config(plugins, {"sharing": {"reference": "precomputed"}})
    with pytest.raises(ConfigError, match=r"'sharing.reference_cache' is ''; expected a folder path"):
        load_plugin_config(plugins, {"sharing": {"reference_cache": ""}})
