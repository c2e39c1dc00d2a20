"""Settings both a framework's arguments and the plugin config can hold, reconciled from a declarative table.

Every adapter keeps its framework's keys meaning what they meant: a value the user wrote in one place
is used by both, a value written differently in both is an error naming both keys, never a silent choice.
"Written" means present in what the user gave (YAML keys, command-line flags, non-default ``DPOConfig``
fields), not a default. An adapter declares its keys as ``SharedSetting`` rows and its freeze flags as a
``{group: flag}`` table; reconciling, the write-back of the agreed values into the framework's arguments
and the clipping rule are the same for every framework and live here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

from vlm_dpo_plugins.config import VLMDPOConfig
from vlm_dpo_plugins.errors import ConfigError
from vlm_dpo_plugins.validation import FieldError


def _unchanged(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class SharedSetting:
    """One framework key and the plugin key that means the same thing."""

    plugin_key: str
    """``section.name`` in the plugin config."""
    framework_key: str
    """The framework's name for it, as the user writes it and as ``framework_written`` holds it."""
    read: Callable[[Any], Any]
    """The framework's value, from its arguments."""
    to_plugin: Callable[[Any], Any] = _unchanged
    """The framework's value in the plugin config's terms (``max_grad_norm: 0`` is no clipping: ``None``)."""
    written: Callable[[Any, Set[str]], bool] | None = None
    """Whether the user wrote it, when that is more than the key's presence (a key inside a dict flag)."""
    only_for_loss: str | None = None
    """The loss type whose option this is (``simpo_gamma``): with another loss the two sides need not agree."""

    def is_written(self, args: Any, framework_written: Set[str]) -> bool:
        if self.written is not None:
            return self.written(args, framework_written)
        return self.framework_key in framework_written

    @property
    def section(self) -> str:
        return self.plugin_key.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.plugin_key.split(".", 1)[1]


@dataclass(frozen=True)
class KeyNames:
    """How one framework's keys and the plugin config's keys are named in messages."""

    framework: str
    """e.g. ``"swift's --{key}"``."""
    plugin: str
    """e.g. ``"the plugin config's {key}"``."""

    def conflict(self, framework_key: str, framework_value: Any, plugin_key: str, plugin_value: Any) -> ConfigError:
        return ConfigError(
            f"{self.framework.format(key=framework_key)} is {framework_value!r} and "
            f"{self.plugin.format(key=plugin_key)} is {plugin_value!r}: set it in one place"
        )


@dataclass
class Reconciled:
    """The agreed plugin config, who computes the loss, and what to tell the user."""

    config: VLMDPOConfig
    framework_computes_loss: bool
    notes: list[str] = field(default_factory=list)
    framework_keys: str = ""
    """The framework's own keys the user wrote that the agreement read ("swift's --freeze_vit, --beta"), for the
    start line: settings do not come from the plugin config alone."""


def reconcile_shared(
    table: Iterable[SharedSetting],
    args: Any,
    config: VLMDPOConfig,
    plugin_written: Mapping[str, Set[str]],
    framework_written: Set[str],
    names: KeyNames,
) -> dict[str, Any]:
    """``{plugin_key: value}`` for every row that applies: the written side's value, the plugin's when neither."""
    chosen: dict[str, Any] = {}
    for setting in table:
        if config.section(setting.section) is None:
            continue  # its plugin is blocked: the framework's own value stands
        plugin_value = getattr(getattr(config, setting.section), setting.name)
        framework_value = setting.read(args)
        framework_set = setting.is_written(args, framework_written)
        plugin_set = setting.name in plugin_written.get(setting.section, set())
        as_plugin = setting.to_plugin(framework_value)
        if framework_set and plugin_set and as_plugin != plugin_value:
            raise names.conflict(setting.framework_key, framework_value, setting.plugin_key, plugin_value)
        chosen[setting.plugin_key] = as_plugin if framework_set else plugin_value
    return chosen


def with_values(config: VLMDPOConfig, values: Mapping[str, Any], invalid: Callable[[FieldError], str]) -> VLMDPOConfig:
    """``config`` with ``{section.name: value}`` replaced; an invalid combination is a ``ConfigError``."""
    by_section: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        section, name = key.split(".", 1)
        by_section.setdefault(section, {})[name] = value
    try:
        sections = {
            section: dataclasses.replace(getattr(config, section), **changes) for section, changes in by_section.items()
        }
    except FieldError as error:
        raise ConfigError(invalid(error)) from error
    return config.replace(**sections)


def reconcile_freeze_flags(
    config: VLMDPOConfig,
    flags: Mapping[str, str],
    frozen_by_flag: Callable[[str], bool],
    framework_written: Set[str],
    plugin_written: Mapping[str, Set[str]],
    names: KeyNames,
) -> VLMDPOConfig:
    """``freeze.trainable`` from the framework's freeze flags (``{group: flag}``), unless the plugin config says.

    Both written: a flag that disagrees with ``freeze.trainable`` about its group is an error naming both.
    """
    freeze = config.section("freeze")
    if freeze is None:
        return config  # the freeze policy is blocked: the framework's flags decide alone
    if "trainable" not in plugin_written.get("freeze", set()):
        trainable = tuple(group for group, flag in flags.items() if not frozen_by_flag(flag))
        return config.replace(freeze=dataclasses.replace(freeze, trainable=trainable))
    for group, flag in flags.items():
        frozen = bool(frozen_by_flag(flag))
        if flag in framework_written and frozen == (group in freeze.trainable):
            raise ConfigError(
                f"{names.framework.format(key=flag)} is {frozen} and {names.plugin.format(key='freeze.trainable')} "
                f"is {list(freeze.trainable)}: say whether the {group} group trains in one place"
            )
    return config


def frozen_flags(config: VLMDPOConfig, flags: Mapping[str, str]) -> dict[str, bool]:
    """The framework's freeze flags as the policy needs them: every group it ever trains is not frozen.

    So LoRA targets and full-tuning ``requires_grad`` cover the unfreeze stages; the policy freezes the later
    stages' groups again at step 0.
    """
    if config.section("freeze") is None:
        return {}
    ever_trained = config.freeze.groups_ever_trained()
    return {flag: group not in ever_trained for group, flag in flags.items()}


def framework_max_grad_norm(config: VLMDPOConfig, uses_deepspeed: bool, current: float) -> float:
    """What the framework's own ``max_grad_norm`` becomes: the guards clip, per group, inside the guarded step.

    Under DeepSpeed the engine clips (its ``"gradient_clipping": "auto"`` reads this value) and steps inside
    ``backward``; everywhere else the framework's clipping is off so the gradients are not clipped twice. With the
    guards blocked the framework clips as it would alone (``current``).
    """
    if config.section("guards") is None:
        return current
    if uses_deepspeed:
        return config.guards.max_grad_norm or 0.0
    return 0.0


def positive_or_none(value: Any) -> Any:
    """A framework's ``max_grad_norm``: 0 or less turns clipping off, which the plugin config writes as null."""
    return value if value and value > 0 else None


def same_named_settings() -> tuple[SharedSetting, ...]:
    """``beta``, ``label_smoothing`` and ``max_grad_norm`` where the framework's arguments use those names (TRL,
    ms-swift)."""
    return (
        SharedSetting("loss.beta", "beta", read=lambda args: args.beta),
        SharedSetting("loss.label_smoothing", "label_smoothing", read=lambda args: args.label_smoothing),
        SharedSetting(
            "guards.max_grad_norm", "max_grad_norm", read=lambda args: args.max_grad_norm, to_plugin=positive_or_none
        ),
    )


@dataclass(frozen=True)
class FrameworkLoss:
    """What a framework's own arguments say about the loss."""

    key: str
    """Its loss-type key, as the user writes it (``pref_loss``, ``loss_type``)."""
    value: Any
    written: bool
    plugin_type: str | None
    """The registry's name for the same loss (same formula), or None when only the framework has it."""
    own_options: Sequence[str] = ()
    """Written options only the framework's own loss reads (``loss_weights``, ``pref_bco_weight=0.5``)."""
    computes_by_default: bool = False
    """The framework keeps computing its loss unless the plugin config writes ``loss.type`` (ms-swift)."""


@dataclass(frozen=True)
class LossChoice:
    type: str | None
    """None when the framework computes the loss with the loss plugin blocked."""
    framework_computes: bool
    notes: tuple[str, ...] = ()


def choose_loss(framework: str, loss: FrameworkLoss, config: VLMDPOConfig, loss_written: Set[str], names: KeyNames):
    """Who computes the loss and which variant: one loss, set in one place.

    ``loss.type`` written in the plugin config replaces the framework's loss; then a framework loss type or option
    written too is an error naming both. Otherwise the framework's loss type is used when the registry has the same
    formula, and left to the framework (every other hook still runs) when only the framework has it.
    """
    if config.section("loss") is None:
        note = f"the loss plugin is blocked: {framework} computes the loss, every other hook runs"
        return LossChoice(None, framework_computes=True, notes=(note,))
    if "type" in loss_written:
        if loss.written and loss.plugin_type != config.loss.type:
            raise ConfigError(
                f"{names.framework.format(key=loss.key)} is {loss.value!r} and "
                f"{names.plugin.format(key='loss.type')} is {config.loss.type!r}: set the loss in one place "
                f"({names.plugin.format(key='loss.type')} covers every built-in variant, mDPO and MPO included)"
            )
        if loss.own_options:
            raise ConfigError(
                f"{names.framework.format(key=', '.join(loss.own_options))} only applies to its own loss, but "
                f"{names.plugin.format(key='loss.type')} {config.loss.type!r} replaces that loss: drop those, or "
                f"drop {names.plugin.format(key='loss.type')}"
            )
        return LossChoice(config.loss.type, framework_computes=False)
    if loss.computes_by_default or loss.plugin_type is None or loss.own_options:
        reason = ", ".join(loss.own_options) if loss.own_options else f"{loss.key} {loss.value!r}"
        note = (
            f"{framework} computes the loss ({reason}); the plugins' loss variants are not used, every other hook runs"
        )
        return LossChoice(config.loss.type, framework_computes=True, notes=(note,))
    return LossChoice(loss.plugin_type if loss.written else config.loss.type, framework_computes=False)


@dataclass(frozen=True)
class FrameworkSettings:
    """One framework's side of the settings: its keys, its freeze and learning-rate flags, how it is named."""

    framework: str
    """As the user knows it, in notes ("LLaMA-Factory")."""
    arguments: str
    """Where the framework's values come from, in messages ("LLaMA-Factory's arguments", "DPOConfig")."""
    names: KeyNames
    table: tuple[SharedSetting, ...]
    freeze_flags: Mapping[str, str] = field(default_factory=dict)
    """``{group: flag}``, the flag true when the group is frozen."""
    learning_rate_flags: Mapping[str, str] = field(default_factory=dict)
    """``{group: flag}`` for the framework's per-group learning rates (ms-swift's ``--vit_lr``)."""
    loss_only: tuple[str, ...] = ()
    """Plugin keys only the plugins' loss reads: with the framework's loss its own keys keep their values."""

    def reconcile(
        self,
        args: Any,
        config: VLMDPOConfig,
        written: Mapping[str, Set[str]],
        framework_written: Set[str],
        loss: FrameworkLoss,
        *,
        flags_on: Any = None,
    ) -> Reconciled:
        """The agreed config: the loss chosen, the table's keys, the freeze flags and learning rates merged.

        ``flags_on``: the arguments object holding the freeze and learning-rate flags.
        """
        choice = choose_loss(self.framework, loss, config, written.get("loss", set()), self.names)
        table = [row for row in self.table if row.only_for_loss in (None, choice.type)]
        values = reconcile_shared(table, args, config, written, framework_written, self.names)
        if choice.framework_computes:
            values = {key: value for key, value in values.items() if key not in self.loss_only}
        elif choice.type is not None:
            values["loss.type"] = choice.type

        def invalid(error: Exception) -> str:
            loss_values = [f"{loss.key}={loss.value!r}"]
            loss_values += [f"{row.framework_key}={row.read(args)!r}" for row in table if row.section == "loss"]
            return (
                f"{self.arguments} and the plugin config together are invalid: {error}. The value may come from "
                f"{self.arguments} ({', '.join(loss_values)})"
            )

        config = with_values(config, values, invalid)
        if self.freeze_flags:
            config = reconcile_freeze_flags(
                config, self.freeze_flags, lambda flag: getattr(flags_on, flag), framework_written, written, self.names
            )
        if self.learning_rate_flags and config.section("freeze") is not None:
            config = config.replace(freeze=self._learning_rates(config.freeze, flags_on, framework_written))
        keys = self._keys_written(args, framework_written, loss)
        return Reconciled(config, choice.framework_computes, list(choice.notes), keys)

    def _keys_written(self, args: Any, framework_written: Set[str], loss: FrameworkLoss) -> str:
        keys = [loss.key] if loss.written else []
        for row in self.table:
            if row.is_written(args, framework_written):
                keys.append(row.framework_key)
        flags = (*self.freeze_flags.values(), *self.learning_rate_flags.values())
        keys += [flag for flag in flags if flag in framework_written]
        if not keys:
            return ""
        # "swift's --freeze_vit, --beta": the framework named once.
        prefix = self.names.framework.split("{key}")[0]
        prefix = prefix[: prefix.rfind(" ") + 1]
        return ", ".join(
            [self.names.framework.format(key=keys[0])]
            + [self.names.framework.format(key=key)[len(prefix) :] for key in keys[1:]]
        )

    def _learning_rates(self, freeze: Any, flags_on: Any, framework_written: Set[str]) -> Any:
        rates = dict(freeze.learning_rates)
        for group, flag in self.learning_rate_flags.items():
            rate = getattr(flags_on, flag)
            if flag not in framework_written or rate is None:
                continue
            if group in rates and rates[group] != rate:
                raise self.names.conflict(flag, rate, f"freeze.learning_rates.{group}", rates[group])
            rates[group] = rate
        try:
            return dataclasses.replace(freeze, learning_rates=rates)
        except FieldError as error:
            flags = " and ".join(self.names.framework.format(key=flag) for flag in self.learning_rate_flags.values())
            raise ConfigError(
                f"{flags} with the freeze policy are invalid: {error}. A learning rate applies only to a group "
                "that trains (its freeze flag off, or freeze.trainable)"
            ) from error

    def write_back(self, config: VLMDPOConfig, flags_on: Any, training_args: Any, *, uses_deepspeed: bool) -> None:
        """The freeze flags and ``max_grad_norm`` as the plugin config needs them, before the framework reads them."""
        for flag, frozen in frozen_flags(config, self.freeze_flags).items():
            setattr(flags_on, flag, frozen)
        training_args.max_grad_norm = framework_max_grad_norm(config, uses_deepspeed, training_args.max_grad_norm)
