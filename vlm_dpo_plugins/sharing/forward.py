"""Run a preference batch through a model with the prompt and the images shared, or say why not and run it as collated.

The adapters keep calling the model their framework's way (TRL's fused LM head, LLaMA-Factory's and
ms-swift's logits); ``PairSharing`` only changes what goes in and maps what comes out back::

    prepared = sharing.prepare(model_kwargs, labels, response_mask)
    with sharing.policy_pass(prepared, keep_features=...):   # keep: the reference may reuse them
        out = model(**prepared.kwargs, labels=prepared.labels)
    per_token = prepared.to_collated(out.log_probs)        # [2B, T - 1], as without sharing
    with sharing.reference_pass(prepared, reference_model=...):
        ...

Prompt sharing packs each pair into one row (``packing.py``) with its own attention mask and
positions; image sharing encodes each pair's images once in the policy pass and, while the vision
tower and projector are frozen, lends the features to the reference pass (``features.py``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vlm_dpo_plugins.sharing.attention_patterns import block_marker, image_block_key, image_blocks
from vlm_dpo_plugins.sharing.features import ImageFeatureSharing
from vlm_dpo_plugins.sharing.images import PER_ROW_KEYS, PER_TOKEN_KEYS, chosen_half_of_images, images_repeated
from vlm_dpo_plugins.sharing.packing import (
    CHOSEN,
    REJECTED,
    SHARED,
    PackedPairs,
    PackingUnavailable,
    pack_pairs,
    packed_per_token_inputs,
)
from vlm_dpo_plugins.sharing.positions import RopeIndex
from vlm_dpo_plugins.sharing.prefix_attention import LAYOUT_KEYWORD, PairLayout, dispatches_through_interface, install
from vlm_dpo_plugins.sharing.settings import SharingConfig

logger = logging.getLogger("vlm_dpo_plugins.sharing")

MASKABLE_ATTENTION = {"eager": "float", "sdpa": "bool"}
"""Attention implementations that take an arbitrary 4D mask, and the mask each expects."""


@dataclass
class PreparedBatch:
    kwargs: dict[str, Any]
    """The model's keyword arguments: packed rows, or the collated batch unchanged."""
    labels: torch.Tensor | None
    packed: PackedPairs | None
    encode_chosen_half: bool
    """Unpacked rows whose images repeat per pair: the vision tower encodes the first half only."""
    layout: PairLayout | None = None
    """Packed rows whose attention is computed from their layout, without a mask (``prefix_attention.py``)."""

    def to_collated(self, per_token_shifted: torch.Tensor) -> torch.Tensor:
        """Per-token outputs (position t scores token t + 1) in the collated ``[2B, T - 1]`` layout."""
        return per_token_shifted if self.packed is None else self.packed.unpack(per_token_shifted)


class PairSharing:
    def __init__(self, model: torch.nn.Module, config: SharingConfig):
        self.config = config
        self.features = ImageFeatureSharing(model)
        self._reference_features: tuple[torch.nn.Module, ImageFeatureSharing] | None = None
        self._rope_index = RopeIndex.of(model)
        self._packing_announced = False
        self.unpacked_batches = 0
        config_of_model = getattr(model, "config", None)
        text_config = config_of_model.get_text_config() if hasattr(config_of_model, "get_text_config") else None
        self._implementation = getattr(text_config or config_of_model, "_attn_implementation", None) or "eager"
        self._window = _sliding_window(text_config or config_of_model)
        self._image_block_key = image_block_key(getattr(config_of_model, "model_type", None))
        self._block_marker = block_marker(getattr(config_of_model, "model_type", None))
        self._mask_kind = self._attention_kind() if config.prompt else None

    def _attention_kind(self) -> str | None:
        """``layout`` (no mask: ``prefix_attention.py``), ``bool``/``float`` (a dense 4D mask), or None (two rows)."""
        if self._image_block_key is not None and self.config.attention == "auto":
            logger.info(
                "vlm-dpo: sharing.attention: some of this model's tokens (images, or its prefix) attend to each other "
                "both ways in training: packed rows take a dense 4D mask with those blocks"
            )
        elif self.config.attention == "auto" and dispatches_through_interface(self._implementation):
            install()
            return "layout"
        return self._dense_mask_kind()

    def _dense_mask_kind(self) -> str | None:
        implementation = self._implementation
        kind = MASKABLE_ATTENTION.get(implementation)
        if kind is None:
            logger.warning(
                "vlm-dpo: sharing.prompt: attention implementation %r cannot take the mask that keeps a pair's two "
                "responses apart; chosen and rejected run as two rows each (eager or sdpa can share the prompt)",
                implementation,
            )
        return kind

    def _announce_packing(self, rows_and_length: tuple[int, ...], prepared: PreparedBatch) -> None:
        if not self._packing_announced:
            self._packing_announced = True
            rows, length = rows_and_length
            packed = prepared.packed
            logger.info(
                "vlm-dpo: sharing.prompt: each pair runs as one row [prompt, chosen, rejected] (first batch: %d x %d "
                "tokens as %d x %d; %s)",
                rows,
                length,
                packed.pairs,
                packed.length,
                "two causal attention calls per row, no mask" if prepared.layout else "a dense 4D attention mask",
            )

    def prepare(
        self,
        model_kwargs: Mapping[str, Any],
        labels: torch.Tensor | None,
        response_mask: torch.Tensor,
        per_token_keys: frozenset[str] = PER_TOKEN_KEYS,
    ) -> PreparedBatch:
        """The model inputs for this batch; ``labels`` (collated layout, or None) are packed alongside."""
        rows_and_length = tuple(model_kwargs["input_ids"].shape)
        # A framework's own per-token extras (ms-swift's loss_scale, ...) pack like the token ids.
        per_token_keys = per_token_keys | {
            key
            for key, value in model_kwargs.items()
            if isinstance(value, torch.Tensor) and value.ndim == 2 and tuple(value.shape) == rows_and_length
        }
        if self._mask_kind is not None:
            try:
                prepared = self._packed(model_kwargs, labels, response_mask, per_token_keys)
                self._announce_packing(rows_and_length, prepared)
                return prepared
            except PackingUnavailable as reason:
                self.unpacked_batches += 1
                if self.unpacked_batches == 1:  # reasons name rows, so each batch's differs: say it once
                    logger.warning(
                        "vlm-dpo: sharing.prompt: this batch runs unpacked: %s (later unpacked batches are counted in "
                        "PairSharing.unpacked_batches, not logged)",
                        reason,
                    )
        repeated = (
            self.config.vision_features and self.features.available and images_repeated(model_kwargs, per_token_keys)
        )
        return PreparedBatch(dict(model_kwargs), labels, packed=None, encode_chosen_half=repeated)

    def _packed(
        self,
        model_kwargs: Mapping[str, Any],
        labels: torch.Tensor | None,
        response_mask: torch.Tensor,
        per_token_keys: frozenset[str],
    ) -> PreparedBatch:
        input_ids, attention_mask = model_kwargs["input_ids"], model_kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.ndim != 2:
            raise PackingUnavailable("the batch already carries a 4D attention mask")
        images = chosen_half_of_images(model_kwargs, per_token_keys)
        packed = pack_pairs(input_ids, attention_mask, response_mask)
        self._require_within_window(packed)
        per_token = packed_per_token_inputs(packed, model_kwargs, per_token_keys)
        kwargs = {key: value for key, value in model_kwargs.items() if key not in per_token_keys and key not in images}
        kwargs.update(per_token)
        kwargs.update(images)
        for key in PER_ROW_KEYS & kwargs.keys():
            kwargs[key] = kwargs[key][: packed.pairs]
        if "position_ids" not in per_token:  # positions the collator computed are gathered, exact as they are
            kwargs["position_ids"] = self._rope_index.positions(packed, per_token, images)
        layout = None
        if self._mask_kind == "layout":
            layout = PairLayout.of(packed.side, SHARED, CHOSEN, REJECTED)
            # All ones: transformers then builds no mask (SDPA's is_causal path). Without a 2D mask it would read the
            # rejected branch's restarting positions as packed documents and build a dense one; padding is the
            # layout's to skip.
            kwargs["attention_mask"] = torch.ones_like(packed.side)
            kwargs[LAYOUT_KEYWORD] = layout
        else:
            blocks = None
            if self._image_block_key is not None and self._image_block_key in kwargs:
                blocks = image_blocks(kwargs[self._image_block_key], self._block_marker)
            kwargs["attention_mask"] = self._mask(packed, blocks)
        packed_labels = packed.labels(labels) if labels is not None else None
        return PreparedBatch(kwargs, packed_labels, packed=packed, encode_chosen_half=False, layout=layout)

    def _require_within_window(self, packed: PackedPairs) -> None:
        """A sliding-window layer sees the same keys packed as unpacked only while no branch, prompt included, is
        longer than the window: each branch's positions then all lie within it, as in its own row."""
        if self._window is None:
            return
        longest = PairLayout.of(packed.side, SHARED, CHOSEN, REJECTED).longest_branch
        if longest > self._window:
            raise PackingUnavailable(
                f"a pair runs {longest} tokens (prompt and one response), longer than the model's sliding window "
                f"({self._window}): packed, its windowed layers would see other keys than in two rows"
            )

    def layout_ignored(self, prepared: PreparedBatch) -> bool:
        """After the policy forward: True when the model never passed the layout to its attention, so the pass
        computed plain causal attention over both responses. Sharing then uses the dense mask (or two rows) from
        here on, said once; the caller runs the batch again."""
        if prepared.layout is None or prepared.layout.dispatched:
            return False
        self._mask_kind = MASKABLE_ATTENTION.get(self._implementation)
        logger.warning(
            "vlm-dpo: sharing.attention: this model does not pass its keyword arguments down to its %s attention, "
            "so a packed row's responses cannot be kept apart without a mask; from now on %s",
            self._implementation,
            "with a dense 4D mask" if self._mask_kind else "chosen and rejected run as two rows each",
        )
        return True

    def _mask(self, packed: PackedPairs, blocks: torch.Tensor | None = None) -> torch.Tensor:
        # fp32 for eager: added to bf16 scores it promotes them, and the softmax runs in fp32 there anyway.
        return packed.visible(blocks) if self._mask_kind == "bool" else packed.attention_bias(torch.float32, blocks)

    @contextlib.contextmanager
    def policy_pass(self, prepared: PreparedBatch, *, keep_features: bool = False) -> Iterator[None]:
        """The policy's forward; ``keep_features``: keep its image features for a reference pass to reuse."""
        self.features.forget()
        with contextlib.ExitStack() as stack:
            if prepared.encode_chosen_half:
                stack.enter_context(self.features.encode_chosen_half())
            if keep_features and self.config.vision_features:
                stack.enter_context(self.features.record())
            yield

    @contextlib.contextmanager
    def reference_pass(
        self, prepared: PreparedBatch, *, reference_model: torch.nn.Module | None = None
    ) -> Iterator[None]:
        """The reference's forward (``reference_model``: a separate model; None: the policy with its adapter off).

        It gets the features the policy pass kept, if it kept them, else encodes its own, once per pair.
        """
        target = self.features if reference_model is None else self._features_of(reference_model)
        with contextlib.ExitStack() as stack:
            if self.features.recorded:
                stack.enter_context(self.features.replay(target))
            elif prepared.encode_chosen_half:
                stack.enter_context(target.encode_chosen_half())
            yield

    def _features_of(self, reference_model: torch.nn.Module) -> ImageFeatureSharing:
        # Found once: finding the image-feature modules walks every module of the model.
        if self._reference_features is None or self._reference_features[0] is not reference_model:
            self._reference_features = (reference_model, ImageFeatureSharing(reference_model))
        return self._reference_features[1]


def _sliding_window(text_config: Any) -> int | None:
    """The window of the model's windowed layers (Gemma 2/3, Mistral, Qwen2 ``use_sliding_window``), or None."""
    window = getattr(text_config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None:
        return int(window) if "sliding_attention" in layer_types else None
    return int(window) if getattr(text_config, "use_sliding_window", True) else None
