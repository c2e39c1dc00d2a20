"""DeepSpeed tuning: bucket sizes for VLM preference training, merged into the user's config before the engine exists.

The built-in plugin ``DeepSpeedTuning`` answers ``vlm_dpo_deepspeed_overrides`` with
the sizes from :func:`deepspeed_bucket_sizes`; adapters call :func:`tune_deepspeed_config`
once, before handing the config to the framework, and log its one-line report. The
config is only ever read here: deepspeed itself is never imported.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.errors import ConfigError, PluginError
from vlm_dpo_plugins.guards.deepspeed_buckets import deepspeed_bucket_sizes
from vlm_dpo_plugins.guards.deepspeed_config import (
    AUTO,
    DeepSpeedConfigMerge,
    config_value,
    load_deepspeed_config,
    merge_deepspeed_config,
)
from vlm_dpo_plugins.guards.settings import GuardsConfig
from vlm_dpo_plugins.markers import hookimpl
from vlm_dpo_plugins.types import RunContext

PLUGIN_NAME = "deepspeed"


class DeepSpeedTuning:
    def __init__(self) -> None:
        self.enabled = GuardsConfig().tune_deepspeed_buckets

    @hookimpl
    def vlm_dpo_configure(self, config: VLMDPOConfig) -> None:
        guards = config.section("guards")
        # Its setting lives in the guards' section: with the guards blocked, DeepSpeed keeps its own sizes.
        self.enabled = guards is not None and guards.tune_deepspeed_buckets

    @hookimpl
    def vlm_dpo_deepspeed_overrides(
        self,
        deepspeed_config: Mapping[str, Any],
        trainable_parameters: int,
        hidden_size: int | None,
        context: RunContext,
    ) -> Mapping[str, Any] | None:
        if not self.enabled or hidden_size is None:
            return None
        sizes = deepspeed_bucket_sizes(
            trainable_parameters,
            hidden_size,
            zero_stage(deepspeed_config),
            world_size=context.world_size,
            dtype=gradient_dtype(deepspeed_config, context),
        )
        return {f"zero_optimization.{key}": value for key, value in sizes.items()}


def tune_deepspeed_config(
    manager: Any,
    user_config: Mapping[str, Any] | str | os.PathLike,
    *,
    trainable_parameters: int,
    hidden_size: int | None,
    context: RunContext,
) -> DeepSpeedConfigMerge:
    """Ask every plugin for DeepSpeed values and fill them in where the user left keys unset or "auto".

    ``manager``: the run's plugin manager. ``hidden_size``: the language model's width
    (``deepspeed_buckets.model_hidden_size(model.config)``); None leaves the buckets alone.
    Returns the merged config (pass it to the framework instead of the original) with what
    changed, what the user's explicit values kept, and notes on settings that let NaN through.
    """
    config = load_deepspeed_config(user_config)
    suggestions: dict[str, Any] = {}
    contributions = manager.hook.vlm_dpo_deepspeed_overrides(
        deepspeed_config=copy.deepcopy(config),
        trainable_parameters=trainable_parameters,
        hidden_size=hidden_size,
        context=context,
    )
    for contribution in contributions:
        for key, value in (contribution or {}).items():
            if key in suggestions and suggestions[key] != value:
                raise PluginError(
                    f"two plugins suggest different values for DeepSpeed '{key}' ({suggestions[key]!r} and "
                    f"{value!r}); set it in the DeepSpeed config, or block one plugin with VLM_DPO_BLOCK_PLUGINS"
                )
            suggestions[key] = value
    merge = merge_deepspeed_config(config, suggestions)
    merge.notes.extend(nonfinite_risk_notes(merge.config))
    return merge


def nonfinite_risk_notes(deepspeed_config: Mapping[str, Any]) -> list[str]:
    """Settings the user chose that are known to let NaN gradients through at ZeRO 1-2; they are kept, not changed."""
    notes = []
    stage = zero_stage(deepspeed_config)
    if stage == 2 and config_value(deepspeed_config, "zero_optimization.overlap_comm") is True:
        notes.append(
            "zero_optimization.overlap_comm is true at ZeRO-2, where NaN gradient norms are reported with it "
            "(DeepSpeed issues #5347, #7188); set it false if grad_norm turns NaN"
        )
    # "auto" may well mean bf16, and the note is advice: it is given then too.
    bf16 = _enabled(deepspeed_config, ("bf16", "bfloat16"), auto=True)
    if stage in (1, 2) and bf16 and _check_grad_overflow_off(deepspeed_config):
        notes.append(
            "bf16.check_grad_overflow is false: at ZeRO 1-2 in bf16 DeepSpeed then applies a NaN gradient to the "
            "weights instead of skipping the step; set it true (DeepSpeed's default)"
        )
    return notes


def zero_stage(deepspeed_config: Mapping[str, Any]) -> int:
    """The ZeRO stage DeepSpeed will run (0 when ``zero_optimization`` or its ``stage`` is absent)."""
    stage = config_value(deepspeed_config, "zero_optimization.stage", 0)
    try:
        stage = int(stage)
    except (TypeError, ValueError):
        raise ConfigError(f"DeepSpeed 'zero_optimization.stage' is {stage!r}; expected 0, 1, 2 or 3") from None
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"DeepSpeed 'zero_optimization.stage' is {stage!r}; expected 0, 1, 2 or 3")
    return stage


def gradient_dtype(deepspeed_config: Mapping[str, Any], context: RunContext) -> str:
    """``bf16``/``fp16`` when that section is enabled ("auto" follows the run's mixed precision), else ``fp32``."""
    for dtype, sections in (("bf16", ("bf16", "bfloat16")), ("fp16", ("fp16",))):
        if _enabled(deepspeed_config, sections, auto=context.mixed_precision == dtype):
            return dtype
    return "fp32"


def _enabled(deepspeed_config: Mapping[str, Any], sections: tuple[str, ...], auto: bool = False) -> bool:
    for section in sections:
        enabled = config_value(deepspeed_config, f"{section}.enabled", False)
        if enabled == AUTO:
            return auto
        if enabled is True:
            return True
    return False


def _check_grad_overflow_off(deepspeed_config: Mapping[str, Any]) -> bool:
    return any(
        config_value(deepspeed_config, f"{section}.check_grad_overflow", True) is False
        for section in ("bf16", "bfloat16")
    )
