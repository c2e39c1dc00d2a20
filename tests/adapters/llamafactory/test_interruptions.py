"""``llamafactory-cli train`` killed (SIGKILL) mid-step or mid-save, then resumed, loses nothing.

Every run: the tiny LLaVA with LoRA, 6 steps, a checkpoint every 2, a NaN gradient at step 1 (so the plugins
have a skip counter to carry over). The killed run dies during step 3's backward pass, or while writing
checkpoint-4. The resumed run is the same config without ``overwrite_output_dir``: LLaMA-Factory then finds the
newest ``checkpoint-*`` itself and resumes from it, complete or not, so the adapter must pass over the
half-written checkpoint-4 (and say so), resume from checkpoint-2, and end exactly where an uninterrupted run ends.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("llamafactory", reason="needs the LLaMA-Factory test environment (llamafactory==0.9.5)")

from fault_matrix import KILL_LINE, KILL_ROWS, assert_resumed_exactly  # noqa: E402
from fault_plugin import install as install_fault_plugin  # noqa: E402
from llamafactory_runs import TINY_MODELS, dpo_config, run_llamafactory  # noqa: E402


def train(tmp_path, llava, tiny_dataset_dir, output_dir, *, kill=None, resume=False, name="cfg"):
    config = dpo_config(
        TINY_MODELS["llava"],
        llava,
        tiny_dataset_dir,
        output_dir,
        "lora",
        max_steps=6,
        save_strategy="steps",
        save_steps=2,
        overwrite_output_dir=None if resume else True,
    )
    env = install_fault_plugin(tmp_path / "plugins", fault="grad-nan", steps=[1], kill=kill)
    return run_llamafactory(tmp_path, config, env=env, name=name)


def losses(output_dir, last_step):
    state = json.loads((output_dir / f"checkpoint-{last_step}" / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, llava, tiny_dataset_dir):
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    run = train(tmp_path, llava, tiny_dataset_dir, tmp_path / "out")
    assert run.returncode == 0, run.log()
    return tmp_path / "out"


@pytest.mark.parametrize(
    "kill",
    [pytest.param(kill, marks=pytest.mark.reliability("LLaMA-Factory", row=row)) for kill, row in KILL_ROWS.items()],
)
def test_a_killed_run_resumes_from_its_last_complete_checkpoint_and_loses_nothing(
    tmp_path, llava, tiny_dataset_dir, uninterrupted, kill
):
    output_dir = tmp_path / "out"
    killed = train(tmp_path, llava, tiny_dataset_dir, output_dir, kill=(kill, 3), name="killed")
    assert killed.returncode != 0 and KILL_LINE in killed.output, killed.log()
    expected = ["checkpoint-2", "checkpoint-4"] if kill == "save" else ["checkpoint-2"]
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == expected

    resumed = train(tmp_path, llava, tiny_dataset_dir, output_dir, resume=True, name="resumed")
    assert resumed.returncode == 0, resumed.log()
    if kill == "save":
        assert (
            f"not resuming from {output_dir / 'checkpoint-4'}: its save was interrupted "
            f"(vlm_dpo_saving.rank0 left behind); resuming from {output_dir / 'checkpoint-2'}"
        ) in resumed.output, resumed.log()
    assert_resumed_exactly(output_dir, uninterrupted, last_step=6)
    assert losses(output_dir, 6) == losses(uninterrupted, 6)
