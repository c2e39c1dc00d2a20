"""``sharing.reference: precompute`` through ``swift rlhf --rlhf_type dpo``: the same training as the live reference.

Swift encodes its rows lazily, each when drawn: the pass draws every one through swift's template and the
collation hooks, and the steps find each pair's entry by what swift encoded. Full tuning releases swift's
separate reference model after the pass; LoRA skips the adapter-off pass in every step.
"""

from __future__ import annotations

import re
import shutil

import pytest

swift = pytest.importorskip("swift", reason="needs the ms-swift test environment (ms-swift==4.6.0)")
if getattr(swift, "__file__", None) is None:
    pytest.skip("`swift` is not ms-swift here", allow_module_level=True)

import yaml  # noqa: E402

PASS_LINE = re.compile(r"sharing\.reference: precompute: (\d+) training pair\(s\): (\d+) computed, (\d+) read from")
RELEASED = "vlm-dpo: sharing.reference: the separate reference model is released from memory"


def run(tmp_path, swift_dpo, model, plugin_file, tuner, sharing, name):
    folder = tmp_path / name
    folder.mkdir()
    config = folder / "vlm_dpo.yaml"
    config.write_text(yaml.safe_dump({"loss": {"type": "sigmoid"}, "sharing": sharing}))
    # SGD: AdamW turns fp32 rounding in a near-zero gradient into a step of the full learning rate.
    options = ["--tuner_type", tuner, "--optim", "sgd", "--learning_rate", "0.1", "--external_plugins", plugin_file]
    finished = swift_dpo(model, max_steps=4, extra_args=options, env_extra={"VLM_DPO_CONFIG": str(config)})
    assert finished.returncode == 0, finished.tail()
    text, logged = finished.stdout + finished.stderr, finished.logged_steps()
    shutil.rmtree(finished.output_dir)  # the factory writes every run to the same folder
    return text, logged


@pytest.mark.model_support("ms-swift", "precompute")
@pytest.mark.parametrize(
    ("family", "tuner"), [("qwen2_vl", "full"), ("qwen2_vl", "lora"), ("llava", "full"), ("qwen2_5_vl", "lora")]
)
def test_precomputed_reference_trains_like_the_live_one(tmp_path, request, swift_dpo, family, tuner, plugin_file):
    model = request.getfixturevalue(family)
    precomputed = {"reference": "precompute", "reference_cache": str(tmp_path / "reference-cache")}
    text, steps = run(tmp_path, swift_dpo, model, plugin_file, tuner, precomputed, "first")
    live_text, live_steps = run(tmp_path, swift_dpo, model, plugin_file, tuner, {}, "live")
    assert PASS_LINE.findall(text) == [("4", "4", "0")], text[-3000:]
    assert (RELEASED in text) == (tuner == "full")
    assert PASS_LINE.search(live_text) is None
    assert len(steps) == len(live_steps) == 4  # two epochs over the four pairs
    for mine, theirs in zip(steps, live_steps, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/chosen", "rewards/rejected"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-5), (key, mine, theirs)
    again_text, again = run(tmp_path, swift_dpo, model, plugin_file, tuner, precomputed, "again")
    assert PASS_LINE.findall(again_text) == [("4", "0", "4")], again_text[-3000:]
    assert [entry["loss"] for entry in again] == [entry["loss"] for entry in steps]
