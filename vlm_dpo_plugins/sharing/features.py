"""Encode each pair's images once: reuse image features across the rows and the passes that need the same ones.

Transformers' vision-language models get their image features from one method, ``get_image_features``,
which runs the vision tower and the projector; the language model's forward calls it on itself.
``ImageFeatureSharing`` wraps that method on the model's own modules for the length of a ``with``:

- ``encode_chosen_half()``: the two-row layout, where the rejected rows repeat the chosen rows' images:
  the first half is encoded and its features used for both halves.
- ``record()`` / ``replay()``: the policy pass keeps its features, the reference pass gets them back
  without running the vision tower. Only valid while the vision tower and projector are frozen and
  the reference's equal the policy's; ``ReferenceFeatureReuse`` decides.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from vlm_dpo_plugins.freeze.apply import is_adapter_parameter
from vlm_dpo_plugins.freeze.names import named_parameters
from vlm_dpo_plugins.types import ParameterGroups

VISION_GROUPS = ("vision", "projector")


DIRECT_VISION_MODELS = ("vision_model",)
"""Children a model's forward calls directly for its image features when it has no ``get_image_features``
(Mllama's cross-attention states are ``vision_model``'s output, projected)."""


def image_feature_modules(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(module, method) pairs the model's forward calls for its image features: ``get_image_features`` of the
    innermost modules that define it, else the ``forward`` of a vision model called directly."""
    having = [m for m in model.modules() if callable(getattr(type(m), "get_image_features", None))]
    innermost = [m for m in having if not any(o is not m and _contains(m, o) for o in having)]
    if innermost:
        return [(module, "get_image_features") for module in innermost]
    direct = []
    for module in model.modules():
        for name in DIRECT_VISION_MODELS:
            child = getattr(module, name, None)
            if isinstance(child, torch.nn.Module) and child in list(module.children()):
                direct.append((child, "forward"))
    return direct


def _contains(outer: torch.nn.Module, inner: torch.nn.Module) -> bool:
    return any(module is inner for module in outer.modules())


class ImageFeatureSharing:
    """Wraps the policy's image-feature modules; ``replay`` wraps another model's (a separate reference) as well."""

    def __init__(self, model: torch.nn.Module):
        self.modules = image_feature_modules(model)
        self._recorded: list[Any] = []

    @property
    def available(self) -> bool:
        return bool(self.modules)

    @property
    def recorded(self) -> bool:
        return bool(self._recorded)

    @contextlib.contextmanager
    def encode_chosen_half(self) -> Iterator[None]:
        def wrap(original):
            def encode_half(*args: Any, **kwargs: Any) -> Any:
                return _repeated(original(*_first_halves(args), **_first_halves(kwargs)))

            return encode_half

        with self._wrapped(wrap):
            yield

    def forget(self) -> None:
        self._recorded = []

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        self._recorded = []

        def wrap(original):
            def recording(*args: Any, **kwargs: Any) -> Any:
                result = original(*args, **kwargs)
                self._recorded.append(result)
                return result

            return recording

        with self._wrapped(wrap):
            yield

    @contextlib.contextmanager
    def replay(self, into: ImageFeatureSharing | None = None) -> Iterator[None]:
        """Hand the recorded features out again, in order, from the policy's modules or those ``into`` wraps."""
        recorded, self._recorded = self._recorded, []

        def wrap(original):
            def replaying(*args: Any, **kwargs: Any) -> Any:
                if not recorded:
                    raise RuntimeError(
                        "vlm-dpo: the reference pass asked for more image features than the policy pass computed"
                    )
                return recorded.pop(0)

            return replaying

        with self._wrapped(wrap, (into or self).modules):
            yield

    @contextlib.contextmanager
    def _wrapped(self, wrap, modules: list[torch.nn.Module] | None = None) -> Iterator[None]:
        """Wrap each module's current ``get_image_features`` (another wrap included), then put it back as it was."""
        saved = []
        try:
            for module, method in self.modules if modules is None else modules:
                saved.append((module, method, module.__dict__.get(method)))
                setattr(module, method, wrap(getattr(module, method)))
            yield
        finally:
            for module, method, previous in reversed(saved):
                if previous is None:
                    delattr(module, method)
                else:
                    setattr(module, method, previous)


def _first_halves(values):
    def half(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return value[: value.shape[0] // 2]
        return value

    if isinstance(values, dict):
        return {key: half(value) for key, value in values.items()}
    return tuple(half(value) for value in values)


def _repeated(features: Any) -> Any:
    if isinstance(features, torch.Tensor):
        return torch.cat((features, features))
    if isinstance(features, (list, tuple)):
        return type(features)(list(features) * 2)
    if hasattr(features, "pooler_output"):
        features.pooler_output = _repeated(features.pooler_output)
        return features
    if getattr(features, "last_hidden_state", None) is not None:  # a vision model's own output (Mllama)
        for key, value in list(features.items()):
            if isinstance(value, torch.Tensor):
                features[key] = _repeated(value)
        return features
    raise TypeError(f"vlm-dpo: cannot repeat image features of type {type(features).__name__}")


class ReferenceFeatureReuse:
    """Whether the reference pass may take the policy's image features at this step.

    Yes while nothing in the vision tower or the projector trains (adapters included) and the reference holds the
    same vision and projector weights: ``reference`` None means the reference is the policy with its adapter off;
    a separate model is compared element by element once. Once the vision side has trained, never again: a
    separate reference no longer matches it.
    """

    def __init__(self, policy: torch.nn.Module, reference: torch.nn.Module | None, groups: ParameterGroups):
        names = {name for group in VISION_GROUPS for name in groups.get(group, [])}
        self._policy, self._reference = policy, reference
        self._names = names
        self._parameters = [p for name, p in named_parameters(policy) if name in names]
        self._adapters = any(is_adapter_parameter(name) for name in names)
        self._vision_has_trained = False
        self._same_weights: bool | None = None

    def allowed(self) -> bool:
        if self._adapters or any(p.requires_grad for p in self._parameters):
            self._vision_has_trained = True
        if self._vision_has_trained or not self._parameters:
            return False
        if self._same_weights is None:
            self._same_weights = (
                self._reference is None
                or self._reference is self._policy
                or _same_weights(self._policy, self._reference, self._names)
            )
        return self._same_weights


def _same_weights(policy: torch.nn.Module, reference: torch.nn.Module, names: set[str]) -> bool:
    ours = {name: p for name, p in named_parameters(policy) if name in names}
    theirs = {_plain_name(name): p for name, p in named_parameters(reference)}
    for name, parameter in ours.items():
        other = theirs.get(_plain_name(name))
        if other is None or hasattr(parameter, "ds_numel") or hasattr(other, "ds_numel"):
            return False  # a name the reference lacks, or ZeRO-3 partitions that cannot be compared here
        if other.shape != parameter.shape or not torch.equal(other.detach().to(parameter.device), parameter.detach()):
            return False
    return True


def _plain_name(name: str) -> str:
    for prefix in ("module.", "base_model.model."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name.replace(".base_layer.", ".")
