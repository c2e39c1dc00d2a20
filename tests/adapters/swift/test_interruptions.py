"""``swift rlhf`` killed (SIGKILL) mid-step or mid-save, then resumed, loses nothing.

Every run: the tiny Qwen2-VL with LoRA, 6 steps, a checkpoint every 2, a NaN gradient at step 1 (so the plugins
have a skip counter to carry over). The killed run dies during step 3's backward pass, or while writing
checkpoint-4. The resumed run is the same command with ``--resume_from_checkpoint`` naming the newest
``checkpoint-*`` folder, as a user would after a crash: the adapter must pass over a half-written one (and say
so), resume from checkpoint-2, and end exactly where an uninterrupted run ends.
"""

from __future__ import annotations

import json

import pytest

swift = pytest.importorskip("swift", reason="needs the ms-swift test environment (ms-swift==4.6.0)")
if getattr(swift, "__file__", None) is None:
    pytest.skip("`swift` is not ms-swift here", allow_module_level=True)

from fault_matrix import KILL_LINE, KILL_ROWS, assert_resumed_exactly  # noqa: E402
from fault_plugin import install as install_fault_plugin  # noqa: E402

RUN_ARGS = ["--tuner_type", "lora", "--save_steps", "2", "--save_only_model", "false"]


def train(tmp_path, swift_dpo, model, plugin_file, output_name, *, kill=None, extra=()):
    env = install_fault_plugin(tmp_path / "plugins", fault="grad-nan", steps=[1], kill=kill)
    extra_args = [*RUN_ARGS, *extra, "--external_plugins", plugin_file]
    return swift_dpo(model, max_steps=6, extra_args=extra_args, env_extra=env, output_name=output_name)


def losses(output_dir, last_step):
    state = json.loads((output_dir / f"checkpoint-{last_step}" / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


@pytest.mark.parametrize(
    "kill", [pytest.param(kill, marks=pytest.mark.reliability("ms-swift", row=row)) for kill, row in KILL_ROWS.items()]
)
def test_a_killed_run_resumes_from_its_last_complete_checkpoint_and_loses_nothing(
    tmp_path, swift_dpo, qwen2_vl, plugin_file, kill
):
    reference = train(tmp_path, swift_dpo, qwen2_vl, plugin_file, "uninterrupted")
    assert reference.returncode == 0, reference.tail()
    killed = train(tmp_path, swift_dpo, qwen2_vl, plugin_file, "out", kill=(kill, 3))
    output = killed.stdout + killed.stderr
    assert killed.returncode != 0 and KILL_LINE in output, killed.tail()
    output_dir = killed.output_dir
    expected = ["checkpoint-2", "checkpoint-4"] if kill == "save" else ["checkpoint-2"]
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == expected

    newest = output_dir / expected[-1]
    resumed = train(tmp_path, swift_dpo, qwen2_vl, plugin_file, "out", extra=["--resume_from_checkpoint", str(newest)])
    assert resumed.returncode == 0, resumed.tail()
    if kill == "save":
        assert (
            f"not resuming from {newest}: its save was interrupted "
            f"(vlm_dpo_saving.rank0 left behind); resuming from {output_dir / 'checkpoint-2'}"
        ) in resumed.stdout + resumed.stderr, resumed.tail()
    assert_resumed_exactly(output_dir, reference.output_dir, last_step=6)
    assert losses(output_dir, 6) == losses(reference.output_dir, 6)
