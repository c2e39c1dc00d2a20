"""The core must stay importable next to any framework: importing it pulls in no framework."""

from __future__ import annotations

import json
import subprocess
import sys

FRAMEWORKS = ("trl", "llamafactory", "swift", "transformers", "peft", "deepspeed", "accelerate", "datasets")


def modules_after(statement: str) -> set[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return {name.split(".")[0] for name in json.loads(output.splitlines()[-1])}


def test_import_package_imports_no_framework_and_not_torch():
    loaded = modules_after("import vlm_dpo_plugins")
    assert loaded.isdisjoint(FRAMEWORKS)
    assert "torch" not in loaded  # keeps the LLaMA-Factory import hook and `vlm-dpo --help` cheap


def test_plugin_manager_and_builtins_import_no_framework():
    loaded = modules_after(
        "from vlm_dpo_plugins.manager import create_plugin_manager; create_plugin_manager(load_entry_points=False)"
    )
    assert loaded.isdisjoint(FRAMEWORKS)
    assert "pluggy" in loaded and "torch" in loaded
