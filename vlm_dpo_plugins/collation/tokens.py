"""What the checks need to know about a tokenizer/processor, read by duck typing so no framework is imported.

``TokenFacts.from_processor`` accepts a processor or a bare tokenizer and reads
only public attributes (``image_token_id``, ``bos_token_id``, ``all_special_ids``,
``image_processor.merge_size``, ``decode``). The fixed image-token count of
LLaVA-style processors is measured through the processor's own per-size token
counter when it has one; anything it cannot learn stays None and the checks that
need it fall back to what the token ids alone show.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vlm_dpo_plugins.types import SpecialTokens

# Three shapes far apart, so a processor whose count depends on the image size gives different answers.
_PROBE_IMAGE_SIZES = [(32, 32), (336, 336), (300, 1000)]


@dataclass(frozen=True)
class TokenFacts:
    special: SpecialTokens = SpecialTokens()
    decode: Callable[[Sequence[int]], str] | None = None
    """Turns response token ids (special ids already removed) into text."""
    merge_size: int | None = None
    """Qwen2-VL-style: an image needs ``prod(image_grid_thw) / merge_size**2`` tokens."""
    tokens_per_image: int | None = None
    """LLaVA-style: every image needs this many tokens."""

    @classmethod
    def from_processor(cls, processor: Any) -> TokenFacts:
        tokenizer = getattr(processor, "tokenizer", None) or processor
        image = _model_image_token(processor)
        if image is None:
            image = _token_id(tokenizer, "image_token_id")
        special = SpecialTokens(
            image=image,
            bos=_token_id(tokenizer, "bos_token_id"),
            eos=_token_id(tokenizer, "eos_token_id"),
            pad=_token_id(tokenizer, "pad_token_id"),
            all=frozenset(_int_list(getattr(tokenizer, "all_special_ids", ())) + ([] if image is None else [image])),
        )
        decode = getattr(tokenizer, "decode", None)
        merge_size = _positive_int(getattr(getattr(processor, "image_processor", None), "merge_size", None))
        tokens_per_image = None if merge_size else _fixed_image_token_count(processor)
        return cls(special=special, decode=decode if callable(decode) else None, merge_size=merge_size,
                   tokens_per_image=tokens_per_image)


def collator_owner(collate: Callable[..., Any]) -> Any:
    """The object behind a collator: ms-swift hands over ``partial(template.data_collator, padding_to=...)``."""
    owner = collate
    for _ in range(4):  # a partial of a bound method is two layers; a cycle must not hang
        inner = getattr(owner, "func", None) if isinstance(owner, functools.partial) else None
        inner = inner if inner is not None else getattr(owner, "__self__", None)
        if inner is None or isinstance(inner, types.ModuleType):
            break
        owner = inner
    return owner


def find_processor(collate: Callable[..., Any]) -> Any | None:
    """The processor or tokenizer a framework collator carries (TRL, LLaMA-Factory and ms-swift all keep one)."""
    owner = collator_owner(collate)
    for name in ("processor", "processing_class", "tokenizer"):
        found = getattr(owner, name, None)
        if found is not None:
            return found
    return None


def collator_max_length(collate: Callable[..., Any]) -> int | None:
    owner = collator_owner(collate)
    return _positive_int(getattr(owner, "max_length", None))


UNEXPANDED_IMAGE_TOKEN_PROCESSORS = frozenset({"MllamaProcessor"})
"""Processors that leave each image's token as one token: the text reaches the image through cross-attention."""


def _fixed_image_token_count(processor: Any) -> int | None:
    if type(processor).__name__ in UNEXPANDED_IMAGE_TOKEN_PROCESSORS:
        return 1
    count_tokens = getattr(processor, "_get_num_multimodal_tokens", None)
    if not callable(count_tokens) or getattr(processor, "image_token_id", None) is None:
        return None
    try:
        counts = count_tokens(image_sizes=_PROBE_IMAGE_SIZES)
        counts = counts["num_image_tokens"] if isinstance(counts, dict) else counts.num_image_tokens
    except Exception:  # a processor that cannot answer simply leaves the count unknown
        return None
    counts = {_positive_int(count) for count in counts}
    return counts.pop() if len(counts) == 1 else None


def _model_image_token(processor: Any) -> int | None:
    """The id the model replaces with image features, one per feature.

    Usually the processor's ``image_token_id``. Some processors name there the placeholder a prompt is written
    with instead (Gemma 3 from transformers 5.7: ``<start_of_image>``, once per image, which then expands to its
    soft tokens); their ``image_token_ids`` lists the one feature id alone. A longer list (Pixtral, InternVL, ...)
    adds break and border ids that take no feature, so it says nothing here.
    """
    listed = getattr(processor, "image_token_ids", None)
    if isinstance(listed, (list, tuple)) and len(listed) == 1:
        only = listed[0]
        if isinstance(only, int) and not isinstance(only, bool) and only >= 0:
            return only
    return _token_id(processor, "image_token_id")


def _token_id(owner: Any, name: str) -> int | None:
    value = getattr(owner, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _int_list(values: Any) -> list[int]:
    try:
        return [value for value in values if isinstance(value, int)]
    except TypeError:
        return []
