"""A ``VLMDPOTrainer.train()`` process killed (SIGKILL) mid-step or mid-save, then resumed, loses nothing.

Every run: the tiny LLaVA, 6 steps, a checkpoint every 2, a NaN gradient at step 1 (so the plugins have a skip
counter to carry over), the projector unfrozen at step 4. The killed run dies during step 3's backward pass, or
while writing checkpoint-4; the resumed run is the same command with ``resume_from_checkpoint=True``. It must
skip the half-written checkpoint-4 (and say so), resume from checkpoint-2, and end exactly where an uninterrupted
run ends: same weights, AdamW state, schedule, plugin state, and the same losses for every step after the resume
(the data position was restored too).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

from fault_matrix import KILL_LINE, KILL_ROWS, assert_resumed_exactly  # noqa: E402

RUNNER = Path(__file__).resolve().parents[2] / "support" / "trl_process.py"


def train_process(tmp_path: Path, model_dir: Path, output_dir: Path, **spec) -> subprocess.CompletedProcess:
    spec = {
        "model_dir": str(model_dir),
        "output_dir": str(output_dir),
        "max_steps": 6,
        "save_steps": 2,
        "fault": "grad-nan",
        "steps": [1],
        # A stage after the interruption: the resumed run must rebuild the optimizer for the stage it resumes in.
        "vlm_dpo": {"freeze": {"unfreeze": [{"at_step": 4, "groups": ["projector"]}]}},
        **spec,
    }
    path = tmp_path / f"spec-{len(list(tmp_path.glob('spec-*')))}.json"
    path.write_text(json.dumps(spec))
    return subprocess.run([sys.executable, str(RUNNER), str(path)], capture_output=True, text=True, timeout=600)


def losses(output_dir: Path, last_step: int) -> dict[int, float]:
    state = json.loads((output_dir / f"checkpoint-{last_step}" / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dirs, tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    run = train_process(tmp_path, tiny_model_dirs["llava"], tmp_path / "out")
    assert run.returncode == 0, run.stderr[-5000:]
    return tmp_path / "out"


@pytest.mark.parametrize(
    "kill", [pytest.param(kill, marks=pytest.mark.reliability("TRL", row=row)) for kill, row in KILL_ROWS.items()]
)
def test_a_killed_run_resumes_from_its_last_complete_checkpoint_and_loses_nothing(
    tiny_model_dirs, tmp_path, uninterrupted, kill
):
    output_dir = tmp_path / "out"
    killed = train_process(tmp_path, tiny_model_dirs["llava"], output_dir, kill=[kill, 3])
    assert killed.returncode == -9 and KILL_LINE in killed.stdout, (killed.returncode, killed.stderr[-3000:])
    expected = ["checkpoint-2", "checkpoint-4"] if kill == "save" else ["checkpoint-2"]
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == expected

    resumed = train_process(tmp_path, tiny_model_dirs["llava"], output_dir, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    if kill == "save":
        assert (
            f"not resuming from {output_dir / 'checkpoint-4'}: its save was interrupted "
            f"(vlm_dpo_saving.rank0 left behind); resuming from {output_dir / 'checkpoint-2'}"
        ) in resumed.stderr
    assert_resumed_exactly(output_dir, uninterrupted, last_step=6)
    assert losses(output_dir, 6) == losses(uninterrupted, 6)
