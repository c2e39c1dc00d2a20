"""``llamafactory-cli train`` killed (SIGKILL) mid-step or mid-save, then resumed, loses nothing.

Every run: the tiny LLaVA with LoRA, 6 steps, a checkpoint every 2, a NaN gradient at step 1 (so the plugins
have a skip counter to carry over). The killed run dies during step 3's backward pass, or while writing
checkpoint-4. The resumed run is the same config without ``overwrite_output_dir``: LLaMA-Factory then finds the
newest ``checkpoint-*`` itself and resumes from it, complete or not, so the adapter must pass over the
half-written checkpoint-4 (and say so), resume from checkpoint-2, and end exactly where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest

pytest.importorskip("llamafactory", reason="needs the LLaMA-Factory test environment (llamafactory==0.9.5)")

from fault_matrix import KILL_LINE, KILL_ROWS, assert_resumed_exactly  # noqa: E402
from fault_plugin import install as install_fault_plugin  # noqa: E402
from llamafactory_runs import TINY_MODELS, dpo_config, run_llamafactory  # noqa: E402

LN2 = math.log(2)


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


def full_tuning(tmp_path, llava, tiny_dataset_dir, output_dir, *, env=None, resume=False, name="full"):
    config = dpo_config(
        TINY_MODELS["llava"],
        llava,
        tiny_dataset_dir,
        output_dir,
        "full",
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        save_only_model=False,
        overwrite_output_dir=None if resume else True,
    )
    return run_llamafactory(tmp_path, config, env=env, name=name)


def test_a_resumed_full_tuning_run_continues_from_its_checkpoints_weights(tmp_path, llava, tiny_dataset_dir):
    # transformers 5 saves the checkpoint in the hub layout; the Trainer's resume loads it with strict=False, every
    # key misses, and stock LLaMA-Factory trains on from the initial weights: its loss after resuming is ln 2 again
    # (policy = reference). The shared step saves the live layout and reloads a hub-layout one by its names.
    uninterrupted = tmp_path / "uninterrupted"
    assert full_tuning(tmp_path, llava, tiny_dataset_dir, uninterrupted).returncode == 0
    expected = losses(uninterrupted, 4)
    for env, name in ((None, "adapter"), ({"VLM_DPO_LLAMAFACTORY": "0"}, "stock")):
        output_dir = tmp_path / name
        first = full_tuning(tmp_path, llava, tiny_dataset_dir, output_dir, env=env, name=f"{name}-first")
        assert first.returncode == 0, first.log()
        shutil.rmtree(output_dir / "checkpoint-4")  # as if killed after checkpoint-2
        resumed = full_tuning(tmp_path, llava, tiny_dataset_dir, output_dir, env=env, resume=True, name=name)
        assert resumed.returncode == 0, resumed.log()
        logged = losses(output_dir, 4)
        if name == "adapter":
            assert logged == pytest.approx(expected, abs=1e-6), (logged, expected)
        else:
            assert logged[3] == pytest.approx(LN2, abs=1e-6) and abs(logged[3] - expected[3]) > 1e-3, logged
