"""Responses tokenized the way a prefix-LM processor (PaliGemma's) would write them, for a collator that asks the
processor for the responses alone.

PaliGemma's processor refuses a call without images, and its text is the prefix (``token_type_ids`` 0: attended
both ways); the response is its ``suffix`` (``token_type_ids`` 1, causal, closed by EOS). A collator that
tokenizes prompts and responses in separate calls (TRL's vision collator) fails on the first response. Its
processor is wrapped here so that a call without images is the response's: the tokenizer's ids, EOS appended,
``token_type_ids`` 1 on every token; and the prompts' call returns no ``labels`` (the processor makes them from
the prefix alone, at the prompt's length, which no loss over the whole row can use).
"""

from __future__ import annotations

from typing import Any

PREFIX_LM_PROCESSORS = frozenset({"PaliGemmaProcessor"})


def is_prefix_lm_processor(processor: Any) -> bool:
    return type(processor).__name__ in PREFIX_LM_PROCESSORS


class ResponsesAsSuffix:
    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, images: Any = None, text: Any = None, **kwargs: Any) -> Any:
        if images is not None or text is None:
            encoded = self.processor(images=images, text=text, **kwargs)
            # Labels the processor derives from its prefix, at the prompt's length: no labels of the full rows.
            encoded.pop("labels", None)
            return encoded
        tokenizer = self.processor.tokenizer
        eos = tokenizer.eos_token
        texts = [text] if isinstance(text, str) else list(text)
        texts = [item if item.endswith(eos) else item + eos for item in texts]
        options = {key: kwargs[key] for key in ("padding", "padding_side", "return_tensors") if key in kwargs}
        encoded = tokenizer(texts, add_special_tokens=False, **options)
        encoded["token_type_ids"] = encoded["attention_mask"]  # 1 on the suffix's tokens, 0 on padding
        return encoded

    def __getattr__(self, name: str) -> Any:
        return getattr(self.processor, name)
