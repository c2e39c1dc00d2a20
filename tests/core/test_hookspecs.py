"""The hook contract: documented, framework-neutral, and callable in each of its three conventions."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from vlm_dpo_plugins import hookimpl, hookspecs
from vlm_dpo_plugins.collation.wrapper import HookedCollator
from vlm_dpo_plugins.manager import create_plugin_manager

SPECS = {name: fn for name, fn in vars(hookspecs).items() if name.startswith("vlm_dpo_") and callable(fn)}
ARCHITECTURE = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def test_every_spec_has_a_one_line_docstring_and_annotations():
    assert len(SPECS) >= 20
    for name, spec in SPECS.items():
        doc = inspect.getdoc(spec)
        assert doc and "\n" not in doc, name
        signature = inspect.signature(spec)
        assert signature.return_annotation is not inspect.Signature.empty, name
        assert all(p.annotation is not inspect.Parameter.empty for p in signature.parameters.values()), name


def test_specs_mention_no_framework():
    source = inspect.getsource(hookspecs)
    assert not re.search(r"\b(import|from)\s+(trl|llamafactory|swift|transformers|deepspeed|peft)\b", source)


def test_architecture_doc_lists_every_hook():
    table = ARCHITECTURE.read_text().split("## The hooks", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(vlm_dpo_[a-z_]+)`", table))
    assert documented == set(SPECS)


def test_a_wrapper_transforms_the_framework_collators_batch():
    class AddPairIndex:
        @hookimpl(wrapper=True)
        def vlm_dpo_collate(self, examples, collate):
            batch = yield
            batch["pair_index"] = list(range(len(examples)))
            return batch

    manager = create_plugin_manager(load_entry_points=False, extra_plugins={"pair_index": AddPairIndex()})
    batch = HookedCollator(manager, lambda rows: {"a": [r["a"] for r in rows]})([{"a": 1}, {"a": 2}])
    assert batch == {"a": [1, 2], "pair_index": [0, 1]}


def test_a_first_result_plugin_overrides_the_builtin_and_none_defers():
    class OnlyForQwen:
        @hookimpl
        def vlm_dpo_classify_parameters(self, model, model_type):
            return {"vision": ["custom"]} if model_type == "qwen2_vl" else None

    import torch

    model = torch.nn.Module()
    model.vision_tower = torch.nn.Linear(1, 1)
    manager = create_plugin_manager(load_entry_points=False, extra_plugins={"qwen": OnlyForQwen()})
    assert manager.hook.vlm_dpo_classify_parameters(model=model, model_type="qwen2_vl") == {"vision": ["custom"]}
    builtin = manager.hook.vlm_dpo_classify_parameters(model=model, model_type="llava")
    assert builtin["vision"] == ["vision_tower.weight", "vision_tower.bias"]
