"""``swift rlhf --deepspeed CONFIG`` on two CPU ranks (``NPROC_PER_NODE=2 --use_cpu true``, gloo), ms-swift's own
launch.

Stock, a two-rank ZeRO-3 does not start on CPU, either way:

- with ``--use_cpu true`` (tested, on both ranks), transformers hands accelerate ``cpu=True`` and never says
  DeepSpeed (``TrainingArguments._setup_devices``), so accelerate starts torch's gloo group but leaves
  ``deepspeed.comm`` empty (it initialises it only for ranks that are not ``cpu``); the model then loads under
  ``deepspeed.zero.Init``, whose config asks the empty ``deepspeed.comm`` for the world size, counts one rank, and
  the batch check refuses: "4 != 2 * 1 * 1";
- without it (seen, not tested), accelerate 1.16 makes a CPU rank distributed only with ``cpu=True``
  (``_prepare_backend``): it initialises ``deepspeed.comm`` (which finds both ranks) yet counts one process, so the
  Trainer's batch is one rank's and DeepSpeed refuses, on both ranks: "2 != 2 * 1 * 2".

ZeRO-2 starts with ``--use_cpu true`` as it is (``deepspeed.initialize`` adopts accelerate's gloo group); ZeRO-3
needs DeepSpeed's communication on that group before the model loads, which ``tests/support/deepspeed_on_cpu.py``
opens (what accelerate does on accelerator ranks) and nothing else.

- ZeRO-3 (the gate opened), LoRA on the tiny Qwen2-VL, a NaN gradient on rank 1 at step 1: DeepSpeed skips the
  step on both ranks (the NaN reaches rank 0 in the reduced gradients), both ranks' plugin state counts it once, and
  the losses, gradient norms and margins equal the same run under DDP. (A NaN *loss* with finite gradients cannot
  be skipped under DeepSpeed: the engine steps inside ``backward``, before the guards vote; they warn on the rank
  that saw it.) Stock ZeRO-2 on two ranks is run by the ``freeze.unfreeze`` test in ``test_distributed.py`` (full
  tuning: the merger held in ZeRO's optimizer until its stage, every checkpoint's weights, the losses and the
  gradient norms equal to the DDP route's).
"""

from __future__ import annotations

import json
import math

import pytest

swift = pytest.importorskip("swift", reason="needs the ms-swift test environment (ms-swift==4.6.0)")
if getattr(swift, "__file__", None) is None:
    pytest.skip("`swift` is not ms-swift here", allow_module_level=True)
pytest.importorskip("deepspeed", reason="needs deepspeed in the ms-swift environment")

from deepspeed_on_cpu import gate_env  # noqa: E402
from fault_matrix import assert_deepspeed_skipped_once, deepspeed_environment, zero_config  # noqa: E402
from fault_plugin import install as install_fault_plugin  # noqa: E402
from framework_cli import free_port, merged_environments  # noqa: E402

BATCH_CHECK = (
    "AssertionError: Check batch related parameters. "
    "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size "
)
# A margin is beta times a difference of four log-probs of some 80 nats, each rounded to about 5e-6 in fp32: where
# ZeRO-3 sums the gradients in another order than DDP, the weights after a step agree to rounding and the margins to
# about 1e-6, not 1e-7.
TOLERANCE = {
    "loss": dict(rel=1e-5, abs=1e-7),
    "grad_norm": dict(rel=1e-5, abs=1e-7),
    "rewards/margins": dict(rel=1e-5, abs=1e-6),
}
FP32 = ["--fp16", "false", "--bf16", "false"]


def zero_file(folder, stage: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"zero{stage}.json"
    path.write_text(json.dumps(zero_config(stage)))
    return str(path)


def two_ranks(swift_dpo, model, model_dir, name, env, extra_args, tuning="lora"):
    env = {"NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port()), **env}
    return swift_dpo(
        model, num_rows=8, max_steps=3, extra_args=["--tuner_type", tuning, *FP32, *extra_args], env_extra=env,
        output_name=name, model_dir=model_dir,
    )  # fmt: skip


def test_stock_zero3_on_two_cpu_ranks_fails_the_batch_check(tmp_path, swift_dpo, qwen2_vl):
    # With --use_cpu true DeepSpeed counts one rank (the module's docstring: the run without it, seen, not tested).
    extra = ["--use_cpu", "true", "--deepspeed", zero_file(tmp_path, 3)]
    run = two_ranks(swift_dpo, qwen2_vl, None, "stock", deepspeed_environment(), extra)
    output = run.stdout + run.stderr
    assert run.returncode != 0, run.tail()
    for rank in (0, 1):
        assert f"[rank{rank}]: {BATCH_CHECK}4 != 2 * 1 * 1" in output, run.tail()


def test_zero_on_two_ranks_skips_a_one_rank_nan_on_both_and_trains_as_ddp(tmp_path, swift_dpo, qwen2_vl, plugin_file):
    """ZeRO-3 with DeepSpeed's communication opened on the gloo group (the gate), LoRA, a NaN gradient on rank 1 at
    step 1, against the same run under DDP."""
    fault = install_fault_plugin(tmp_path / "plugins", fault="grad-nan", steps=[1], only_rank=1)
    model_dir = qwen2_vl.build(tmp_path / "model")
    plugins = ["--use_cpu", "true", "--external_plugins", plugin_file, "--save_only_model", "false"]

    def launch(name, env, *extra):
        run = two_ranks(swift_dpo, qwen2_vl, model_dir, name, env, [*plugins, *extra])
        output = run.stdout + run.stderr
        assert run.returncode == 0 and "world_size: 2" in output, run.tail()
        assert "[test_fault_injection] grad-nan at step 1" in output, run.tail()
        assert [entry["vlm_dpo/skipped_steps"] for entry in run.logged_steps()] == [0, 1, 1], run.logged_steps()
        for rank in (0, 1):
            state = json.loads((run.output_dir / "checkpoint-3" / f"vlm_dpo_plugins_state.rank{rank}.json").read_text())
            assert state["guards"]["skipped_steps"] == 1, (name, rank, state["guards"])
        return run

    ddp = launch("ddp", fault)
    gate = gate_env(tmp_path / "gate")
    with_gate = merged_environments(gate, fault)
    run = launch("zero3", {**with_gate, **deepspeed_environment()}, "--deepspeed", zero_file(tmp_path, 3))
    output = run.stdout + run.stderr
    assert "DeepSpeed ZeRO-3 optimizer holds" in output, run.tail()
    # Rank 1's NaN reaches rank 0 in the reduced gradients: DeepSpeed skips on both, each rank's guards count it.
    assert_deepspeed_skipped_once(output, [entry["vlm_dpo/skipped_steps"] for entry in run.logged_steps()])
    for mine, theirs in zip(run.logged_steps(), ddp.logged_steps(), strict=True):
        for key, within in TOLERANCE.items():
            if math.isfinite(theirs[key]):
                assert mine[key] == pytest.approx(theirs[key], **within), (key, mine, theirs)
            else:
                assert not math.isfinite(mine[key]), (key, mine, theirs)
