"""Sequence lengths with the model's own tokenizer and processor: what truncation to max_length will cut.

The prompt's length is estimated as its text tokens, plus each image's tokens from the
processor's own per-size counter (fixed for LLaVA, size-dependent for Qwen2-VL), plus the
chat template's markup measured once on an empty conversation. Responses are tokenized
exactly, so two responses that truncation leaves identical are found by their tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vlm_dpo_plugins.collation.tokens import TokenFacts
from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.preference_data.pairs import IMAGE_PLACEHOLDER, Pair
from vlm_dpo_plugins.preference_data.text_checks import finding
from vlm_dpo_plugins.types import Finding


@dataclass(frozen=True)
class RowLengths:
    before_last_image: int
    image_tokens: int
    prompt: int
    chosen: list[int]
    rejected: list[int]


class Lengths:
    def __init__(self, model_path: str) -> None:
        try:
            from transformers import AutoProcessor, AutoTokenizer
        except ImportError as error:
            raise ConfigError(f"--model needs transformers installed ({error})") from None
        try:
            self.processor: Any = AutoProcessor.from_pretrained(model_path)
        except Exception:  # a text-only checkpoint has a tokenizer and no processor
            self.processor = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer = getattr(self.processor, "tokenizer", None) or self.processor
        self.facts = TokenFacts.from_processor(self.processor)
        self.template_tokens = self._template_overhead()

    def _template_overhead(self) -> int:
        if not getattr(self.tokenizer, "chat_template", None):
            return 0
        try:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": ""}], tokenize=True, add_generation_prompt=True
            )
        except Exception:  # a template that needs more than a bare turn: leave the markup out of the estimate
            return 0
        ids = ids["input_ids"] if isinstance(ids, dict) else ids
        return len(ids)

    def image_tokens(self, sizes: Sequence[tuple[int, int] | None]) -> list[int | None]:
        if self.facts.tokens_per_image is not None:
            return [self.facts.tokens_per_image] * len(sizes)
        counter = getattr(self.processor, "_get_num_multimodal_tokens", None)
        known = [size for size in sizes if size is not None]
        if not callable(counter) or not known:
            return [None] * len(sizes)
        try:
            counts = counter(image_sizes=[(height, width) for width, height in known])
            counts = counts["num_image_tokens"] if isinstance(counts, dict) else counts.num_image_tokens
        except Exception:  # the processor cannot tell: image tokens unknown
            return [None] * len(sizes)
        by_size = iter(counts)
        return [next(by_size) if size is not None else None for size in sizes]

    def measure(self, pairs: Sequence[Pair], image_tokens: Sequence[list[int | None]]) -> list[RowLengths]:
        before, after = [], []
        for pair in pairs:
            head, _, tail = pair.prompt.rpartition(IMAGE_PLACEHOLDER)
            before.append(head.replace(IMAGE_PLACEHOLDER, ""))
            after.append(tail)
        encode = self._encode
        before_ids, after_ids = encode(before), encode(after)
        chosen_ids, rejected_ids = encode([p.chosen for p in pairs]), encode([p.rejected for p in pairs])
        rows = []
        for index, pair in enumerate(pairs):
            images = sum(count or 0 for count in image_tokens[index])
            head = self.template_tokens + len(before_ids[index])
            rows.append(
                RowLengths(
                    before_last_image=head,
                    image_tokens=images,
                    prompt=head + images + len(after_ids[index]),
                    chosen=chosen_ids[index],
                    rejected=rejected_ids[index],
                )
            )
        return rows

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def truncation_findings(pair: Pair, lengths: RowLengths, max_length: int) -> list[Finding]:
    if lengths.before_last_image + lengths.image_tokens > max_length and lengths.image_tokens:
        return [
            finding(
                "image-tokens-truncated",
                f"max_length={max_length} cuts the prompt inside its image tokens: ~{lengths.before_last_image} text "
                f"tokens and {lengths.image_tokens} image tokens before the last image ends; the model fails with "
                "'Image features and image tokens do not match'",
                f"raise max_length above ~{lengths.prompt + max(len(lengths.chosen), len(lengths.rejected))} or lower "
                "the image resolution (max_pixels / image_max_pixels)",
                pair.row,
                "images",
            )
        ]
    room = max_length - lengths.prompt
    if room <= 0:
        return [
            finding(
                "response-truncated",
                f"the prompt alone (~{lengths.prompt} tokens with {lengths.image_tokens} image tokens) fills "
                f"max_length={max_length}: no response token is left, the row trains nothing",
                "raise max_length, shorten the prompt or lower the image resolution",
                pair.row,
                "chosen",
            )
        ]
    chosen, rejected = lengths.chosen[:room], lengths.rejected[:room]
    if chosen == rejected and lengths.chosen != lengths.rejected:
        return [
            finding(
                "response-truncated",
                f"max_length={max_length} leaves ~{room} response tokens, and the responses only differ after them: "
                "truncated, chosen and rejected are identical (margin 0)",
                f"raise max_length above ~{lengths.prompt + max(len(lengths.chosen), len(lengths.rejected))}",
                pair.row,
                "rejected",
            )
        ]
    return []
