"""Every rank runs the vision tower in the same forwards, so ZeRO-3 and FSDP never hang on a batch without images.

Under ZeRO-3 and FSDP a module's weights are gathered from every rank when it runs: a collective call. A rank
whose batch has no image skips the vision tower while a rank with images runs it, so the ranks' collectives
stop matching: NCCL waits forever, gloo fails with "Received data size doesn't match expected size". At each
forward of the model every rank says whether its batch has images (one small all-gather); when some have and
some have not, each rank without images encodes a stand-in image right after its input embeddings, where the
model itself would encode its images, and adds the features times zero: the same collectives in the same order,
the loss and every gradient unchanged. The stand-in is the image inputs of the first rank that had images, sent
once (a broadcast the first time it is needed) and kept.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from vlm_dpo_plugins.sharing.features import image_feature_modules
from vlm_dpo_plugins.types import RunContext

logger = logging.getLogger("vlm_dpo_plugins.guards")
IMAGE_INPUT = "pixel_values"


def needs_lockstep(context: RunContext) -> bool:
    """Whether the ranks' collectives follow the modules each runs, across more than one rank: ZeRO-3 and FSDP
    gather weights inside the forward; ZeRO-1/2 reduce each gradient into buckets as it arrives, so a trained
    projector with no gradient on one rank leaves the ranks' buckets different sizes."""
    return (context.uses_deepspeed or context.uses_fsdp) and context.world_size > 1


class VisionLockstep:
    """Hooks on each model's image-feature module: before its forward the ranks compare, after its input
    embeddings a rank without images encodes the stand-in when another rank encodes images."""

    def __init__(self, models: Iterable[torch.nn.Module | None]) -> None:
        self._handles: list[Any] = []
        self._stand_in: dict[str, torch.Tensor] | None = None
        self._pending: torch.nn.Module | None = None
        self.stand_in_encodes = 0
        hooked: list[torch.nn.Module] = []
        for model in models:
            if model is None:
                continue
            for module, method in image_feature_modules(model):
                if method != "get_image_features" or any(module is seen for seen in hooked):
                    continue
                hooked.append(module)
                self._handles.append(module.register_forward_pre_hook(self._compare_ranks, with_kwargs=True))
                embeddings = module.get_input_embeddings()
                self._handles.append(embeddings.register_forward_hook(self._after_embeddings(module)))
        self.engaged = bool(hooked)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _compare_ranks(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        has_images = kwargs.get(IMAGE_INPUT) is not None
        device = module.get_input_embeddings().weight.device
        flags = _all_gather_flag(has_images, device)
        self._pending = None
        if all(flags) or not any(flags):
            return
        if self._stand_in is None:
            source = flags.index(True)
            self._stand_in = _broadcast_image_inputs(module, kwargs if has_images else None, source)
        if not has_images:
            self._pending = module

    def _after_embeddings(self, owner: torch.nn.Module):
        def encode_stand_in(embeddings: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self._pending is not owner:
                return None
            self._pending = None
            self.stand_in_encodes += 1
            stand_in = {key: value.to(output.device) for key, value in self._stand_in.items()}
            features = owner.get_image_features(**stand_in)
            # nan_to_num: a stand-in that overflows must not turn this rank's loss into NaN; the gradient stays 0.
            total = torch.nan_to_num(_summed(features), nan=0.0, posinf=0.0, neginf=0.0)
            return output + (total * 0.0).to(output.dtype)

        return encode_stand_in


def _all_gather_flag(flag: bool, device: torch.device) -> list[bool]:
    import torch.distributed as dist

    mine = torch.tensor([int(flag)], device=device)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return [bool(value.item()) for value in everyone]


def _broadcast_image_inputs(
    module: torch.nn.Module, kwargs: Mapping[str, Any] | None, source: int
) -> dict[str, torch.Tensor]:
    """The image inputs ``get_image_features`` takes, as the source rank's batch holds them, on every rank."""
    import torch.distributed as dist

    payload: list[Any] = [None]
    if kwargs is not None and dist.get_rank() == source:
        accepted = inspect.signature(module.get_image_features).parameters
        payload[0] = {
            key: value.detach().cpu()
            for key, value in kwargs.items()
            if key in accepted and isinstance(value, torch.Tensor)
        }
    dist.broadcast_object_list(payload, src=source)
    logger.info(
        "vlm-dpo: guards: a rank's batch has no image while another's has: under ZeRO-3/FSDP it encodes a stand-in "
        "image (from rank %d's batch) at zero weight, so every rank gathers the vision weights in step",
        source,
    )
    return payload[0]


USED_FEATURES = ("pooler_output", "deepstack_features")
"""What a model takes from ``get_image_features``' output (transformers 5): only the modules these come from
may see a gradient, as on a rank with images (LLaVA's last vision layer feeds ``last_hidden_state`` only)."""


def _summed(features: Any) -> torch.Tensor:
    """One scalar from the floating tensors of ``get_image_features``' output that the model uses: a tensor, a
    tuple or list of them, or a ``ModelOutput`` (its ``USED_FEATURES``)."""
    if isinstance(features, torch.Tensor):
        return features.float().sum() if features.is_floating_point() else torch.zeros(())
    if isinstance(features, Mapping):
        used = [features[key] for key in USED_FEATURES if features.get(key) is not None]
        parts = used if "pooler_output" in features else list(features.values())
    elif isinstance(features, (tuple, list)):
        parts = list(features)
    else:
        return torch.zeros(())
    total = torch.zeros(())
    for part in parts:
        value = _summed(part)
        total = total.to(value.device) + value
    return total
