"""Start-up hook that activates the LLaMA-Factory adapter when LLaMA-Factory's DPO workflow is imported.

Why a ``.pth`` file: LLaMA-Factory has no plugin mechanism, and ``llamafactory-cli`` re-executes
itself under ``torchrun`` (and Ray starts its own workers), so a patch applied by a wrapper script
in one process is lost in the others. ``site`` runs the ``import`` line of
``vlm_dpo_plugins_autoload.pth`` in every Python process of the environment, workers included.

Why a finder for exactly ``llamafactory.train.dpo``: the hook must cost nothing elsewhere, so this
module imports only the standard library and ``install()`` puts in front of ``sys.meta_path`` a
finder that ignores every other name (``llamafactory`` alone, e.g. the web UI or chat, stays
untouched). ``train/tuner.py`` binds ``run_dpo`` from that package right after importing it, so the
finder wraps the package's loader: once the package's code has run, and before the importer goes on,
it calls ``vlm_dpo_plugins.adapters.llamafactory.activation.activate(module)`` (our package is
imported only then) and removes itself. If the adapter cannot be imported, a warning says so and
LLaMA-Factory trains without it; any other error from ``activate`` fails the import.

Turn it off with ``VLM_DPO_LLAMAFACTORY=0`` (or ``false``, ``off``, ``no``). ``python -S`` (and any
interpreter started without ``site``) skips ``.pth`` files: there, call ``activate()`` yourself
after importing ``llamafactory.train.dpo``.
"""

# Only what the interpreter has loaded before site runs (_thread is threading's built-in core): every Python
# process of the environment imports this module, so importlib, warnings and threading are imported on use.
import _thread
import os
import sys

DISABLE_VARIABLE = "VLM_DPO_LLAMAFACTORY"
TARGET_MODULE = "llamafactory.train.dpo"
ACTIVATE = "vlm_dpo_plugins.adapters.llamafactory.activation:activate"
"""``module:function`` called with the imported module; read when the hook fires, so tests can point it elsewhere."""


def is_disabled() -> bool:
    return os.environ.get(DISABLE_VARIABLE, "").strip().lower() in ("0", "false", "off", "no")


def install() -> None:
    """Watch for LLaMA-Factory's DPO workflow. Raises nothing of its own: it runs in every interpreter start-up."""
    try:
        if is_disabled() or any(isinstance(finder, _DPOWorkflowFinder) for finder in sys.meta_path):
            return
        already_imported = sys.modules.get(TARGET_MODULE)
        if already_imported is None:
            # In front: the path-based finders behind it would otherwise load the module without us.
            sys.meta_path.insert(0, _DPOWorkflowFinder())
            return
    except Exception as error:  # noqa: BLE001 - a broken hook must not break every Python process
        import warnings

        warnings.warn(f"vlm-dpo-plugins: the LLaMA-Factory hook was not installed: {error!r}", stacklevel=2)
        return
    # Outside the guard: only reachable after start-up, and a failed activation must not pass silently.
    _activate(already_imported)


def _activate(module: object) -> None:
    import importlib

    module_name, function_name = ACTIVATE.split(":")
    try:
        activate = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        _warn_adapter_unavailable(error)
        return
    try:
        activate(module)
    except ImportError as error:
        # activate() imports what it needs before patching anything, so LLaMA-Factory is still stock here.
        _warn_adapter_unavailable(error)
    # Anything else propagates: a half-patched trainer is worse than a crash naming the cause.


def _warn_adapter_unavailable(error: Exception) -> None:
    import warnings

    warnings.warn(
        f"vlm-dpo-plugins: cannot load the LLaMA-Factory adapter ({ACTIVATE}: {error}); LLaMA-Factory runs without it",
        stacklevel=2,
    )


class _DPOWorkflowFinder:
    """Finds nothing itself: asks the other finders for ``TARGET_MODULE`` and wraps the loader they return."""

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._fired = False
        # Per thread, so one thread's lookup does not hide the module from another thread's import.
        self._lookup = _thread._local()

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET_MODULE or getattr(self._lookup, "active", False):
            return None
        # A finder below may call importlib.util.find_spec for the same name, which would come back here.
        self._lookup.active = True
        try:
            spec = self._spec_from_other_finders(fullname, path, target)
        finally:
            self._lookup.active = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _ActivatingLoader(spec.loader, spec, self)
        return spec

    def _spec_from_other_finders(self, fullname, path, target):
        for finder in list(sys.meta_path):  # a copy: finders may come and go while we look
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None

    def fire_once(self, module) -> None:
        # Two loads can be under way at once (threads, importlib.util.module_from_spec); one activation.
        with self._lock:
            if self._fired:
                return
            self._fired = True
            if self in sys.meta_path:
                sys.meta_path.remove(self)
        _activate(module)


class _ActivatingLoader:
    """Delegates to the real loader, then activates the adapter once the module's code has run."""

    def __init__(self, loader, spec, finder: _DPOWorkflowFinder) -> None:
        self._loader = loader
        self._spec = spec
        self._finder = finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        # Only the load goes through us: afterwards reload, pickling, pkg_resources and isinstance checks
        # see LLaMA-Factory's own loader.
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self._loader
        if self._spec.loader is self:
            self._spec.loader = self._loader
        self._finder.fire_once(module)

    def __getattr__(self, name):
        # get_source, get_filename, is_package, ... (tracebacks, inspect, importlib.resources) during the load.
        return getattr(self._loader, name)
