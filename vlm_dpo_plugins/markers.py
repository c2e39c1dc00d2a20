"""The pluggy markers. Plugins import ``hookimpl`` from the package root."""

import pluggy

PROJECT_NAME = "vlm_dpo_plugins"
"""The pluggy project name, which is also the entry-point group third-party plugins register under."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
