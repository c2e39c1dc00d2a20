"""Packing a preference batch into one row per pair, and lending image features between passes (torch only)."""

from __future__ import annotations

import pytest
import torch

from vlm_dpo_plugins.sharing.features import ImageFeatureSharing, ReferenceFeatureReuse
from vlm_dpo_plugins.sharing.images import chosen_half_of_images
from vlm_dpo_plugins.sharing.packing import CHOSEN, IGNORE_INDEX, REJECTED, SHARED, PackingUnavailable, pack_pairs

PAD = 0


def collated(pairs):
    """2B right-padded rows from (prompt, chosen, rejected) token lists, as the frameworks collate them."""
    rows = [prompt + chosen for prompt, chosen, _ in pairs] + [prompt + rejected for prompt, _, rejected in pairs]
    prompt_lengths = [len(prompt) for prompt, _, _ in pairs] * 2
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([row + [PAD] * (width - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    response_mask = torch.zeros_like(attention_mask)
    for index, (row, start) in enumerate(zip(rows, prompt_lengths)):
        response_mask[index, start : len(row)] = 1
    return input_ids, attention_mask, response_mask


PAIRS = [
    ([11, 12, 13], [21, 22], [31, 32, 33, 34]),
    ([14, 15, 16, 17, 18], [23], [35, 36]),
]


def test_packed_rows_hold_the_prompt_once_then_both_responses():
    input_ids, attention_mask, response_mask = collated(PAIRS)
    packed = pack_pairs(input_ids, attention_mask, response_mask)
    ids = packed.gather(input_ids)

    # The rejected branch opens with a copy of the last prompt token at that token's position.
    assert ids[0].tolist() == [11, 12, 13, 21, 22, 13, 31, 32, 33, 34]
    assert ids[1].tolist() == [14, 15, 16, 17, 18, 23, 18, 35, 36, PAD]
    assert packed.positions[0].tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 5, 6]
    assert packed.positions[1].tolist()[:9] == [0, 1, 2, 3, 4, 5, 4, 5, 6]
    S, C, R = SHARED, CHOSEN, REJECTED
    assert packed.side[0].tolist() == [S, S, C, C, C, R, R, R, R, R]
    assert packed.side[1].tolist() == [S, S, S, S, C, C, R, R, R, -1]
    labels = packed.labels(input_ids)
    assert labels[0].tolist() == [IGNORE_INDEX] * 3 + [21, 22, IGNORE_INDEX, 31, 32, 33, 34]
    assert labels[1].tolist() == [IGNORE_INDEX] * 5 + [23, IGNORE_INDEX, 35, 36, IGNORE_INDEX]


def test_each_branch_sees_the_shared_prompt_and_itself_never_the_other():
    input_ids, attention_mask, response_mask = collated(PAIRS)
    packed = pack_pairs(input_ids, attention_mask, response_mask)
    visible = packed.visible()[:, 0]
    side = packed.side
    for pair in range(2):
        for query in range(packed.length):
            for key in range(packed.length):
                if side[pair, query] < 0:
                    expected = key == query
                else:
                    same_side = side[pair, key] in (SHARED, side[pair, query])
                    expected = key <= query and side[pair, key] >= 0 and same_side
                assert bool(visible[pair, query, key]) == expected, (pair, query, key)
    bias = packed.attention_bias(torch.float32)
    assert torch.equal(bias == 0, packed.visible())
    assert bias.min() == torch.finfo(torch.float32).min


def test_unpack_puts_each_scored_token_back_where_the_collated_rows_score_it():
    input_ids, attention_mask, response_mask = collated(PAIRS)
    packed = pack_pairs(input_ids, attention_mask, response_mask)
    # A per-token output that names the token each position predicts: position t scores token t + 1.
    packed_ids = packed.labels(input_ids)
    per_token = packed_ids[:, 1:].float()
    collated_view = packed.unpack(per_token)
    expected = torch.where(response_mask[:, 1:].bool(), input_ids[:, 1:], 0).float()
    assert torch.equal(collated_view, expected)


def test_left_padded_rows_pack_from_their_attended_tokens():
    input_ids, attention_mask, response_mask = collated(PAIRS)
    # Shift every row right by two pad columns: only the attended tokens matter.
    pad = torch.zeros(input_ids.shape[0], 2, dtype=torch.long)
    left = pack_pairs(
        torch.cat((pad, input_ids), 1), torch.cat((pad, attention_mask), 1), torch.cat((pad, response_mask), 1)
    )
    right = pack_pairs(input_ids, attention_mask, response_mask)
    assert torch.equal(left.gather(torch.cat((pad, input_ids), 1)), right.gather(input_ids))
    assert torch.equal(left.side, right.side)


def test_a_pair_whose_rows_start_differently_is_not_packed():
    input_ids, attention_mask, response_mask = collated(PAIRS)
    input_ids[3, 1] = 99  # the rejected row of pair 1 carries another prompt
    with pytest.raises(PackingUnavailable, match=r"pair 1: the chosen row \(1\) and the rejected row \(3\)"):
        pack_pairs(input_ids, attention_mask, response_mask)


def test_a_row_without_response_tokens_is_not_packed():
    input_ids, attention_mask, response_mask = collated(PAIRS)
    response_mask[2] = 0
    with pytest.raises(PackingUnavailable, match="row 2 has no response token"):
        pack_pairs(input_ids, attention_mask, response_mask)


def test_images_are_halved_only_when_the_rejected_rows_repeat_them():
    pixels = torch.randn(2, 3, 4, 4)
    batch = {
        "input_ids": torch.ones(4, 5),
        "pixel_values": torch.cat((pixels, pixels)),
        "image_sizes": torch.ones(4, 2),
    }
    halves = chosen_half_of_images(batch)
    assert torch.equal(halves["pixel_values"], pixels) and halves["image_sizes"].shape == (2, 2)
    batch["pixel_values"] = torch.cat((pixels, pixels + 1))
    with pytest.raises(PackingUnavailable, match=r"batch\['pixel_values'\] is not the chosen rows' images repeated"):
        chosen_half_of_images(batch)


class Encoder(torch.nn.Module):
    """Stands in for a VLM: ``forward`` calls its own ``get_image_features``, as transformers' models do."""

    def __init__(self):
        super().__init__()
        self.vision = torch.nn.Linear(3, 2)
        self.calls = []

    def get_image_features(self, pixel_values, image_grid_thw=None):
        self.calls.append(pixel_values.shape[0])
        return list(self.vision(pixel_values))

    def forward(self, pixel_values, image_grid_thw=None):
        return torch.stack(self.get_image_features(pixel_values, image_grid_thw=image_grid_thw))


class Wrapper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = Encoder()

    def get_image_features(self, pixel_values):
        return self.model.get_image_features(pixel_values)

    def forward(self, pixel_values, image_grid_thw=None):
        return self.model(pixel_values, image_grid_thw=image_grid_thw)


def test_duplicated_images_are_encoded_once_and_their_features_repeated():
    model = Wrapper()
    pixels = torch.randn(2, 3)
    duplicated = torch.cat((pixels, pixels))
    sharing = ImageFeatureSharing(model)
    assert sharing.modules == [(model.model, "get_image_features")]  # the innermost, whose forward calls it
    with sharing.encode_chosen_half():
        out = model(duplicated, image_grid_thw=torch.ones(4, 3))
    assert model.model.calls == [2]
    assert torch.equal(out, model(duplicated))
    assert "get_image_features" not in model.model.__dict__


def test_recorded_features_are_replayed_without_encoding_even_when_wraps_nest():
    policy, reference = Wrapper(), Wrapper()
    reference.load_state_dict(policy.state_dict())
    pixels = torch.randn(2, 3)
    duplicated = torch.cat((pixels, pixels))
    sharing = ImageFeatureSharing(policy)
    with sharing.encode_chosen_half(), sharing.record():
        expected = policy(duplicated)
    with sharing.replay(ImageFeatureSharing(reference)):
        got = reference(duplicated)
    assert torch.equal(got, expected)
    assert policy.model.calls == [2] and reference.model.calls == []
    assert "get_image_features" not in policy.model.__dict__ and "get_image_features" not in reference.model.__dict__
    with pytest.raises(RuntimeError, match="more image features than the policy pass computed"), sharing.replay():
        policy(duplicated)


def test_the_reference_reuses_features_only_while_its_vision_weights_are_the_policys_and_frozen():
    groups = {"vision": ["model.vision.weight", "model.vision.bias"], "language": []}
    policy, reference = Wrapper(), Wrapper()
    for parameter in policy.parameters():
        parameter.requires_grad_(False)
    assert not ReferenceFeatureReuse(policy, reference, groups).allowed()  # different random weights
    reference.load_state_dict(policy.state_dict())
    assert ReferenceFeatureReuse(policy, reference, groups).allowed()
    reuse = ReferenceFeatureReuse(policy, None, groups)
    assert reuse.allowed()
    policy.model.vision.weight.requires_grad_(True)
    assert not reuse.allowed()
    policy.model.vision.weight.requires_grad_(False)
    assert not reuse.allowed()  # once the vision side trained, never again
    lora_groups = {"vision": [*groups["vision"], "model.vision.lora_A.default.weight"]}
    assert not ReferenceFeatureReuse(policy, None, lora_groups).allowed()


def test_collator_positions_pack_as_they_are_and_per_row_values_keep_the_chosen_rows():
    from vlm_dpo_plugins.sharing.forward import PairSharing
    from vlm_dpo_plugins.sharing.settings import SharingConfig

    input_ids, attention_mask, response_mask = collated(PAIRS)
    rows, length = input_ids.shape
    # mrope positions as LLaMA-Factory and ms-swift collate them: [3, rows, length], a distinct value per cell.
    position_ids = torch.arange(3 * rows * length).view(3, rows, length)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "rope_deltas": torch.arange(rows)[:, None],
        "loss_scale": torch.ones(rows, length),  # a framework's own per-token extra
    }
    sharing = PairSharing(torch.nn.Linear(1, 1), SharingConfig())
    prepared = sharing.prepare(batch, None, response_mask)
    packed = prepared.packed
    assert packed is not None
    expected = position_ids[:, packed.source_row, packed.source_column].masked_fill(~packed.token_mask[None], 0)
    assert torch.equal(prepared.kwargs["position_ids"], expected)
    assert prepared.kwargs["rope_deltas"].tolist() == [[0], [1]]
    assert prepared.kwargs["loss_scale"].shape == packed.side.shape
    assert prepared.kwargs["attention_mask"].dtype == torch.float32  # eager (no config): the additive form


def test_log_probs_and_logit_means_per_collated_row_from_packed_logits():
    from vlm_dpo_plugins.losses.logprobs import sequence_logps
    from vlm_dpo_plugins.sharing.forward import PreparedBatch
    from vlm_dpo_plugins.sharing.logits import collated_sequence_logps, response_logit_means, row_logit_means

    input_ids, attention_mask, response_mask = collated(PAIRS)
    labels = input_ids.masked_fill(response_mask == 0, IGNORE_INDEX)
    packed = pack_pairs(input_ids, attention_mask, response_mask)
    # Logits that depend only on the token at a position: the same in both layouts (a real model's depend on what
    # the mask lets it see, which the end-to-end tests cover).
    vocab = 40
    table = torch.randn(vocab, vocab)

    def logits_of(ids):
        return table[ids]

    prepared = PreparedBatch({}, packed.labels(labels), packed=packed, encode_chosen_half=False)
    got = collated_sequence_logps(logits_of(packed.gather(input_ids)), prepared.labels, prepared)
    expected = sequence_logps(logits_of(input_ids), labels, labels != IGNORE_INDEX)
    torch.testing.assert_close(got.logps, expected.logps, rtol=0, atol=1e-5)
    assert torch.equal(got.token_counts, expected.token_counts)

    packed_logits, collated_logits = logits_of(packed.gather(input_ids)), logits_of(input_ids)
    unpacked = PreparedBatch({}, labels, packed=None, encode_chosen_half=False)
    for mine, theirs in zip(
        response_logit_means(packed_logits, prepared.labels, prepared, 2),
        response_logit_means(collated_logits, labels, unpacked, 2),
    ):
        torch.testing.assert_close(mine, theirs)
    # ms-swift's own formula: labels rolled one left, each masked position's mean logit, pooled over the side.
    rolled = torch.roll(labels, shifts=-1, dims=1)
    means = collated_logits.mean(-1)
    swift_chosen = means[:2][rolled[:2] != IGNORE_INDEX].mean()
    swift_rejected = means[2:][rolled[2:] != IGNORE_INDEX].mean()
    torch.testing.assert_close(torch.stack(response_logit_means(collated_logits, labels, unpacked, 2)),
                               torch.stack([swift_chosen, swift_rejected]))
    # Row means cover each row's own tokens; padding is left out.
    chosen, rejected = row_logit_means(packed_logits, prepared, 2)
    chosen_rows = collated_logits[:2][attention_mask[:2].bool()]
    torch.testing.assert_close(chosen, chosen_rows.mean())
    rejected_rows = collated_logits[2:][attention_mask[2:].bool()]
    torch.testing.assert_close(rejected, rejected_rows.mean())


def test_unpacked_batches_are_reported_once_and_counted(caplog):
    import logging

    from vlm_dpo_plugins.sharing.forward import PairSharing
    from vlm_dpo_plugins.sharing.settings import SharingConfig

    input_ids, attention_mask, response_mask = collated(PAIRS)
    sharing = PairSharing(torch.nn.Linear(1, 1), SharingConfig())
    with caplog.at_level(logging.WARNING, logger="vlm_dpo_plugins.sharing"):
        for row in (2, 3):
            mask = response_mask.clone()
            mask[row] = 0
            prepared = sharing.prepare({"input_ids": input_ids, "attention_mask": attention_mask}, None, mask)
            assert prepared.packed is None
    assert sharing.unpacked_batches == 2
    [record] = caplog.records
    assert "this batch runs unpacked: row 2 has no response token" in record.getMessage()


def test_image_blocks_attend_both_ways_inside_the_prompt_and_nothing_else_changes():
    from vlm_dpo_plugins.sharing.attention_patterns import image_blocks

    # Pair 0's prompt [11, 12, 13]: 11 and 12 one image's soft tokens (Gemma 3 marks them 1 in token_type_ids).
    input_ids, attention_mask, response_mask = collated(PAIRS)
    packed = pack_pairs(input_ids, attention_mask, response_mask)
    token_types = torch.zeros_like(packed.side)
    token_types[0, :2] = 1
    token_types[1, [0, 2, 3]] = 1  # two images in pair 1's prompt: [14] and [16, 17]
    blocks = image_blocks(token_types)
    assert blocks.tolist() == [[0, 0] + [-1] * 8, [0, -1, 1, 1] + [-1] * 6]
    plain, with_blocks = packed.visible()[:, 0], packed.visible(blocks)[:, 0]
    assert with_blocks[0, 0, 1] and not plain[0, 0, 1]  # the first soft token sees the second
    assert with_blocks[1, 2, 3] and not with_blocks[1, 0, 2]  # within an image, never a later image
    changed = (with_blocks != plain).nonzero().tolist()
    assert changed == [[0, 0, 1], [1, 2, 3]]


class DirectVisionCall(torch.nn.Module):
    """A model that calls its vision model itself, with no ``get_image_features`` (Mllama's layout)."""

    def __init__(self):
        super().__init__()
        self.vision_model = torch.nn.Sequential(torch.nn.Linear(3, 2))

    def forward(self, pixel_values):
        return self.vision_model(pixel_values)


def test_without_get_image_features_the_vision_model_called_directly_is_shared():
    model = DirectVisionCall()
    pixels = torch.randn(2, 3)
    sharing = ImageFeatureSharing(model)
    assert sharing.modules == [(model.vision_model, "forward")]
    with sharing.record():
        recorded = model(pixels)
    calls = []
    model.vision_model[0].register_forward_pre_hook(lambda module, args: calls.append(args))  # the encoder's work
    with sharing.replay():
        replayed = model(pixels)
    assert calls == [] and torch.equal(replayed, recorded)
    assert "forward" not in model.vision_model.__dict__
