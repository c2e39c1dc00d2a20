"""Converters from what each framework builds to the neutral ``TokenizedPair``.

Two layouts cover the three frameworks:

- a collated batch of 2B rows, chosen rows first, then rejected rows, with
  ``input_ids``, ``attention_mask`` and either ``completion_mask`` (TRL >= 0.29)
  or ``labels`` with -100 on masked positions (LLaMA-Factory, ms-swift);
  ``image_grid_thw`` (Qwen2-VL family) lists the images of row 0, row 1, ... in order;
- uncollated rows with ``chosen_input_ids``/``chosen_labels`` and the rejected
  counterparts (LLaMA-Factory's pairwise dataset features).

Padding is recognised by the attention mask, never by its side, so left- and
right-padded batches read the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import compress
from typing import Any

from vlm_dpo_plugins.collation.tokens import TokenFacts
from vlm_dpo_plugins.errors import VLMDPOError
from vlm_dpo_plugins.types import TokenizedPair, TokenizedSequence

IGNORE_INDEX = -100


class BatchLayoutError(VLMDPOError, ValueError):
    """A batch whose layout the converters do not recognise (the checks cannot map its rows to pairs)."""


def pairs_from_batch(
    batch: Mapping[str, Any],
    rows: Sequence[int],
    facts: TokenFacts = TokenFacts(),
    *,
    images_per_row: Sequence[int] | None = None,
    texts: Sequence[tuple[str | None, str | None]] | None = None,
    max_length: int | None = None,
) -> list[TokenizedPair]:
    """Pairs from a collated 2B-row batch (chosen rows first); ``rows`` are the dataset indices of its B pairs.

    The response mask is ``completion_mask`` when present, else ``labels != -100``.
    ``texts`` are the raw (chosen, rejected) response texts, used when ``facts`` has no ``decode``.
    """
    if "input_ids" not in batch:
        raise BatchLayoutError(f"the batch has no 'input_ids' (keys: {sorted(batch)})")
    input_ids = _rows(batch["input_ids"])
    if "completion_mask" in batch:
        response = _flag_rows(batch["completion_mask"], unset=0)
    elif "labels" in batch:
        response = _flag_rows(batch["labels"], unset=IGNORE_INDEX)
    else:
        raise BatchLayoutError(f"the batch has neither 'completion_mask' nor 'labels' (keys: {sorted(batch)})")
    real_tokens = _real_tokens(batch["attention_mask"]) if "attention_mask" in batch else None
    pair_count = len(rows)
    if len(input_ids) != 2 * pair_count:
        raise BatchLayoutError(
            f"the batch has {len(input_ids)} rows for {pair_count} pairs; expected their chosen + rejected rows"
        )
    needs = image_token_needs(batch, images_per_row, facts, pair_count)
    sides = []
    for index in range(2 * pair_count):
        ids, mask = input_ids[index], response[index]
        if real_tokens is not None:
            real = real_tokens[index]
            if isinstance(real, slice):
                ids, mask = ids[real], mask[real]
            else:
                ids, mask = list(compress(ids, real)), list(compress(mask, real))
        sides.append((ids, mask))
    pairs = []
    for pair_index, row in enumerate(rows):
        chosen_text, rejected_text = texts[pair_index] if texts is not None else (None, None)
        pairs.append(
            TokenizedPair(
                row=row,
                chosen=_sequence(*sides[pair_index], chosen_text, facts),
                rejected=_sequence(*sides[pair_count + pair_index], rejected_text, facts),
                special=facts.special,
                num_images=None if images_per_row is None else images_per_row[pair_index],
                image_tokens=needs[pair_index],
                max_length=max_length,
            )
        )
    return pairs


def pairs_from_labelled_rows(
    examples: Sequence[Mapping[str, Any]],
    rows: Sequence[int],
    facts: TokenFacts = TokenFacts(),
    *,
    max_length: int | None = None,
) -> list[TokenizedPair]:
    """Pairs from uncollated rows with ``{chosen,rejected}_input_ids`` and ``{chosen,rejected}_labels`` (-100 masked).

    Image token needs follow ``facts.tokens_per_image`` (a grid is only known after collation).
    """
    pairs = []
    for example, row in zip(examples, rows):
        sides = {}
        for side in ("chosen", "rejected"):
            try:
                ids, labels = list(example[f"{side}_input_ids"]), list(example[f"{side}_labels"])
            except KeyError as missing:
                raise BatchLayoutError(f"row {row} has no {missing} (keys: {sorted(example)})") from None
            mask = [int(label != IGNORE_INDEX) for label in labels]
            attention = example.get(f"{side}_attention_mask")
            if attention is not None:
                real = [value != 0 for value in attention]
                ids, mask = list(compress(ids, real)), list(compress(mask, real))
            sides[side] = _sequence(ids, mask, None, facts)
        images = count_images(example)
        needs = (facts.tokens_per_image,) * images if facts.tokens_per_image and images is not None else None
        pairs.append(
            TokenizedPair(
                row=row, chosen=sides["chosen"], rejected=sides["rejected"], special=facts.special,
                num_images=images, image_tokens=needs, max_length=max_length,
            )
        )
    return pairs


def image_token_needs(
    batch: Mapping[str, Any], images_per_row: Sequence[int] | None, facts: TokenFacts, pair_count: int
) -> list[tuple[int, ...] | None]:
    """Per pair, the image tokens each of its images needs, or None where the batch and facts cannot tell."""
    if images_per_row is None:
        return [None] * pair_count
    grid = batch.get("image_grid_thw")
    if grid is not None and facts.merge_size:
        grid_rows = _rows(grid)
        # Every framework repeats each pair's images for its rejected row, so the grid has 2 * images rows.
        if len(grid_rows) != 2 * sum(images_per_row):
            return [None] * pair_count
        per_image = [_product(thw) // facts.merge_size**2 for thw in grid_rows]
        needs, start = [], 0
        for count in images_per_row:
            needs.append(tuple(per_image[start : start + count]))
            start += count
        return needs
    if facts.tokens_per_image:
        return [(facts.tokens_per_image,) * count for count in images_per_row]
    return [None] * pair_count


IMAGE_COUNT_KEY = "vlm_dpo_image_count"
"""Beside a row the framework encoded already (ms-swift's), whose image list is gone: how many images it had."""


def count_images(example: Mapping[str, Any]) -> int | None:
    """How many images a raw row carries (``images`` list or single ``image``); None when it names none."""
    if IMAGE_COUNT_KEY in example:
        return example[IMAGE_COUNT_KEY]
    if "images" in example:
        images = example["images"]
        return 0 if images is None else len(images)
    if "image" in example:
        return 0 if example["image"] is None else 1
    return None


def response_text(value: Any) -> str | None:
    """The text of a raw response: a string, or the text parts of a list of chat messages."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        parts = []
        for message in value:
            content = message.get("content") if isinstance(message, Mapping) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, (list, tuple)):
                parts.extend(part.get("text", "") for part in content if isinstance(part, Mapping))
        return "".join(parts)
    return None


def _real_tokens(attention: Any) -> list[slice | list[int]]:
    """Per row, the slice of real tokens when all padding is on one side (the usual case), else a 0/1 list."""
    spans: list[slice | list[int]] = []
    for row in _flag_rows(attention, unset=0):
        count = row.count(1)
        if row[:count].count(0) == 0:
            spans.append(slice(0, count))
        elif row[len(row) - count :].count(0) == 0:
            spans.append(slice(len(row) - count, len(row)))
        else:
            spans.append(row)
    return spans


def _sequence(ids: list[int], mask: list[int], text: str | None, facts: TokenFacts) -> TokenizedSequence:
    if facts.decode is not None:
        text = facts.decode(_without_special(list(compress(ids, mask)), facts.special.all))
    return TokenizedSequence(input_ids=ids, response_mask=mask, text=text)


def _without_special(tokens: list[int], special: frozenset[int]) -> list[int]:
    # Special tokens sit at the end of a response (EOS, a turn end); the rest is usually free of them.
    end = len(tokens)
    while end and tokens[end - 1] in special:
        end -= 1
    body = tokens[:end]
    return body if special.isdisjoint(body) else [token for token in body if token not in special]


def _rows(value: Any) -> list[list[int]]:
    return value.tolist() if hasattr(value, "tolist") else [list(row) for row in value]


def _flag_rows(value: Any, unset: int) -> list[list[int]]:
    """1 where the value is not ``unset``, row by row; tensors are compared in one vectorised step."""
    if hasattr(value, "ne") and hasattr(value, "tolist"):
        return value.ne(unset).int().tolist()
    return [[int(item != unset) for item in row] for row in value]


def _product(values: Sequence[int]) -> int:
    result = 1
    for value in values:
        result *= int(value)
    return result
