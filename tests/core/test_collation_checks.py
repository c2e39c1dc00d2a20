"""Pair checks on the neutral TokenizedPair, the converters that build it, raw image checks and the config."""

from __future__ import annotations

import pytest
import torch

from vlm_dpo_plugins.collation.checks import check_example_images, check_pair
from vlm_dpo_plugins.collation.pairs import (
    BatchLayoutError,
    image_token_needs,
    pairs_from_batch,
    pairs_from_labelled_rows,
)
from vlm_dpo_plugins.collation.tokens import TokenFacts
from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.manager import create_plugin_manager
from vlm_dpo_plugins.types import Severity, SpecialTokens, TokenizedPair, TokenizedSequence

PAD, BOS, EOS, IMAGE = 0, 1, 2, 9
SPECIAL = SpecialTokens(image=IMAGE, bos=BOS, eos=EOS, pad=PAD, all=frozenset({PAD, BOS, EOS, IMAGE}))
WORDS = {10: " The", 11: " cat", 12: " dog", 13: " THE", 14: "The", 15: " ", 16: ".", 17: " CAT", 20: "Q:", 21: " A:"}
FACTS = TokenFacts(special=SPECIAL, decode=lambda ids: "".join(WORDS[token] for token in ids))


def side(prompt, response, text=None, train_prompt=False):
    return TokenizedSequence(
        input_ids=list(prompt) + list(response),
        response_mask=[int(train_prompt)] * len(prompt) + [1] * len(response),
        text=text if text is not None else FACTS.decode([t for t in response if t not in SPECIAL.all]),
    )


def pair(chosen, rejected, prompt=(BOS, 20, 21), row=7, **fields):
    return TokenizedPair(row=row, chosen=side(prompt, chosen), rejected=side(prompt, rejected), special=SPECIAL, **fields)


def codes(findings):
    return [(finding.code, finding.field) for finding in findings]


# ---------------------------------------------------------------------------
# each check
# ---------------------------------------------------------------------------


def test_a_good_pair_has_no_findings():
    assert check_pair(pair([10, 11, EOS], [10, 12, EOS])) == []


def test_token_identical_responses_name_the_row_and_ln2():
    (found,) = check_pair(pair([10, 11, EOS], [10, 11, EOS], row=11))
    assert (found.code, found.severity, found.row, found.field) == ("identical-pair", Severity.ERROR, 11, "rejected")
    assert str(found).startswith("[error] identical-pair (row 11, field 'rejected'): chosen and rejected responses")
    assert "ln 2" in found.message and found.fix


def test_responses_equal_up_to_case_or_whitespace_are_near_identical():
    assert codes(check_pair(pair([10, 11, EOS], [13, 17, EOS]))) == [("near-identical-pair", "rejected")]
    assert codes(check_pair(pair([10, 11, 16, EOS], [10, 15, 11, 16, EOS]))) == [("near-identical-pair", "rejected")]


def test_near_identity_uses_the_raw_text_when_there_is_no_decoder():
    raw = TokenizedPair(
        row=0, chosen=TokenizedSequence([20, 30, 31], [0, 1, 1], "A cat"),
        rejected=TokenizedSequence([20, 32, 33], [0, 1, 1], "a  CAT"), special=SPECIAL,
    )
    assert codes(check_pair(raw)) == [("near-identical-pair", "rejected")]


def test_whitespace_only_and_special_only_responses_are_empty():
    assert codes(check_pair(pair([10, 11, EOS], [15, EOS]))) == [("empty-response", "rejected")]
    assert codes(check_pair(pair([EOS], [10, 12, EOS]))) == [("empty-response", "chosen")]
    assert "whitespace only (' ')" in check_pair(pair([10, 11, EOS], [15, EOS]))[0].message


def test_a_mask_covering_the_whole_response_is_reported_per_side():
    masked = TokenizedSequence([BOS, 20, 10, 12, EOS], [0, 0, 0, 0, 0])
    findings = check_pair(TokenizedPair(row=3, chosen=side([BOS, 20], [10, 11, EOS]), rejected=masked, special=SPECIAL))
    assert codes(findings) == [("response-masked", "rejected")]
    assert "mask is 0 on all 5 tokens" in findings[0].message


def test_a_response_truncated_away_at_max_length_is_truncation_not_masking():
    cut = TokenizedSequence([BOS, 20, 20, 20], [0, 0, 0, 0])
    findings = check_pair(
        TokenizedPair(row=3, chosen=side([BOS, 20], [10, 11]), rejected=cut, special=SPECIAL, max_length=4)
    )
    assert codes(findings) == [("response-truncated", "rejected")]


def test_identical_prefixes_left_by_truncation_are_reported_as_truncation():
    findings = check_pair(pair([10, 11], [10, 11], max_length=5))
    assert codes(findings) == [("response-truncated", "rejected")] and "max_length=5" in findings[0].message


def test_a_mask_that_trains_the_prompt_too():
    unmasked = side([BOS, 20, 21], [10, 12, EOS], train_prompt=True)
    findings = check_pair(TokenizedPair(row=1, chosen=side([BOS, 20, 21], [10, 11, EOS]), rejected=unmasked, special=SPECIAL))
    assert codes(findings) == [("prompt-unmasked", "rejected")]
    assert "6 of 6 tokens are trained" in findings[0].message


def test_prompts_that_differ_between_the_sides_are_named_with_where_they_part():
    # A template that drops a thinking block from the conversation for one response only: one token more.
    rewritten = TokenizedPair(
        row=4, chosen=side([BOS, 20, 21, 22], [10, 11, EOS]), rejected=side([BOS, 20, 21], [12, 11, EOS]),
        special=SPECIAL,
    )
    findings = check_pair(rewritten)
    assert codes(findings) == [("prompt-mismatch", "prompt")]
    assert findings[0].row == 4 and findings[0].severity is Severity.ERROR
    assert "(4 and 3 tokens, first different at token 3)" in findings[0].message
    assert check_pair(pair([10, 11, EOS], [12, 11, EOS])) == []  # the same prompt on both sides


def test_prompts_are_not_compared_where_a_side_trains_its_prompt():
    unmasked = side([BOS, 20], [12, EOS], train_prompt=True)
    findings = check_pair(TokenizedPair(row=1, chosen=side([BOS, 20, 21], [10, 11, EOS]), rejected=unmasked, special=SPECIAL))
    assert codes(findings) == [("prompt-unmasked", "rejected")]


def test_leading_space_on_one_side_only():
    findings = check_pair(pair([10, 11, EOS], [14, 12, EOS]))
    assert codes(findings) == [("leading-space-mismatch", "rejected")]
    assert "the chosen response starts with whitespace and the rejected does not" in findings[0].message


def test_bos_after_the_start_and_eos_twice_in_the_response():
    doubled_bos = TokenizedPair(
        row=2, chosen=side([BOS, BOS, 20, 21], [10, 11, EOS]), rejected=side([BOS, 20, 21], [BOS, 10, 12, EOS]),
        special=SPECIAL,
    )
    findings = check_pair(doubled_bos)
    # The doubled BOS also makes the two prompts differ.
    assert codes(findings) == [
        ("special-token-misplaced", "chosen"),
        ("special-token-misplaced", "rejected"),
        ("prompt-mismatch", "prompt"),
    ]
    assert "BOS token at position 1 (in the prompt)" in findings[0].message
    assert "BOS token at position 3 (in the response)" in findings[1].message
    assert codes(check_pair(pair([10, 11, EOS, EOS], [10, 12, EOS]))) == [("special-token-misplaced", "chosen")]


def test_a_bos_after_leading_image_tokens_is_at_the_start():
    # PaliGemma writes <image> x N, then <bos> and the prompt; a second BOS after that is still misplaced.
    paligemma = pair([10, 11, EOS], [10, 12, EOS], prompt=(IMAGE, IMAGE, BOS, 20, 21), num_images=1)
    assert codes(check_pair(paligemma)) == []
    doubled = pair([10, 11, EOS], [10, 12, EOS], prompt=(IMAGE, IMAGE, BOS, BOS, 20), num_images=1)
    misplaced = [("special-token-misplaced", "chosen"), ("special-token-misplaced", "rejected")]
    assert codes(check_pair(doubled)) == misplaced


def test_a_bos_that_doubles_as_eos_or_pad_is_not_misplaced():
    shared = SpecialTokens(image=IMAGE, bos=EOS, eos=EOS, pad=PAD, all=SPECIAL.all)
    ok = TokenizedPair(row=0, chosen=side([EOS, 20], [10, 11, EOS]), rejected=side([EOS, 20], [10, 12, EOS]), special=shared)
    assert check_pair(ok) == []


IMAGE_PROMPT = (BOS, IMAGE, IMAGE, IMAGE, IMAGE, 20, 21)


def test_image_tokens_matching_the_images_pass_and_adjacent_images_may_share_a_run():
    assert check_pair(pair([10, 11], [10, 12], prompt=IMAGE_PROMPT, num_images=1, image_tokens=(4,))) == []
    assert check_pair(pair([10, 11], [10, 12], prompt=IMAGE_PROMPT, num_images=2, image_tokens=(2, 2))) == []


def test_image_placeholders_that_do_not_match_the_images():
    one_run = pair([10, 11], [10, 12], prompt=IMAGE_PROMPT, num_images=2, image_tokens=(4, 4))
    findings = check_pair(one_run)
    assert codes(findings) == [("image-count-mismatch", "chosen"), ("image-count-mismatch", "rejected")]
    assert "1 image placeholder run(s) with 4 image tokens, but the row has 2 image(s) needing 8" in findings[0].message
    # Without per-image counts one run may hold two adjacent images (LLaMA-Factory writes "<image><image>" for
    # LLaVA-NeXT's anyres images); images with no image token, or image tokens with no image, are certain.
    assert check_pair(pair([10, 11], [10, 12], prompt=IMAGE_PROMPT, num_images=2)) == []
    assert check_pair(pair([10, 11], [10, 12], prompt=IMAGE_PROMPT, num_images=1)) == []
    assert codes(check_pair(pair([10, 11], [10, 12], prompt=IMAGE_PROMPT, num_images=0)))[0][0] == "image-count-mismatch"
    no_tokens = pair([10, 11], [10, 12], prompt=(BOS, 20, 21), num_images=1)
    assert codes(check_pair(no_tokens))[0][0] == "image-count-mismatch"


def test_a_prompt_cut_inside_its_image_tokens_names_the_crash_and_the_length_needed():
    cut = TokenizedSequence([BOS, 20, IMAGE, IMAGE], [0, 0, 0, 0])
    truncated = TokenizedPair(row=5, chosen=cut, rejected=cut, special=SPECIAL, num_images=1, image_tokens=(16,), max_length=4)
    findings = check_pair(truncated)
    # One finding per side names the cause; the response that went with it is not reported separately.
    assert codes(findings) == [("image-tokens-truncated", "chosen"), ("image-tokens-truncated", "rejected")]
    assert "2 image tokens remain; its 1 image(s) need 16" in findings[0].message
    assert "Image features and image tokens do not match" in findings[0].message
    assert "raise max_length above 18" in findings[0].fix
    # Without a count or max_length, a sequence ending inside an image is still a cut.
    unknown = TokenizedPair(row=5, chosen=cut, rejected=cut, special=SPECIAL)
    assert codes(check_pair(unknown))[0][0] == "image-tokens-truncated"


# ---------------------------------------------------------------------------
# converters
# ---------------------------------------------------------------------------


def test_trl_and_labels_batches_give_the_same_pairs_whatever_the_padding_side():
    # Two pairs; prompt [BOS, 20], responses of different lengths.
    chosen = [[BOS, 20, 10, 11, EOS], [BOS, 20, 10, EOS]]
    rejected = [[BOS, 20, 10, 12, EOS], [BOS, 20, 13, 17, 16, EOS]]
    rows = chosen + rejected
    width = 6

    def right(row):
        return row + [PAD] * (width - len(row))

    def left(row):
        return [PAD] * (width - len(row)) + row

    trl_batch = {
        "input_ids": torch.tensor([right(r) for r in rows]),
        "attention_mask": torch.tensor([right([1] * len(r)) for r in rows]),
        "completion_mask": torch.tensor([right([0, 0] + [1] * (len(r) - 2)) for r in rows]),
    }
    labels_batch = {
        "input_ids": [left(r) for r in rows],
        "attention_mask": [left([1] * len(r)) for r in rows],
        "labels": [left([-100, -100] + r[2:]) for r in rows],
    }
    from_trl = pairs_from_batch(trl_batch, [40, 41], FACTS)
    from_labels = pairs_from_batch(labels_batch, [40, 41], FACTS)
    assert from_trl == from_labels
    assert [p.row for p in from_trl] == [40, 41]
    assert from_trl[1].rejected.input_ids == [BOS, 20, 13, 17, 16, EOS]
    assert from_trl[1].rejected.response_mask == [0, 0, 1, 1, 1, 1]
    assert from_trl[1].rejected.text == " THE CAT."


def test_a_batch_the_converters_do_not_know_is_a_layout_error():
    with pytest.raises(BatchLayoutError, match="neither 'completion_mask' nor 'labels'"):
        pairs_from_batch({"input_ids": [[1, 2]], "attention_mask": [[1, 1]]}, [0])
    with pytest.raises(BatchLayoutError, match="3 rows for 2 pairs"):
        pairs_from_batch({"input_ids": [[1]] * 3, "labels": [[1]] * 3}, [0, 1])


def test_image_token_needs_from_the_grid_and_from_a_fixed_count():
    # Pair 0 has one 4x4-patch image, pair 1 two images (4x4 and 8x8); rejected rows repeat them.
    grid = torch.tensor([[1, 4, 4], [1, 4, 4], [1, 8, 8]] * 2)
    qwen = TokenFacts(special=SPECIAL, merge_size=2)
    assert image_token_needs({"image_grid_thw": grid}, [1, 2], qwen, 2) == [(4,), (4, 16)]
    assert image_token_needs({"image_grid_thw": grid[:3]}, [1, 2], qwen, 2) == [None, None]  # not 2x: unknown
    llava = TokenFacts(special=SPECIAL, tokens_per_image=576)
    assert image_token_needs({}, [1, 2], llava, 2) == [(576,), (576, 576)]
    assert image_token_needs({}, None, llava, 2) == [None, None]


def test_llamafactory_style_rows_with_minus_100_labels():
    row = {
        "chosen_input_ids": [BOS, IMAGE, IMAGE, 20, 10, 11, EOS], "chosen_labels": [-100] * 4 + [10, 11, EOS],
        "rejected_input_ids": [BOS, IMAGE, IMAGE, 20, 10, 11, EOS], "rejected_labels": [-100] * 4 + [10, 11, EOS],
        "chosen_attention_mask": [1] * 7, "images": ["a.png"],
    }
    facts = TokenFacts(special=SPECIAL, decode=FACTS.decode, tokens_per_image=2)
    (converted,) = pairs_from_labelled_rows([row], [12], facts)
    assert (converted.num_images, converted.image_tokens) == (1, (2,))
    assert codes(check_pair(converted)) == [("identical-pair", "rejected")]


def test_token_facts_are_read_from_a_processor_without_importing_a_framework():
    from types import SimpleNamespace

    tokenizer = SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=0, all_special_ids=[0, 1, 2],
                                decode=lambda ids: "x" * len(ids))
    processor = SimpleNamespace(tokenizer=tokenizer, image_token_id=9, image_processor=SimpleNamespace(merge_size=2))
    facts = TokenFacts.from_processor(processor)
    assert facts.special == SpecialTokens(image=9, bos=1, eos=2, pad=0, all=frozenset({0, 1, 2, 9}))
    assert (facts.merge_size, facts.tokens_per_image, facts.decode([5, 6])) == (2, None, "xx")


def test_the_processor_is_found_behind_a_partial_of_a_bound_collator():
    """ms-swift's trainer holds ``partial(template.data_collator, padding_to=None)``: the template is two layers in."""
    import functools
    from types import SimpleNamespace

    from vlm_dpo_plugins.collation.tokens import collator_max_length, find_processor

    class Template:
        processor = SimpleNamespace(tokenizer=SimpleNamespace(bos_token_id=1), image_token_id=9)
        max_length = 256

        def data_collator(self, batch, *, padding_to=None):
            return batch

    template = Template()
    for collate in (functools.partial(template.data_collator, padding_to=None), template.data_collator, template):
        assert find_processor(collate) is Template.processor and collator_max_length(collate) == 256
    assert find_processor(functools.partial(print)) is None and find_processor(len) is None  # builtins: no owner


def test_an_image_count_beside_an_encoded_row_is_counted_and_never_reaches_the_collator():
    from vlm_dpo_plugins.collation.flow import prepare
    from vlm_dpo_plugins.collation.pairs import IMAGE_COUNT_KEY, count_images

    encoded = {"chosen_input_ids": [BOS, IMAGE, 10], IMAGE_COUNT_KEY: 2, "row_index": 7}
    assert count_images(encoded) == 2
    assert count_images({"chosen_input_ids": [BOS]}) is None
    assert prepare([encoded], [0], "row_index") == [{"chosen_input_ids": [BOS, IMAGE, 10]}]
    row = {
        "chosen_input_ids": [BOS, IMAGE, IMAGE, 20, 10, EOS], "chosen_labels": [-100] * 4 + [10, EOS],
        "rejected_input_ids": [BOS, IMAGE, IMAGE, 20, 12, EOS], "rejected_labels": [-100] * 4 + [12, EOS],
        IMAGE_COUNT_KEY: 0,  # the row had no image, yet its prompt holds image tokens
    }
    (pair,) = pairs_from_labelled_rows([row], [3], FACTS)
    assert ("image-count-mismatch", "chosen") in codes(check_pair(pair))


# ---------------------------------------------------------------------------
# raw rows: images
# ---------------------------------------------------------------------------


def test_missing_and_unreadable_images_name_the_row_and_the_entry(tmp_path):
    from PIL import Image

    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8)).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:20])
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    row = {"images": [str(good), str(tmp_path / "gone.png"), str(broken), {"bytes": not_image.read_bytes()}, None]}
    findings = check_example_images(row, row=4)
    assert [(f.code, f.row, f.field) for f in findings] == [
        ("image-unreadable", 4, "images[1]"), ("image-unreadable", 4, "images[2]"),
        ("image-unreadable", 4, "images[3]"), ("image-unreadable", 4, "images[4]"),
    ]
    assert "gone.png' does not exist" in findings[0].message
    assert "cannot be read as an image" in findings[1].message and "cannot be read as an image" in findings[2].message
    assert findings[3].message == "the image is None"
    assert check_example_images({"image": Image.new("RGB", (4, 4))}, row=0) == []
    assert check_example_images({"image": str(broken)}, row=0, verify=False) == []  # existence only


# ---------------------------------------------------------------------------
# config and the pair-check hook
# ---------------------------------------------------------------------------


def test_policies_are_validated_with_the_nearest_check_name():
    with pytest.raises(ConfigError, match=r"'collation.policy.identical-pairs' is not a check; .*did you mean 'identical-pair'"):
        _load({"collation": {"policy": {"identical-pairs": "skip"}}})
    with pytest.raises(ConfigError, match=r"'collation.policy.identical-pair' is 'drop'; expected one of"):
        _load({"collation": {"policy": {"identical-pair": "drop"}}})
    config = _load({"collation": {"policy": {"identical-pair": "warn"}, "default_policy": "skip"}})
    assert config.collation.policy_for("identical-pair") == "warn"
    assert config.collation.policy_for("near-identical-pair") == "skip"
    assert _load({}).collation.policy_for("near-identical-pair") == "warn"


def test_the_builtin_answers_the_pair_hook_and_can_be_switched_off():
    manager = create_plugin_manager(load_entry_points=False)
    identical = pair([10, 11, EOS], [10, 11, EOS])
    assert [f.code for batch in manager.hook.vlm_dpo_check_pair(pair=identical) for f in batch] == ["identical-pair"]
    manager.hook.vlm_dpo_configure(config=manager.load_config({"collation": {"enabled": False}}))
    assert [f for batch in manager.hook.vlm_dpo_check_pair(pair=identical) for f in batch] == []


def _load(data):
    return create_plugin_manager(load_entry_points=False).load_config(data)


def test_the_image_token_is_the_one_the_model_fills_with_features():
    from types import SimpleNamespace

    tokenizer = SimpleNamespace(bos_token_id=2, eos_token_id=1, pad_token_id=0, all_special_ids=[0, 1, 2])
    # Gemma 3's processor from transformers 5.7 on: image_token_id is <start_of_image>, written once per image;
    # image_token_ids names the soft token the model replaces, image_seq_length of them per image.
    gemma3 = SimpleNamespace(tokenizer=tokenizer, image_token_id=6, image_token_ids=[8])
    assert TokenFacts.from_processor(gemma3).special.image == 8
    # Pixtral-style lists add break and end ids that take no feature: the image_token_id stays the one counted.
    pixtral = SimpleNamespace(tokenizer=tokenizer, image_token_id=10, image_token_ids=[10, 11, 12])
    assert TokenFacts.from_processor(pixtral).special.image == 10
    assert TokenFacts.from_processor(SimpleNamespace(tokenizer=tokenizer, image_token_id=5)).special.image == 5
