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

            def activate(module):
                call = {"name": module.__name__, "has_run_dpo": hasattr(module, "run_dpo")}
                with open(os.environ["RECORD"], "a") as record:
                    record.write(json.dumps(call) + "\\n")
            """
        )
    )
    return tmp_path


def run_python(code: str, root: Path, **environment: str) -> list[dict]:
    record = root / "record.jsonl"
    record.unlink(missing_ok=True)
    env = {key: value for key, value in os.environ.items() if key != autoload.DISABLE_VARIABLE}
    env.update(PYTHONPATH=os.pathsep.join([str(root), env.get("PYTHONPATH", "")]), RECORD=str(record), **environment)
    # The hook installed by the .pth is re-installed pointing at the recorder (ACTIVATE is read when it fires).
    prelude = "import _vlm_dpo_plugins_autoload as hook; hook.ACTIVATE = 'recorder:activate'; hook.install()\n"
    completed = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stderr
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def test_pth_is_installed_with_the_package():
    import importlib.metadata

    try:
        importlib.metadata.distribution("vlm-dpo-plugins")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vlm-dpo-plugins is not installed in this environment (the .pth comes with the install)")
    path = installed_pth()
    assert path is not None, f"{PTH_NAME} is not in site-packages: LLaMA-Factory would run without the adapter"
    assert path.read_text().strip() == "import _vlm_dpo_plugins_autoload; _vlm_dpo_plugins_autoload.install()"


@pytest.mark.skipif(installed_pth() is None, reason="needs the installed .pth")
def test_start_up_imports_nothing_heavy():
    probe = (
        "import sys; print(sorted(m for m in sys.modules if m.startswith(('vlm_dpo', '_vlm_dpo', 'torch', 'pluggy'))))"
    )
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
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
    assert calls == [{"name": "llamafactory.train.dpo", "has_run_dpo": True}]


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


def test_missing_adapter_warns_and_lets_the_import_succeed(fake_llamafactory):
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import _vlm_dpo_plugins_autoload as hook; hook.ACTIVATE = 'no_such_module:activate'; hook.install()\n"
            "import llamafactory.train.dpo as dpo; print(dpo.run_dpo())",
        ],
        env={**os.environ, "PYTHONPATH": str(fake_llamafactory)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "stock"
    assert "cannot load the LLaMA-Factory adapter" in completed.stderr
