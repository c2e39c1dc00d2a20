"""The start-up hook: installed with the package, free for programs without LLaMA-Factory, fires once.

Each case runs a fresh interpreter, since what matters happens at start-up. A fake
``llamafactory.train.dpo`` package on ``PYTHONPATH`` stands in for LLaMA-Factory, and the hook's
target is pointed at a recorder module that writes what it was called with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

import _vlm_dpo_plugins_autoload as autoload

PTH_NAME = "vlm_dpo_plugins_autoload.pth"


def installed_pth() -> Path | None:
    for folder in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        if (Path(folder) / PTH_NAME).exists():
            return Path(folder) / PTH_NAME
    return None


@pytest.fixture
def fake_llamafactory(tmp_path: Path) -> Path:
    """``llamafactory.train.dpo`` defining ``run_dpo``, plus a recorder the hook is pointed at."""
    dpo = tmp_path / "llamafactory" / "train" / "dpo"
    dpo.mkdir(parents=True)
    (tmp_path / "llamafactory" / "__init__.py").write_text("")
    (tmp_path / "llamafactory" / "train" / "__init__.py").write_text("")
    (dpo / "__init__.py").write_text("def run_dpo():\n    return 'stock'\n")
    (tmp_path / "recorder.py").write_text(
        textwrap.dedent(
            """
            import json, os

            import sys

            def activate(module):
                call = {
                    "name": module.__name__,
                    "has_run_dpo": hasattr(module, "run_dpo"),
                    "is_the_imported_module": module is sys.modules.get(module.__name__),
                }
                with open(os.environ["RECORD"], "a") as record:
                    record.write(json.dumps(call) + "\\n")
            """
        )
    )
    return tmp_path


def run_python(code: str, root: Path, **environment: str) -> list[dict]:
    """Runs ``code`` with the hook pointed at the recorder; returns the calls the recorder saw."""
    record = root / "record.jsonl"
    record.unlink(missing_ok=True)
    completed = run_hook_pointed_at("recorder:activate", textwrap.dedent(code), root, RECORD=str(record), **environment)
    assert completed.returncode == 0, completed.stderr
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def run_hook_pointed_at(target: str, code: str, root: Path, **environment: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != autoload.DISABLE_VARIABLE}
    env.update(PYTHONPATH=os.pathsep.join([str(root), env.get("PYTHONPATH", "")]), **environment)
    # The finder the .pth installed at start-up stays the only one (install() is idempotent); ACTIVATE is
    # read when it fires, so pointing it elsewhere here is enough. Without the .pth, install() adds the finder.
    prelude = f"import _vlm_dpo_plugins_autoload as hook; hook.ACTIVATE = {target!r}; hook.install()\n"
    return subprocess.run([sys.executable, "-c", prelude + code], env=env, capture_output=True, text=True, timeout=60)


def require_installed_package() -> None:
    import importlib.metadata

    try:
        importlib.metadata.distribution("vlm-dpo-plugins")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vlm-dpo-plugins is not installed in this environment (the .pth comes with the install)")


def test_pth_is_installed_with_the_package():
    require_installed_package()
    path = installed_pth()
    assert path is not None, f"{PTH_NAME} is not in site-packages: LLaMA-Factory would run without the adapter"
    assert path.read_text().strip() == "import _vlm_dpo_plugins_autoload; _vlm_dpo_plugins_autoload.install()"


def test_start_up_installs_the_finder_and_imports_nothing_heavy():
    require_installed_package()
    probe = (
        "import sys; print(sorted(m for m in sys.modules if m.startswith(('vlm_dpo', '_vlm_dpo', 'torch', 'pluggy'))));"
        "print([type(finder).__name__ for finder in sys.meta_path][0])"
    )
    env = {key: value for key, value in os.environ.items() if key != autoload.DISABLE_VARIABLE}
    completed = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    assert completed.stdout.split("\n")[:2] == ["['_vlm_dpo_plugins_autoload']", "_DPOWorkflowFinder"]


def test_the_hook_imports_only_itself():
    # -S: no other .pth file of the environment loads modules that would hide what the hook imports.
    probe = (
        "import os, sys; before = set(sys.modules); sys.path.insert(0, sys.argv[1]);"
        "import _vlm_dpo_plugins_autoload as hook; hook.install(); print(sorted(set(sys.modules) - before))"
    )
    hook_folder = str(Path(autoload.__file__).parent)
    completed = subprocess.run(
        [sys.executable, "-S", "-c", probe, hook_folder], capture_output=True, text=True, timeout=60, check=True
    )
    assert completed.stdout.strip() == "['_vlm_dpo_plugins_autoload']"


def test_fires_once_after_the_dpo_package_ran(fake_llamafactory):
    calls = run_python(
        """
        import llamafactory.train.dpo
        import importlib, sys
        del sys.modules["llamafactory.train.dpo"]
        importlib.import_module("llamafactory.train.dpo")  # a re-import does not fire again
        """,
        fake_llamafactory,
    )
    assert calls == [{"name": "llamafactory.train.dpo", "has_run_dpo": True, "is_the_imported_module": True}]


def test_concurrent_imports_fire_once(fake_llamafactory):
    calls = run_python(
        """
        import threading
        threads = [threading.Thread(target=__import__, args=("llamafactory.train.dpo",)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        """,
        fake_llamafactory,
    )
    assert len(calls) == 1


def test_the_module_keeps_its_own_loader(fake_llamafactory):
    run_python(
        """
        import importlib.machinery, inspect
        import llamafactory.train.dpo as dpo
        assert type(dpo.__loader__) is importlib.machinery.SourceFileLoader, dpo.__loader__
        assert dpo.__spec__.loader is dpo.__loader__
        assert "def run_dpo" in inspect.getsource(dpo)
        """,
        fake_llamafactory,
    )


def test_parent_packages_do_not_fire(fake_llamafactory):
    assert run_python("import llamafactory, llamafactory.train", fake_llamafactory) == []


def test_already_imported_module_activates_at_install(fake_llamafactory):
    calls = run_python(
        """
        import sys
        hook.install()  # the finder is installed already: no second one
        assert sum(type(f).__name__ == "_DPOWorkflowFinder" for f in sys.meta_path) == 1
        import llamafactory.train.dpo
        assert not any(type(f).__name__ == "_DPOWorkflowFinder" for f in sys.meta_path)  # one-shot
        hook.install()  # the module is there already: activates at once
        """,
        fake_llamafactory,
    )
    assert [call["name"] for call in calls] == ["llamafactory.train.dpo"] * 2


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no"])
def test_disable_variable(fake_llamafactory, value):
    assert run_python("import llamafactory.train.dpo", fake_llamafactory, **{autoload.DISABLE_VARIABLE: value}) == []


@pytest.mark.parametrize("target", ["no_such_module:activate", "recorder:no_such_function", "fake_adapter:needs_trl"])
def test_missing_adapter_warns_and_lets_the_import_succeed(fake_llamafactory, target):
    (fake_llamafactory / "fake_adapter.py").write_text("def needs_trl(module):\n    import no_such_trl\n")
    completed = run_hook_pointed_at(
        target, "import llamafactory.train.dpo as dpo; print(dpo.run_dpo())", fake_llamafactory
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "stock"
    assert completed.stderr.count("cannot load the LLaMA-Factory adapter") == 1


def test_a_failing_activation_fails_the_import(fake_llamafactory):
    (fake_llamafactory / "fake_adapter.py").write_text(
        "def half_patch(module):\n    raise RuntimeError('half-patched')\n"
    )
    completed = run_hook_pointed_at("fake_adapter:half_patch", "import llamafactory.train.dpo", fake_llamafactory)
    assert completed.returncode != 0
    assert "RuntimeError: half-patched" in completed.stderr
