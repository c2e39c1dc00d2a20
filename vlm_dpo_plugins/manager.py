"""The plugin manager: built-in plugins registered explicitly, third-party ones from entry points.

Environment variables (read when a manager is created):
- ``VLM_DPO_LOAD_PLUGINS``: which third-party entry points to load. Unset: all of
  them; empty or ``none``: none; ``a,b``: only those names.
- ``VLM_DPO_BLOCK_PLUGINS``: names of plugins (built-in or third-party) to block,
  e.g. ``guards`` to run without the stability guards.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pluggy

from vlm_dpo_plugins import hookspecs
from vlm_dpo_plugins.config import VLMDPOConfig, read_yaml
from vlm_dpo_plugins.errors import ConfigError, PluginError, VLMDPOError
from vlm_dpo_plugins.markers import PROJECT_NAME, hookimpl
from vlm_dpo_plugins.plugin_calls import attribute, check_loss_output
from vlm_dpo_plugins.shown import clipped, shown
from vlm_dpo_plugins.validation import nearest

ENTRY_POINT_GROUP = PROJECT_NAME
LOAD_PLUGINS_ENV = "VLM_DPO_LOAD_PLUGINS"
BLOCK_PLUGINS_ENV = "VLM_DPO_BLOCK_PLUGINS"


def builtin_plugins() -> dict[str, object]:
    """A fresh instance of every built-in plugin, by registration name (instances hold per-run state)."""
    from vlm_dpo_plugins.collation.plugin import PairChecks
    from vlm_dpo_plugins.diagnostics.plugin import Diagnostics
    from vlm_dpo_plugins.freeze.plugin import FreezePolicy
    from vlm_dpo_plugins.guards.deepspeed import DeepSpeedTuning
    from vlm_dpo_plugins.guards.plugin import StabilityGuards
    from vlm_dpo_plugins.losses.plugin import LossVariants
    from vlm_dpo_plugins.sharing.plugin import PromptSharing

    return {
        "freeze": FreezePolicy(),
        "collation": PairChecks(),
        "losses": LossVariants(),
        "guards": StabilityGuards(),
        "deepspeed": DeepSpeedTuning(),
        "diagnostics": Diagnostics(),
        "sharing": PromptSharing(),
    }


class LossRegistryDispatch:
    """The last answer to ``vlm_dpo_compute_loss``: the variant registered under ``loss.type``, whoever registered it.

    Part of the manager, not of a built-in plugin, so a third-party variant registered with
    ``vlm_dpo_loss_functions`` alone is called, and wrappers of ``vlm_dpo_compute_loss`` see every variant.
    """

    def __init__(self, manager: VLMDPOPluginManager) -> None:
        self.manager = manager

    @hookimpl(trylast=True)
    def vlm_dpo_compute_loss(self, logps: Any, config: VLMDPOConfig) -> Any:
        registry = self.manager.loss_functions()
        function = registry.get(config.loss.type)
        if function is None:
            raise PluginError(f"no plugin registers loss.type {config.loss.type!r} (vlm_dpo_loss_functions)")
        owner = self.manager.loss_function_owners().get(config.loss.type, "?")
        variant = f"the loss variant {config.loss.type!r} of plugin {self.manager.describe(owner)}"
        try:
            output = function(logps, config.loss)
        except VLMDPOError:
            raise
        except Exception as error:
            if self.manager.is_builtin(owner):
                raise
            raise PluginError(f"{variant} failed: {type(error).__name__}: {clipped(str(error), 300)}") from error
        problem = check_loss_output(output)
        if problem is not None:
            raise PluginError(f"{variant} returned {shown(output)}, {problem}")
        return output


LOSS_DISPATCH = "loss-registry"
"""The registration name of the manager's ``LossRegistryDispatch``."""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    source: str  # "builtin" or "entry point <dist> <version>"
    hooks: tuple[str, ...]


class VLMDPOPluginManager(pluggy.PluginManager):
    def __init__(self) -> None:
        super().__init__(PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self._sources: dict[str, str] = {}

    def register(self, plugin: object, name: str | None = None) -> str | None:
        """Register a plugin that is not a built-in: its errors and answers are attributed to it (plugin_calls)."""
        return self._register(plugin, name, builtin=False)

    def register_builtin(self, name: str, plugin: object) -> None:
        if self._register(plugin, name, builtin=True) is not None:
            self._sources[name] = "builtin"

    def _register(self, plugin: object, name: str | None, builtin: bool) -> str | None:
        registered = super().register(plugin, name=name)
        if registered is None:  # blocked
            return None
        for caller in self.get_hookcallers(plugin) or ():
            for implementation in caller.get_hookimpls():
                if implementation.plugin is plugin:
                    attribute(implementation, caller.name, lambda: self.describe(registered), third_party=not builtin)
        return registered

    def describe(self, name: str) -> str:
        """The plugin as messages name it: its registration name and where it came from."""
        return f"'{name}' ({self._sources.get(name, 'registered at run time')})"

    def is_builtin(self, name: str) -> bool:
        return self._sources.get(name) == "builtin"

    def load_entry_points(self, allowed: set[str] | None = None) -> list[str]:
        """Register every installed ``vlm_dpo_plugins`` entry point (or only ``allowed`` names); return their names."""
        loaded = []
        entry_points = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
        if allowed:
            _reject_unknown_names(allowed, {entry_point.name for entry_point in entry_points}, self)
        for entry_point in entry_points:
            if allowed is not None and entry_point.name not in allowed:
                continue
            if self.is_blocked(entry_point.name):
                continue
            distribution = entry_point.dist
            origin = f"{distribution.name} {distribution.version}" if distribution else "unknown distribution"
            if self.has_plugin(entry_point.name):
                taken_by = "the built-in plugin" if self.is_builtin(entry_point.name) else "the plugin"
                raise PluginError(
                    f"the entry point '{entry_point.name}' of {origin} ({entry_point.value}) has the name of "
                    f"{taken_by} {self.describe(entry_point.name)}, so it cannot be registered. Fix: rename the "
                    f"entry point in that distribution, or uninstall it, or load only other plugins with "
                    f"{LOAD_PLUGINS_ENV}=name,name"
                )
            try:
                plugin = entry_point.load()
            except Exception as error:
                raise PluginError(
                    f"plugin '{entry_point.name}' from {origin} ({entry_point.value}) failed to import: {error!r}. "
                    f"Fix or uninstall it, or leave it out with {LOAD_PLUGINS_ENV}/{BLOCK_PLUGINS_ENV}."
                ) from error
            self.register(plugin, name=entry_point.name)
            self._sources[entry_point.name] = f"entry point, {origin}"
            loaded.append(entry_point.name)
        return loaded

    def check_pending(self) -> None:
        """Fail loudly when a plugin implements a hook that does not exist (usually a misspelled name)."""
        try:
            super().check_pending()
        except pluggy.PluginValidationError as error:
            raise PluginError(f"{error}; see vlm_dpo_plugins/hookspecs.py for the hook names") from error

    def collect_states(self) -> dict[str, Any]:
        """Every plugin's ``vlm_dpo_state_dict`` by its key; two plugins claiming one key is an error naming both."""
        states: dict[str, Any] = {}
        owners: dict[str, str] = {}
        for implementation in self.hook.vlm_dpo_state_dict.get_hookimpls():
            entry = implementation.function()
            if entry is None:
                continue
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)):
                raise PluginError(
                    f"plugin '{implementation.plugin_name}': vlm_dpo_state_dict returned {type(entry).__name__}; "
                    "expected (key, state) with a string key, or None"
                )
            key, state = entry
            if key in owners:
                raise PluginError(
                    f"plugins '{owners[key]}' and '{implementation.plugin_name}' both save their checkpoint state "
                    f"under the key {key!r}: one would overwrite the other on resume; give one plugin another key"
                )
            owners[key] = implementation.plugin_name
            states[key] = state
        return states

    def list_plugins(self) -> list[PluginInfo]:
        infos = []
        for name, plugin in self.list_name_plugin():
            if plugin is None:  # blocked
                continue
            hooks = tuple(sorted(caller.name for caller in self.get_hookcallers(plugin) or ()))
            infos.append(PluginInfo(name=name, source=self._sources.get(name, "registered at run time"), hooks=hooks))
        return infos

    # -- config -----------------------------------------------------------

    def config_sections(self) -> dict[str, type]:
        """Every config section the loaded plugins declare, by name; one name declared twice names both plugins."""
        sections: dict[str, type] = {}
        owners: dict[str, str] = {}
        for implementation in self.hook.vlm_dpo_config_sections.get_hookimpls():
            declared = implementation.function() or {}
            owner = implementation.plugin_name
            if not isinstance(declared, Mapping):
                raise PluginError(f"plugin '{owner}': vlm_dpo_config_sections returned {type(declared).__name__}")
            for name, kind in declared.items():
                if not (isinstance(name, str) and isinstance(kind, type) and dataclasses.is_dataclass(kind)):
                    raise PluginError(
                        f"plugin '{owner}': vlm_dpo_config_sections must map section names to dataclass types, "
                        f"got {name!r}: {kind!r}"
                    )
                if name in owners:
                    raise PluginError(
                        f"plugins '{owners[name]}' and '{owner}' both declare the config section {name!r}"
                    )
                owners[name], sections[name] = owner, kind
        return sections

    def load_config(self, data: VLMDPOConfig | Mapping[str, Any] | str | os.PathLike | None = None) -> VLMDPOConfig:
        """Build and validate the config from a dict or YAML path, in the sections the plugins declare.

        A ``VLMDPOConfig`` built by hand gets the declared sections it lacks, at their defaults.
        """
        sections = self.config_sections()
        if isinstance(data, VLMDPOConfig):
            unknown = sorted(set(data.sections) - set(sections))
            if unknown:
                raise ConfigError(
                    f"config section(s) {unknown} belong to no loaded plugin; sections: {sorted(sections)}"
                )
            defaults = VLMDPOConfig.from_dict({}, sections=sections).sections
            config = VLMDPOConfig(**{**defaults, **data.sections})
        else:
            raw = dict(data or {}) if data is None or isinstance(data, Mapping) else read_yaml(data)
            blocked = sorted(name for name, plugin in self.list_name_plugin() if plugin is None)
            orphans = sorted(set(raw) - set(sections))
            if orphans and blocked:
                raise ConfigError(
                    f"config section(s) {orphans} belong to no loaded plugin; blocked plugins: {blocked} "
                    f"({BLOCK_PLUGINS_ENV}): remove the section(s) or unblock the plugin"
                )
            config = VLMDPOConfig.from_dict(raw, sections=sections)
        self.validate_loss_type(config)
        return config

    def default_config(self) -> VLMDPOConfig:
        """Every declared section at its defaults: the fixes, with nothing configured."""
        return self.load_config(None)

    def loss_functions(self) -> dict[str, Any]:
        return {name: function for name, (function, _) in self._loss_registry().items()}

    def loss_function_owners(self) -> dict[str, str]:
        """The plugin that registers each loss variant, by variant name."""
        return {name: owner for name, (_, owner) in self._loss_registry().items()}

    def _loss_registry(self) -> dict[str, tuple[Any, str]]:
        registry: dict[str, tuple[Any, str]] = {}
        for implementation in self.hook.vlm_dpo_loss_functions.get_hookimpls():
            if implementation.wrapper or implementation.hookwrapper:
                continue
            contribution = implementation.function() or {}
            owner = implementation.plugin_name
            if not isinstance(contribution, Mapping):
                raise PluginError(
                    f"plugin {self.describe(owner)}: vlm_dpo_loss_functions returned {shown(contribution)}; expected "
                    "a mapping of variant names to functions"
                )
            for name, function in contribution.items():
                if not (isinstance(name, str) and callable(function)):
                    raise PluginError(
                        f"plugin {self.describe(owner)}: vlm_dpo_loss_functions maps {shown(name)} to "
                        f"{shown(function)}; expected a variant name and its function"
                    )
                if name in registry and registry[name][0] is not function:
                    raise PluginError(
                        f"plugins {self.describe(registry[name][1])} and {self.describe(owner)} both register the "
                        f"loss variant '{name}'"
                    )
                registry[name] = (function, owner)
        return registry

    def validate_loss_type(self, config: VLMDPOConfig) -> None:
        if config.section("loss") is None:
            return  # the loss plugin is blocked: the framework computes its own loss
        names = sorted(self.loss_functions())
        if config.loss.type not in names:
            raise ConfigError(f"'loss.type' is {shown(config.loss.type)}; registered variants: {names}"
                              f"{nearest(config.loss.type, names)}")


def _names_from_env(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    if value is None:
        return None
    value = value.strip()
    if value.lower() in ("", "none"):
        return set()
    return {name.strip() for name in value.split(",") if name.strip()}


def _reject_unknown_names(allowed: set[str], installed: set[str], manager: VLMDPOPluginManager) -> None:
    # Built-ins (blocked ones too) are always there: naming one is redundant, not a typo.
    registered_or_blocked = {name for name, _ in manager.list_name_plugin()}
    unknown = sorted(allowed - installed - registered_or_blocked)
    if unknown:
        known = ", ".join(sorted(installed)) or "none installed"
        raise PluginError(
            f"{LOAD_PLUGINS_ENV} names {unknown}, which no installed plugin entry point is called; entry points "
            f"in the '{ENTRY_POINT_GROUP}' group: {known}. Fix the names, or install the plugin"
        )


def create_plugin_manager(
    *,
    load_entry_points: bool = True,
    block: Iterable[str] = (),
    extra_plugins: Mapping[str, object] | None = None,
) -> VLMDPOPluginManager:
    """A new manager with the built-ins, the allowed entry points and ``extra_plugins``, validated."""
    manager = VLMDPOPluginManager()
    for name in set(block) | (_names_from_env(BLOCK_PLUGINS_ENV) or set()):
        manager.set_blocked(name)
    for name, plugin in builtin_plugins().items():
        manager.register_builtin(name, plugin)
    manager.register_builtin(LOSS_DISPATCH, LossRegistryDispatch(manager))
    for name, plugin in (extra_plugins or {}).items():
        manager.register(plugin, name=name)
    if load_entry_points:
        manager.load_entry_points(allowed=_names_from_env(LOAD_PLUGINS_ENV))
    manager.check_pending()
    return manager
