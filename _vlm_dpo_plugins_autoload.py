"""Start-up hook that activates the LLaMA-Factory adapter when LLaMA-Factory's DPO workflow is imported.

Why a ``.pth`` file: LLaMA-Factory has no plugin mechanism, and ``llamafactory-cli`` re-executes
itself under ``torchrun`` (and Ray starts its own workers), so a patch applied by a wrapper script
in one process is lost in the others. ``site`` runs the ``import`` line of
``vlm_dpo_plugins_autoload.pth`` in every Python process of the environment, workers included.

Why a finder for one module name: the hook must cost nothing in programs that never train with
LLaMA-Factory. This module imports only the standard library; ``install()`` adds a
``sys.meta_path`` finder that ignores every import except ``llamafactory.train.dpo``. When that
module has executed, the finder calls ``vlm_dpo_plugins.adapters.llamafactory.activation.activate``
(importing the package only then) and removes itself.

``VLM_DPO_LLAMAFACTORY=0`` (or ``false``, ``off``, ``no``) turns the hook off. ``python -S`` skips
``.pth`` files altogether; call ``activate()`` yourself there.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import warnings

DISABLE_VARIABLE = "VLM_DPO_LLAMAFACTORY"
TARGET_MODULE = "llamafactory.train.dpo"
ACTIVATE = "vlm_dpo_plugins.adapters.llamafactory.activation:activate"
"""``module:function`` called with the imported module (tests point it at a recorder)."""


def is_disabled() -> bool:
    return os.environ.get(DISABLE_VARIABLE, "").strip().lower() in ("0", "false", "off", "no")


def install() -> None:
    """Watch for LLaMA-Factory's DPO workflow; never raises, since it runs during interpreter start-up."""
    try:
        if is_disabled() or any(isinstance(finder, _DPOWorkflowFinder) for finder in sys.meta_path):
            return
        if TARGET_MODULE in sys.modules:
            _activate(sys.modules[TARGET_MODULE])
            return
        sys.meta_path.insert(0, _DPOWorkflowFinder())
    except Exception as error:  # noqa: BLE001 - a broken hook must not break every Python process
        warnings.warn(f"vlm-dpo-plugins: the LLaMA-Factory hook was not installed: {error!r}", stacklevel=1)


def _activate(module: object) -> None:
    module_name, function_name = ACTIVATE.split(":")
    try:
        activate = getattr(importlib.import_module(module_name), function_name)
    except ImportError as error:
        warnings.warn(
            f"vlm-dpo-plugins: cannot load the LLaMA-Factory adapter ({error}); LLaMA-Factory runs without it",
            stacklevel=2,
        )
        return
    # Anything else propagates: a half-patched trainer is worse than a crash naming the cause.
    activate(module)


class _DPOWorkflowFinder:
    """Finds nothing itself; asks the other finders for ``TARGET_MODULE`` and wraps the loader they return."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._searching = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET_MODULE or self._searching:
            return None
        with self._lock:
            self._searching = True  # our own lookup below must not come back here
            try:
                for finder in sys.meta_path:
                    if finder is self or not hasattr(finder, "find_spec"):
                        continue
                    spec = finder.find_spec(fullname, path, target)
                    if spec is not None:
                        break
                else:
                    return None
            finally:
                self._searching = False
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _ActivatingLoader(spec.loader, self)
        return spec


class _ActivatingLoader:
    """Delegates to the real loader, then activates the adapter once the module's code has run."""

    def __init__(self, loader, finder: _DPOWorkflowFinder) -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        _activate(module)

    def __getattr__(self, name):
        # get_source, get_filename, is_package, ... (tracebacks, inspect, pkgutil) come from the real loader.
        return getattr(self._loader, name)
