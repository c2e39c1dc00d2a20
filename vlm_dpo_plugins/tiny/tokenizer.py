"""Byte-level BPE tokenizers trained in milliseconds on the synthetic corpus.

Byte-level means any text encodes (no unknown tokens), and leading spaces are kept
as part of tokens the way GPT-2/Llama-3/Qwen vocabularies keep them, so the
boundary checks see the same whitespace behaviour as with a real tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

TRAINED_VOCAB_SIZE = 512


def train_byte_level_bpe(
    corpus: Iterable[str],
    special_tokens: Sequence[str],
    pinned_ids: Mapping[str, int] | None = None,
) -> Tokenizer:
    """Train a byte-level BPE whose special tokens come first, or at ``pinned_ids``.

    Pinned ids exist because some framework templates hard-code a real model's
    token ids (ms-swift's ``qwen2_vl`` template expects ``<|image_pad|>`` at 151655);
    the gap up to them is filled with reserved tokens so ids stay contiguous and
    ``len(tokenizer)`` matches the embedding size.
    """
    pinned_ids = dict(pinned_ids or {})
    unpinned = [token for token in special_tokens if token not in pinned_ids]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TRAINED_VOCAB_SIZE,
        special_tokens=unpinned,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    if pinned_ids:
        tokenizer = _with_pinned_tokens(tokenizer, pinned_ids)
    tokenizer.add_special_tokens(list(special_tokens))
    return tokenizer


def _with_pinned_tokens(tokenizer: Tokenizer, pinned_ids: Mapping[str, int]) -> Tokenizer:
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    first_pinned = min(pinned_ids.values())
    if len(vocab) > first_pinned:
        raise ValueError(f"trained vocabulary ({len(vocab)}) overlaps the pinned ids starting at {first_pinned}")
    taken = set(vocab.values())
    for filler_id in range(len(vocab), max(pinned_ids.values()) + 1):
        if filler_id not in pinned_ids.values() and filler_id not in taken:
            vocab[f"<|reserved_{filler_id}|>"] = filler_id
    vocab.update(pinned_ids)
    merges = [tuple(merge.split(" ")) for merge in _merges(tokenizer)]
    rebuilt = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    rebuilt.pre_tokenizer = tokenizer.pre_tokenizer
    rebuilt.decoder = tokenizer.decoder
    return rebuilt


def _merges(tokenizer: Tokenizer) -> list[str]:
    import json

    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [merge if isinstance(merge, str) else " ".join(merge) for merge in merges]


def wrap_for_transformers(
    tokenizer: Tokenizer,
    *,
    bos_token: str | None,
    eos_token: str,
    pad_token: str,
    unk_token: str | None = None,
    chat_template: str | None = None,
    extra_special_tokens: Sequence[str] = (),
) -> PreTrainedTokenizerFast:
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        unk_token=unk_token,
    )
    if extra_special_tokens:
        wrapped.add_special_tokens({"additional_special_tokens": list(extra_special_tokens)})
    if chat_template is not None:
        wrapped.chat_template = chat_template
    return wrapped
