"""Errors a user sees. Each message names what is wrong and how to fix it."""


class VLMDPOError(Exception):
    """Base class for every error this package raises on purpose."""


class ConfigError(VLMDPOError, ValueError):
    """A configuration key or value is invalid; the message names the key and a suggestion."""


class MissingSection(ConfigError, AttributeError):
    """The config has no such section: no loaded plugin declares it (``hasattr`` is False, the message says why)."""


class PluginError(VLMDPOError, RuntimeError):
    """A plugin could not be loaded or implements a hook wrongly."""


class TrainingHalted(VLMDPOError, RuntimeError):
    """A guard stopped training on purpose; the message names the cause and the settings to change."""
